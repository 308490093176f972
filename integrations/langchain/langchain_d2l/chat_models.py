"""`ChatD2L`: a LangChain chat model whose answers use one user's d2l-memory memories."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from operator import itemgetter
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams, LanguageModelInput
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.messages.tool import invalid_tool_call, tool_call, tool_call_chunk
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from pydantic import AliasChoices, BaseModel, Field

from d2l_memory import D2LMemory, Mode
from d2l_memory.engines import GenerationParams
from d2l_memory.tool_calls import check_tool_choice, parse_tool_calls, settled_content
from langchain_d2l._utils import last_human, to_chat

# Per-call options (`model.invoke(msgs, mode="context")`, `.bind(user_id=...)`): they override the fields.
# `tools`, `tool_choice` and `parallel_tool_calls` are what `bind_tools` binds.
# `json_schema` is what `with_structured_output(method="json_schema")` binds.
CALL_OPTIONS = frozenset({"user_id", "mode", "k", "agent_id", "session_id", "max_tokens", "temperature", "top_p",
                          "seed", "model", "tools", "tool_choice", "parallel_tool_calls", "json_schema"})


class ChatD2L(BaseChatModel):
    """Chat with the base model of a `D2LMemory`, answering from one user's memories.

    Each call takes the last human message as the query: `D2LMemory.prepare` recalls the user's relevant
    memories and, depending on `mode`, composes their adapters (`adapter`), puts their text in the prompt
    (`context`), does both with the best memory (`hybrid`), or uses none (`none`). Earlier messages are
    the history; messages after the last human one (e.g. tool results) follow the query. With no relevant
    memory every mode is the untouched base model. The model reads memories; it never writes them (see
    `D2LMemoryMiddleware` or `D2LMemory.absorb`).

    Example:
        ```python
        from d2l_memory import D2LMemory
        from langchain_d2l import ChatD2L

        memory = D2LMemory("./memories")
        memory.absorb("Alice's favorite color is teal.", user_id="alice")
        llm = ChatD2L(memory=memory, user_id="alice", mode="context", max_tokens=32)
        llm.invoke("What is my favorite color?").content
        llm.invoke("...", user_id="bob")  # per-call options override the fields
        ```

    Tools: `bind_tools` states the tools in the prompt (`d2l_memory.tool_calls.TOOL_CHAT_TEMPLATE`) and the
    engine constrains the answer to well-formed calls of them (JSON-schema guided decoding), which come back
    as `tool_calls`; `with_structured_output` is a forced call of the schema as a tool, or with
    `method="json_schema"` an answer that is one JSON value constrained to the schema. The 135M base model
    does not decide to call a tool by itself (`tool_choice="auto"`): force the call (`"any"` or a tool's
    name) where one is needed. A call that the token budget cuts short is one of `invalid_tool_calls` (left
    out of a stream, whose call chunks LangChain would read as partial JSON).

    Not supported: JSON mode and non-text inputs.
    """

    memory: D2LMemory = Field(exclude=True, repr=False)
    """Where memories live; its engine generates the answers (`D2LMemory.generate`)."""
    user_id: str
    """Whose memories answer (validated by the store: letters, digits and `_ . : @ + / = -`)."""
    mode: Mode = "adapter"
    """How memories reach the model: `adapter`, `context`, `hybrid` or `none`."""
    k: int | None = Field(None, ge=1)
    """Memories recalled per call; None uses the memory's `config.k`."""
    agent_id: str | None = None
    """Narrow recall to one agent's memories."""
    session_id: str | None = None
    """Narrow recall to one session's memories."""
    max_tokens: int = Field(64, ge=1, validation_alias=AliasChoices("max_tokens", "max_new_tokens"))
    """Largest number of tokens generated (`max_new_tokens` is accepted as an alias)."""
    temperature: float = Field(0.0, ge=0.0)
    """Sampling temperature; 0 is greedy."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: list[str] | None = None
    """The answer ends before the first of these strings."""
    seed: int | None = None
    streaming: bool = False
    """Stream internally on `invoke` (kept for compatibility with other chat models)."""

    @property
    def _llm_type(self) -> str:
        return "d2l-chat"

    @property
    def model_name(self) -> str:
        """The base model that answers (the memory engine's model id)."""
        return self.memory.model_name

    @property
    def _identifying_params(self) -> dict[str, Any]:
        # The user and the store are part of the identity: a LangChain cache must never serve one
        # user's answer to another.
        return {"model_name": self.model_name, "store": self.memory.uri, "user_id": self.user_id,
                "mode": self.mode, "k": self.k, "agent_id": self.agent_id, "session_id": self.session_id,
                "max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "stop": self.stop, "seed": self.seed}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(ls_provider="d2l", ls_model_name=kwargs.get("model") or self.model_name,
                                 ls_model_type="chat", ls_temperature=kwargs.get("temperature", self.temperature),
                                 ls_max_tokens=kwargs.get("max_tokens", self.max_tokens))
        if ls_stop := stop or self.stop:
            params["ls_stop"] = ls_stop
        return params

    # -- tools -------------------------------------------------------------------------------------
    def bind_tools(self, tools: Sequence[Mapping[str, Any] | type | Callable | BaseTool], *,
                   tool_choice: str | bool | Mapping[str, Any] | None = None,
                   parallel_tool_calls: bool | None = None, **kwargs: Any) -> Runnable[LanguageModelInput, AIMessage]:
        """This model with `tools` stated in its prompts and its answers constrained to their calls.

        Args:
            tools: LangChain tools, functions, pydantic models, TypedDicts or OpenAI-format tool dicts.
            tool_choice: `None`/`"auto"` (the model decides), `"any"`/`"required"`/`True` (a call of one of
                the tools), a tool's name or `{"type": "function", "function": {"name": ...}}` (a call of
                that tool), `"none"` (no call).
            parallel_tool_calls: whether several calls may come in one answer (default: one call; a 135M
                model allowed more tends to repeat the call).
            **kwargs: other options bound with them.

        Raises:
            ValueError: a `tool_choice` that names none of the tools.
        """
        formatted = [convert_to_openai_tool(t) for t in tools]
        if isinstance(tool_choice, Mapping):
            tool_choice = tool_choice.get("function", {}).get("name") or tool_choice.get("name")
        choice = {None: "auto", True: "required", False: "none", "any": "required"}.get(tool_choice, tool_choice)
        check_tool_choice(formatted, choice)
        return super().bind(tools=formatted, tool_choice=choice, parallel_tool_calls=bool(parallel_tool_calls),
                            **kwargs)

    def with_structured_output(self, schema: Mapping[str, Any] | type, *, include_raw: bool = False,
                               **kwargs: Any) -> Runnable[LanguageModelInput, Any]:
        """This model answering with an instance of `schema` (a pydantic class, a TypedDict or a JSON schema).

        Args:
            include_raw: return `{"raw": AIMessage, "parsed": ..., "parsing_error": ...}` instead of the
                parsed value alone, so an answer the token budget cut short shows instead of raising.
            **kwargs: `method="json_schema"`: the whole answer is one JSON value constrained to the schema,
                no tool call (OpenAI's structured outputs; `strict` is accepted and changes nothing: the
                grammar always holds the answer to the schema). Any other method (`function_calling`,
                the default) is LangChain's: a forced call of the schema as a tool, its arguments the answer.
        """
        if kwargs.get("method") != "json_schema":
            return super().with_structured_output(schema, include_raw=include_raw, **kwargs)
        unknown = set(kwargs) - {"method", "strict"}
        if unknown:
            raise TypeError(f"with_structured_output got unexpected arguments {sorted(unknown)}")
        json_schema = convert_to_json_schema(schema)
        llm = self.bind(json_schema=json_schema, ls_structured_output_format={
            "kwargs": {"method": "json_schema"}, "schema": json_schema})
        pydantic = isinstance(schema, type) and issubclass(schema, BaseModel)
        parser = PydanticOutputParser(pydantic_object=schema) if pydantic else JsonOutputParser()
        if not include_raw:
            return llm | parser
        parsed = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
        failed = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parsed.with_fallbacks([failed], exception_key="parsing_error")

    # -- one request -------------------------------------------------------------------------------
    def _options(self, stop: list[str] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        unknown = set(kwargs) - CALL_OPTIONS
        if unknown:
            raise TypeError(f"ChatD2L got unexpected call options {sorted(unknown)}; "
                            f"expected some of {sorted(CALL_OPTIONS)}")
        model = kwargs.get("model")
        if model is not None and model != self.model_name:
            raise ValueError(f"ChatD2L serves one base model ({self.model_name!r}); cannot switch to {model!r}")
        fields = ("user_id", "mode", "k", "agent_id", "session_id", "max_tokens", "temperature", "top_p", "seed")
        options = {name: kwargs.get(name, getattr(self, name)) for name in fields}
        options["stop"] = tuple(stop if stop is not None else self.stop or ())
        options["tools"] = {"tools": tuple(kwargs.get("tools") or ()), "tool_choice": kwargs.get("tool_choice", "auto"),
                            "parallel_tool_calls": kwargs.get("parallel_tool_calls", False)}
        options["json_schema"] = kwargs.get("json_schema")
        return options

    def _request(self, messages: list[BaseMessage], options: dict[str, Any]) -> tuple[list[dict[str, str]], Any]:
        """The engine request: `D2LMemory.prepare` on the last human message, history before it, and
        the messages after it (tool results) appended."""
        query = last_human(messages)
        if query is None:
            return to_chat(messages), None
        scope = {name: options[name] for name in ("agent_id", "session_id") if options[name] is not None}
        chat, adapter = self.memory.prepare(
            to_chat(messages[query : query + 1])[0]["content"], options["user_id"], options["mode"],
            options["k"], to_chat(messages[:query]), **scope)
        return chat + to_chat(messages[query + 1 :]), adapter

    @staticmethod
    def _calls_allowed(options: dict[str, Any]) -> bool:
        # Under `none` an answer is text, even one that copies a call from the chat (vLLM's server does not
        # constrain `none`; read as a call, it would start the agent's tool loop again).
        return bool(options["tools"]["tools"]) and options["tools"]["tool_choice"] != "none"

    @staticmethod
    def _params(options: dict[str, Any]) -> GenerationParams:
        return GenerationParams(max_new_tokens=options["max_tokens"], temperature=options["temperature"],
                                top_p=options["top_p"], stop=options["stop"], seed=options["seed"],
                                json_schema=options["json_schema"], **options["tools"])

    def _metadata(self, chat: list[dict[str, str]], text: str, adapter: Any,
                  options: dict[str, Any]) -> tuple[UsageMetadata, dict[str, Any]]:
        # Counted with the base tokenizer: prompt tokens as every engine renders them; answer tokens by
        # re-tokenizing the answer (equal to the generated count except at rare merge boundaries).
        n_in = self.memory.count_prompt_tokens(chat, self._params(options))
        n_out = self.memory.count_tokens(text) if text else 0
        usage = UsageMetadata(input_tokens=n_in, output_tokens=n_out, total_tokens=n_in + n_out)
        return usage, {"model_name": self.model_name, "mode": options["mode"],
                       "adapter": getattr(adapter, "name", None)}

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        options = self._options(stop, kwargs)
        chat, adapter = self._request(messages, options)
        text = self.memory.generate(chat, adapter, self._params(options))
        usage, metadata = self._metadata(chat, text, adapter, options)
        if not self._calls_allowed(options):
            return ChatResult(generations=[ChatGeneration(message=AIMessage(
                content=text, usage_metadata=usage, response_metadata=metadata))])
        content, calls, invalid = parse_tool_calls(text)
        message = AIMessage(content=content, usage_metadata=usage, response_metadata=metadata,
                            tool_calls=[tool_call(name=c["name"], args=c["args"], id=_call_id()) for c in calls],
                            invalid_tool_calls=[invalid_tool_call(**c, id=_call_id()) for c in invalid])
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        options = self._options(stop, kwargs)
        chat, adapter = self._request(messages, options)
        tools = self._calls_allowed(options)
        text, sent = "", ""
        for piece in self.memory.generate_stream(chat, adapter, self._params(options)):
            text += piece
            # With tools, only text that cannot be part of a call goes out as content while it streams.
            content = settled_content(text)[len(sent):] if tools else piece
            if content:
                sent += content
                chunk = ChatGenerationChunk(message=AIMessageChunk(content=content))
                if run_manager:
                    run_manager.on_llm_new_token(content, chunk=chunk)
                yield chunk
        # One closing chunk carries the calls, the usage and the metadata, so they are counted once when chunks
        # are added. Calls cut short are left out: LangChain reads a chunk's arguments as partial JSON, so a
        # truncated call would come out as a call with whatever arguments it had got to.
        usage, metadata = self._metadata(chat, text, adapter, options)
        calls: list[Any] = []
        if tools:
            content, valid, _ = parse_tool_calls(text)
            calls = [tool_call_chunk(name=c["name"], args=json.dumps(c["args"], ensure_ascii=False), id=_call_id(),
                                     index=i) for i, c in enumerate(valid)]
        last = ChatGenerationChunk(message=AIMessageChunk(
            content=content[len(sent):] if tools else "", tool_call_chunks=calls, usage_metadata=usage,
            response_metadata=metadata, chunk_position="last"))
        if run_manager:  # stream listeners (LangGraph's "messages" mode) see the calls too
            run_manager.on_llm_new_token(last.text, chunk=last)
        yield last


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"
