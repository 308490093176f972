"""The LangChain adapters' own logic, without generating or absorbing (recall on empty users only)."""

from types import SimpleNamespace

import langchain_d2l
import pytest
from langchain.agents.middleware import ModelRequest
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_d2l import ChatD2L, D2LMemoryMiddleware, D2LStore, ToolFirstMiddleware
from langchain_d2l._utils import last_human, to_chat
from langgraph.store.base import InvalidNamespaceError

from d2l_memory.tool_calls import with_calls


def test_public_api():
    assert set(langchain_d2l.__all__) == {"ChatD2L", "D2LStore", "D2LMemoryMiddleware", "D2LClassicMemory",
                                          "ToolFirstMiddleware"}
    with pytest.raises(AttributeError):
        langchain_d2l.Nope  # noqa: B018


def test_messages_convert_to_the_core_chat_format():
    messages = [SystemMessage("Be brief."), HumanMessage("Hi"), AIMessage("Hello!"), HumanMessage("Order 7?"),
                AIMessage("", tool_calls=[{"name": "lookup", "args": {"n": 7}, "id": "c1"}]),
                ToolMessage('{"status": "shipped"}', tool_call_id="c1")]
    assert last_human(messages) == 3 and last_human([SystemMessage("x")]) is None
    chat = to_chat(messages)
    assert [m["role"] for m in chat] == ["system", "user", "assistant", "user", "assistant", "tool"]
    # a call is the text the model writes for it; an AI message with nothing at all is dropped
    assert chat[4]["content"] == '<tool_call>\n{"name": "lookup", "arguments": {"n": 7}}\n</tool_call>'
    assert len(to_chat([HumanMessage("Hi"), AIMessage("")])) == 1
    with pytest.raises(ValueError, match="text only"):
        to_chat([HumanMessage([{"type": "image", "url": "https://example.com/cat.png"}])])


def test_chat_request_recalls_for_the_last_human_message_and_keeps_order(memory):
    llm = ChatD2L(memory=memory, user_id="unit-empty", mode="context")
    messages = [SystemMessage("Be brief."), HumanMessage("Hi"), AIMessage("Hello!"), HumanMessage("Order 7?"),
                AIMessage("", tool_calls=[{"name": "lookup", "args": {"n": 7}, "id": "c1"}]),
                ToolMessage("shipped", tool_call_id="c1")]
    chat, adapter = llm._request(messages, llm._options(None, {}))
    assert adapter is None  # this user has no memories: the untouched base model
    assert chat == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Order 7?"},
                    {"role": "assistant", "content": with_calls("", [("lookup", {"n": 7})])},
                    {"role": "tool", "content": "shipped"}]


def test_chat_rejects_unknown_options_and_other_models(memory):
    llm = ChatD2L(memory=memory, user_id="unit-empty", max_new_tokens=4)
    assert llm.max_tokens == 4 and llm._identifying_params["user_id"] == "unit-empty"
    with pytest.raises(TypeError, match="unexpected call options"):
        llm.invoke("hi", functions=[])
    with pytest.raises(ValueError, match="one base model"):
        llm.invoke("hi", model="gpt-5")


def test_bind_tools_maps_langchains_tool_choices_to_the_engines(memory):
    def lookup(n: int) -> str:
        """Look up order n."""
        return "shipped"

    llm = ChatD2L(memory=memory, user_id="unit-empty")
    choices = [(None, "auto"), ("auto", "auto"), ("any", "required"), (True, "required"), ("none", "none"),
               ("lookup", "lookup"), ({"type": "function", "function": {"name": "lookup"}}, "lookup")]
    for given, sent in choices:
        bound = llm.bind_tools([lookup], tool_choice=given)
        assert bound.kwargs["tool_choice"] == sent and bound.kwargs["parallel_tool_calls"] is False
    assert bound.kwargs["tools"][0]["function"]["name"] == "lookup"
    assert llm.bind_tools([lookup], parallel_tool_calls=True).kwargs["parallel_tool_calls"] is True
    with pytest.raises(ValueError, match="tool_choice"):
        llm.bind_tools([lookup], tool_choice="other")


def test_store_namespaces_map_to_scopes_and_never_cross_users(memory):
    store = D2LStore(memory)
    assert store._scope(("memories", "alice")) == {"user_id": "alice"}
    assert store._scope(("memories", "alice", "bot", "s1")) == {"user_id": "alice", "agent_id": "bot",
                                                               "session_id": "s1"}
    assert D2LStore(memory, prefix=())._scope(("alice",)) == {"user_id": "alice"}
    with pytest.raises(InvalidNamespaceError, match="never cross users"):
        store.search(("memories",), query="anything")
    for namespace in [("notes", "alice"), ("memories", "a", "b", "c", "d")]:
        with pytest.raises(InvalidNamespaceError):
            store.get(namespace, "key")
    with pytest.raises(InvalidNamespaceError):
        store.get(("memories", "a.b"), "key")  # LangGraph's own label rule
    assert store.search(("memories", "unit-empty"), query="anything") == []
    assert store.get(("memories", "unit-empty"), "missing") is None


def test_middleware_needs_a_user_and_leaves_irrelevant_requests_alone(memory):
    middleware = D2LMemoryMiddleware(memory, mode="context")
    with pytest.raises(ValueError, match="needs a user id"):
        middleware._user(SimpleNamespace(context=None))
    assert middleware._user(SimpleNamespace(context={"user_id": "u1"})) == "u1"
    assert middleware._user(SimpleNamespace(context=SimpleNamespace(user_id="u2"))) == "u2"
    with pytest.raises(ValueError, match="unknown mode"):
        D2LMemoryMiddleware(memory, mode="weights")
    request = ModelRequest(model=GenericFakeChatModel(messages=iter([])), messages=[HumanMessage("Hi")],
                           runtime=SimpleNamespace(context={"user_id": "unit-empty"}))
    assert middleware.route(request) is request


def test_openai_compatible_models_are_routed_by_model_name():
    openai = pytest.importorskip("langchain_openai", reason="langchain-openai is not a dependency")
    from langchain_d2l.middleware import _with_model_name

    model = openai.ChatOpenAI(base_url="http://localhost:8000/v1", api_key="unused", model="smollm2-135m-instruct")
    routed = _with_model_name(model, "d2l-0123abcd")
    assert routed._get_request_payload([HumanMessage("hi")])["model"] == "d2l-0123abcd"
    assert model.model_name == "smollm2-135m-instruct"  # the agent's own model is not changed
    with pytest.raises(TypeError, match="no model name"):
        _with_model_name(GenericFakeChatModel(messages=iter([])), "d2l-0123abcd")


def test_tool_first_requires_a_call_then_an_answer():
    def lookup(n: int) -> str:
        """Look up order n."""
        return "shipped"

    fake = GenericFakeChatModel(messages=iter([]))
    call = AIMessage("", tool_calls=[{"name": "lookup", "args": {"n": 7}, "id": "c1"}])
    asked = ModelRequest(model=fake, messages=[HumanMessage("Order 7?")], tools=[lookup])
    answered = asked.override(messages=[HumanMessage("Order 7?"), call, ToolMessage("shipped", tool_call_id="c1")])
    assert ToolFirstMiddleware.choose(asked).tool_choice == "any"
    assert ToolFirstMiddleware.choose(answered).tool_choice == "none"
    no_tools = ModelRequest(model=fake, messages=[HumanMessage("Hi")])
    assert ToolFirstMiddleware.choose(no_tools) is no_tools
