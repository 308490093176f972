"""Tool calling: the template, the call format and its parsing, the grammar, the embedded engine's guided
decoding on the real model, and what the server engine sends and reads (a mock server; the real one is in
integrations/langchain/tests/integration_tests/test_openai_agent.py)."""

from __future__ import annotations

import json

import httpx
import pytest
from chats import (
    ANSWERED_ORDER,
    AS_ORDER_JSON,
    ASK_ORDER,
    BASE,
    CALL_ORDER,
    COLOR,
    FRANCE,
    HELLO,
    ORDER,
    ORDER_CALL,
    ORDER_JSON,
)
from pydantic import ValidationError

from d2l_memory.compose import ComposedCache
from d2l_memory.engines import GenerationParams
from d2l_memory.engines.base import render_chat
from d2l_memory.engines.transformers_engine import TransformersEngine
from d2l_memory.engines.vllm_server import ServerConfig, VLLMServer, VLLMServerEngine
from d2l_memory.tool_calls import (
    TOOL_CHAT_TEMPLATE,
    call_text,
    json_grammar,
    parse_tool_calls,
    settled_content,
    strict_schema,
    tool_grammar,
    tool_template_file,
    with_calls,
)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather at a location.",
    "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}}}


@pytest.fixture(scope="module")
def tokenizer(base):
    return base.tokenizer


@pytest.fixture(scope="module")
def engine(base):
    return TransformersEngine(loaded=base)


def render(tokenizer, messages, template=None, **kw) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                         tokenize=False, **kw)


# -- the template and the call format ---------------------------------------------------------------
def test_without_tools_the_template_renders_as_smollm2s_own(tokenizer):
    history = [*COLOR, {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Why?"},
               {"role": "tool", "content": "status: shipped"}]
    for chat in (FRANCE, HELLO, COLOR, history):
        assert render(tokenizer, chat, TOOL_CHAT_TEMPLATE) == render(tokenizer, chat)


def test_tools_are_stated_in_the_system_turn(tokenizer):
    text = render(tokenizer, ASK_ORDER, TOOL_CHAT_TEMPLATE, tools=[ORDER])
    system = text.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert f"<tools>\n{json.dumps(ORDER)}\n</tools>" in system and "<tool_call></tool_call>" in system
    own = render(tokenizer, [{"role": "system", "content": "Be brief."}, *ASK_ORDER], TOOL_CHAT_TEMPLATE,
                 tools=[ORDER, WEATHER])
    assert own.startswith("<|im_start|>system\nBe brief.\n\nYou can call these tools.") and "get_weather" in own
    # render_chat states them the same way (contents tokenized apart, so compare the text)
    assert tokenizer.decode(render_chat(tokenizer, ASK_ORDER, tools=[ORDER])) == text


def test_an_openai_assistant_call_renders_as_the_text_the_model_writes(tokenizer):
    call = {"id": "c1", "type": "function", "function": {"name": "lookup_order", "arguments": {"order_id": 1234}}}
    for content in ("", "Let me look."):
        openai = [*ASK_ORDER, {"role": "assistant", "content": content or None, "tool_calls": [call, call]},
                  {"role": "tool", "content": "shipped"}]
        calls = [("lookup_order", {"order_id": 1234})] * 2
        ours = [*ASK_ORDER, {"role": "assistant", "content": with_calls(content, calls)},
                {"role": "tool", "content": "shipped"}]
        assert render(tokenizer, openai, TOOL_CHAT_TEMPLATE, tools=[ORDER]) == \
            render(tokenizer, ours, TOOL_CHAT_TEMPLATE, tools=[ORDER])
    assert call_text("lookup_order", {"order_id": 1234}) == ORDER_CALL
    assert call_text("lookup_order", '{"order_id": 1234}') == ORDER_CALL  # a server's JSON text, kept


def test_answers_split_into_content_valid_and_invalid_calls():
    assert parse_tool_calls("Hello!") == ("Hello!", [], [])
    text = f"Looking it up.\n{ORDER_CALL}\n" + '<tool_call>\n{"name": "get_weather", "arguments": {"location": "Par'
    content, calls, invalid = parse_tool_calls(text)
    assert content == "Looking it up." and calls == [{"name": "lookup_order", "args": {"order_id": 1234}}]
    assert invalid[0]["name"] == "get_weather" and invalid[0]["args"].startswith('{"name"')
    assert "JSON" in invalid[0]["error"]
    assert parse_tool_calls(ORDER_CALL[:-5])[1] == calls  # whole JSON, closing tag cut by the budget
    _, calls, invalid = parse_tool_calls('<tool_call>\n{"name": "x", "arguments": [1]}\n</tool_call>')
    assert not calls and invalid[0]["name"] == "x"
    assert settled_content("Sure. <tool") == "Sure." and settled_content("a <b") == "a <b"
    assert settled_content(f"Sure. {ORDER_CALL}") == "Sure."


def test_the_template_file_for_the_server_holds_the_template_and_the_server_runs_with_it(tmp_path, monkeypatch):
    monkeypatch.setenv("D2L_MEMORY_HOME", str(tmp_path))
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # no memory sizing: the command needs no vLLM
    assert tool_template_file().read_text() == TOOL_CHAT_TEMPLATE
    assert tool_template_file().parent == tmp_path / "templates"
    command = VLLMServer(ServerConfig(), ComposedCache(tmp_path / "composed")).command()
    flags = " ".join(command)
    assert "--enable-auto-tool-choice --tool-call-parser hermes --tool-strict-level parameter" in flags
    assert "--exclude-tools-when-tool-choice-none" in flags
    assert command[command.index("--chat-template") + 1] == str(tool_template_file())
    plain = VLLMServer(ServerConfig(tool_call_parser=None), ComposedCache(tmp_path / "composed")).command()
    assert "--enable-auto-tool-choice" not in plain and "--chat-template" not in plain


# -- the grammar ------------------------------------------------------------------------------------
def test_choices_and_schemas_are_checked():
    with pytest.raises(ValidationError, match="tool_choice"):
        GenerationParams(tools=(ORDER,), tool_choice="get_weather")
    with pytest.raises(ValidationError, match="needs at least one tool"):
        GenerationParams(tool_choice="required")
    with pytest.raises(ValidationError, match="a tool must be"):
        GenerationParams(tools=({"name": "lookup_order"},))
    assert tool_grammar([], "auto") is None
    assert GenerationParams().grammar is None
    with pytest.raises(ValidationError, match="tools or json_schema, not both"):
        GenerationParams(tools=(ORDER,), json_schema={"type": "object"})
    with pytest.raises(ValidationError, match="json_schema"):
        GenerationParams(json_schema=["type", "object"])
    with pytest.raises(ValueError, match="must be a mapping"):
        json_grammar(["type", "object"])
    assert GenerationParams(tools=(ORDER,), tool_choice="none").stated_tools == ()  # told of none it may not call
    assert GenerationParams(tools=(ORDER,)).stated_tools == (ORDER,)
    nested = {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "string"}}}},
              "$defs": {"D": {"properties": {"c": {}}}}}
    strict = strict_schema(nested)
    assert strict["additionalProperties"] is False and strict["properties"]["a"]["additionalProperties"] is False
    assert strict["$defs"]["D"]["additionalProperties"] is False and "additionalProperties" not in nested


def test_the_grammar_admits_the_written_call_and_nothing_else(tokenizer):
    llguidance = pytest.importorskip("llguidance")
    from d2l_memory.engines.guided import guide_tokenizer

    lt = guide_tokenizer(tokenizer)

    def accepts(grammar: str, text: str) -> bool:
        matcher = llguidance.LLMatcher(lt, llguidance.LLMatcher.grammar_from_lark(grammar))
        return matcher.consume_tokens(lt.tokenize_str(text)) and matcher.is_accepting()

    required = tool_grammar([ORDER, WEATHER], "required", parallel=False)
    assert accepts(required, ORDER_CALL) and accepts(required, call_text("get_weather", {"location": "Paris"}))
    assert not accepts(required, "Sure. " + ORDER_CALL)  # a call right away
    assert not accepts(required, call_text("lookup_order", {"order_id": "1234"}))  # the schema's type
    assert not accepts(required, call_text("lookup_order", {"order_id": 1, "extra": 2}))  # no other keys
    assert not accepts(required, ORDER_CALL + "\n" + ORDER_CALL)  # one call
    assert accepts(tool_grammar([ORDER], "required", parallel=True), ORDER_CALL + "\n" + ORDER_CALL)
    assert not accepts(tool_grammar([ORDER, WEATHER], "get_weather"), ORDER_CALL)  # the named tool only
    auto = tool_grammar([ORDER], "auto", parallel=False)
    assert accepts(auto, "Your order has shipped.") and accepts(auto, "Let me look.\n" + ORDER_CALL)
    assert not accepts(auto, "Let me look.\n<tool_call>[1234]</tool_call>")  # once opened, a call
    none = tool_grammar([ORDER], "none")
    assert accepts(none, "Your order has shipped.") and not accepts(none, "Sure. " + ORDER_CALL)
    as_json = AS_ORDER_JSON.grammar
    assert accepts(as_json, ORDER_JSON) and not accepts(as_json, "Sure. " + ORDER_JSON)
    assert not accepts(as_json, '{"order_id": "1234"}') and not accepts(as_json, '{"order_id": 1, "x": 2}')
    assert not accepts(as_json, ORDER_CALL)


# -- the embedded engine ----------------------------------------------------------------------------
def test_the_embedded_engine_writes_the_call_the_grammar_allows(engine):
    required = CALL_ORDER
    answer = engine.generate(ASK_ORDER, None, required)
    assert answer == ORDER_CALL  # the 135M model copies the order number into the schema's integer
    assert "".join(engine.stream(ASK_ORDER, None, required)) == answer
    # Given both tools it picks get_weather for this question: with several tools, name the one to call
    named = engine.generate([{"role": "user", "content": "How is the weather in Paris?"}], None,
                            required.model_copy(update={"tools": (ORDER, WEATHER), "tool_choice": "get_weather"}))
    assert parse_tool_calls(named)[1] == [{"name": "get_weather", "args": {"location": "Paris"}}]
    # Forced text counts towards the budget: a call cut short is no call
    cut = engine.generate(ASK_ORDER, None, required.model_copy(update={"max_new_tokens": 8}))
    assert cut.startswith("<tool_call>") and parse_tool_calls(cut)[1] == []
    # `none` after a call: unconstrained, the model may copy the call it sees (it did on the server); not here
    text = engine.generate(ANSWERED_ORDER, None, required.model_copy(update={"tool_choice": "none"}))
    assert text and "<tool_call>" not in text
    # Structured output: the whole answer is one JSON value of the schema, streamed the same
    assert engine.generate(ASK_ORDER, None, AS_ORDER_JSON) == ORDER_JSON
    assert "".join(engine.stream(ASK_ORDER, None, AS_ORDER_JSON)) == ORDER_JSON


# -- the server engine (a mock server) ---------------------------------------------------------------
def test_the_server_engine_sends_tools_and_writes_the_calls_back_into_the_text(monkeypatch):
    bodies: list[dict] = []
    call = {"index": 0, "id": "c1", "type": "function",
            "function": {"name": "lookup_order", "arguments": '{"order_id": 1234}'}}

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        bodies.append(body)
        if body["stream"]:
            events = [{"delta": {"content": "Sure."}}, {"delta": {"tool_calls": [
                {**call, "function": {"name": "lookup_order", "arguments": '{"order_'}}]}},
                      {"delta": {"tool_calls": [{"index": 0, "function": {"arguments": 'id": 1234}'}}]}}]
            return httpx.Response(200, text="".join(f"data: {json.dumps({'choices': [e]})}\n\n" for e in events)
                                  + "data: [DONE]\n\n")
        return httpx.Response(200, json={"choices": [{"message": {"content": None, "tool_calls": [call]}}]})

    client = httpx.Client
    monkeypatch.setattr(httpx, "Client", lambda **kw: client(transport=httpx.MockTransport(handler), **kw))
    engine = VLLMServerEngine("http://127.0.0.1:9", model=BASE)
    params = GenerationParams(tools=(ORDER,), tool_choice="lookup_order", parallel_tool_calls=False)
    assert engine.generate(ASK_ORDER, None, params) == ORDER_CALL
    assert "".join(engine.stream(ASK_ORDER, None, params)) == "Sure.\n" + ORDER_CALL
    assert bodies[0]["tools"] == [ORDER] and bodies[0]["parallel_tool_calls"] is False
    assert bodies[0]["tool_choice"] == {"type": "function", "function": {"name": "lookup_order"}}
    engine.generate(ASK_ORDER, None, params.model_copy(update={"tool_choice": "required"}))
    assert bodies[-1]["tool_choice"] == "required"
    engine.generate(ASK_ORDER, None, AS_ORDER_JSON)
    assert bodies[-1]["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "answer", "schema": strict_schema(AS_ORDER_JSON.json_schema), "strict": True}}
    assert "tools" not in bodies[-1]
    engine.generate(ASK_ORDER)
    assert "tools" not in bodies[-1]
