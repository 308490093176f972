"""Tool calling for SmolLM2 (and other ChatML models): the chat template, the call format, its grammar, parsing.

SmolLM2's own chat template has no tools. `TOOL_CHAT_TEMPLATE` is that template plus two things:

- with `tools`, the system turn lists them (one JSON object per line inside `<tools></tools>`) and says how
  to call one;
- an assistant message's `tool_calls` (OpenAI's message format, as a server receives it) are written after
  its text, one Hermes-style block each:

      <tool_call>
      {"name": "lookup_order", "arguments": {"order_id": 1234}}
      </tool_call>

That is the format vLLM's `hermes` tool-call parser reads and the one its `hermes` structural tag
constrains, so `d2l-memory serve` serves this template with `--tool-call-parser hermes`. Without tools and
without calls it renders exactly as SmolLM2's template (tests check it), so the server answers plain chats
with the tokens the embedded engine produces. Tool results are `tool` turns, as SmolLM2's template already
renders them.

A 135M model does not reliably write such blocks by itself, so generation is constrained by a grammar
(`tool_grammar`): free text until the model opens `<tool_call>`, then the call's JSON, with the name one of the
tools and the arguments valid against that tool's JSON schema (`tool_choice="auto"`; SmolLM2-135M never
opened a call this way in our probes); or a call right away (`"required"`, or one tool's name); or text with
no call (`"none"`, whose prompt states no tools). The embedded engine applies it with llguidance, the offline
vLLM engine hands it to vLLM's structured outputs; the server uses vLLM's own structural tag for the same
format.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from d2l_memory.home import home

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
CALL_PREFIX = '\n{"name": "'
ARGUMENTS_PREFIX = '", "arguments": '
CALL_SUFFIX = "}\n" + TOOL_CALL_CLOSE
# How the arguments are written: compact JSON with one space after `:` and `,`, as `json.dumps` writes it
# (so a call the grammar constrains reads exactly as `call_text` renders it), no other whitespace.
JSON_STYLE = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}

DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
TOOLS_INTRO = ("\n\nYou can call these tools. Their signatures are JSON objects inside <tools></tools>:\n"
               "<tools>")
TOOLS_OUTRO = ("\n</tools>\n\nTo call a tool, answer with a JSON object holding its name and arguments inside "
               "<tool_call></tool_call> tags:\n<tool_call>\n"
               '{"name": <tool name>, "arguments": <arguments as a JSON object>}\n</tool_call>')

_TOOLS_BLOCK = ("{{- " + json.dumps(TOOLS_INTRO) + " }}"
                "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
                "{{- " + json.dumps(TOOLS_OUTRO) + " }}")
# SmolLM2's template (ChatML with a default system turn), plus the tools block (in the default system turn or
# the caller's) and the assistant's calls.
TOOL_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM + "' }}"
    "{%- if tools %}" + _TOOLS_BLOCK + "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') }}"
    "{%- if loop.first and message['role'] == 'system' and tools %}" + _TOOLS_BLOCK + "{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['tool_calls'] %}"
    "{%- for call in message['tool_calls'] %}"
    "{%- set function = call['function'] if call['function'] is defined else call %}"
    "{%- if message['content'] or not loop.first %}{{- '\\n' }}{%- endif %}"
    "{{- '<tool_call>\\n{\"name\": ' + (function['name'] | tojson) + ', \"arguments\": ' }}"
    "{%- if function['arguments'] is string %}{{- function['arguments'] }}"
    "{%- else %}{{- function['arguments'] | tojson }}{%- endif %}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
"""The tool-capable chat template for SmolLM2 (`render_chat` uses it when a request has tools)."""

TOOL_CHOICES = ("auto", "required", "none")
_NAME = re.compile(r'"name":\s*"([^"]+)"')
_CALL = re.compile(re.escape(TOOL_CALL_OPEN) + r"(.*?)(?:" + re.escape(TOOL_CALL_CLOSE) + r"|\Z)", re.S)


def tool_chat_template(tokenizer: PreTrainedTokenizerBase) -> str:
    """The template to render a request with tools for `tokenizer`'s model.

    Raises:
        ValueError: the model's own template is not ChatML (the only format this tool template extends).
    """
    if "<|im_start|>" not in (tokenizer.chat_template or ""):
        raise ValueError("tool calling needs a ChatML chat model (SmolLM2's format); this model's chat template "
                         "is another one")
    return TOOL_CHAT_TEMPLATE


def tool_name(tool: Mapping[str, Any]) -> str:
    """The function name of an OpenAI-format tool (`{"type": "function", "function": {"name": ...}}`).

    Raises:
        ValueError: not a function tool with a name.
    """
    function = tool.get("function") if tool.get("type") == "function" else None
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str) or not function["name"]:
        raise ValueError(f"a tool must be {{'type': 'function', 'function': {{'name': ..., 'parameters': ...}}}}, "
                         f"got {dict(tool)!r}")
    return function["name"]


def call_text(name: str, arguments: Mapping[str, Any] | str) -> str:
    """One call as the assistant writes it (and `TOOL_CHAT_TEMPLATE` renders it); `arguments` as an object, or
    as the JSON text a server returned (kept as it is, so a call the server could not parse stays unparsable)."""
    arguments_json = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return f"{TOOL_CALL_OPEN}{CALL_PREFIX}{name}{ARGUMENTS_PREFIX}{arguments_json}{CALL_SUFFIX}"


def calls_text(calls: Sequence[tuple[str, Mapping[str, Any] | str]]) -> str:
    """Several `(name, arguments)` calls, one per line."""
    return "\n".join(call_text(name, args) for name, args in calls)


def with_calls(content: str, calls: Sequence[tuple[str, Mapping[str, Any] | str]]) -> str:
    """An assistant turn's text: its content, then its calls on the next line."""
    return "\n".join(part for part in (content, calls_text(calls)) if part)


def tool_template_file() -> Path:
    """`TOOL_CHAT_TEMPLATE` as a file (`$D2L_MEMORY_HOME/templates/`, named by its hash), for vLLM's
    `--chat-template`; written once."""
    digest = hashlib.sha256(TOOL_CHAT_TEMPLATE.encode()).hexdigest()[:16]
    path = home() / "templates" / f"smollm2-tools-{digest}.jinja"
    if not path.is_file():
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # other processes may write it at the same time
        tmp.write_text(TOOL_CHAT_TEMPLATE)
        tmp.replace(path)
    return path


def parse_tool_calls(text: str) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]]]:
    """Split an answer into its text and its calls.

    Returns:
        `(content, calls, invalid)`: the text before the first `<tool_call>` (trailing whitespace removed);
        each well-formed call as `{"name", "args"}`; each block that is not (cut short by the token budget, not
        JSON, no name, arguments not an object) as `{"name", "args", "error"}` with `args` the block's raw
        text and `name` what it names, if anything, as LangChain's `invalid_tool_calls` hold them.
    """
    start = text.find(TOOL_CALL_OPEN)
    if start < 0:
        return text, [], []
    calls, invalid = [], []
    for block in _CALL.findall(text, start):
        # A call whose JSON is whole but whose closing tag the token budget cut is still that call.
        block = block.rstrip()
        block = block.removesuffix(next((TOOL_CALL_CLOSE[:n] for n in range(len(TOOL_CALL_CLOSE), 0, -1)
                                         if block.endswith(TOOL_CALL_CLOSE[:n])), ""))
        try:
            call = json.loads(block)
            error = "a call needs a string 'name' and an object 'arguments'"
        except ValueError as exc:
            call, error = None, f"not JSON ({exc})"
        name = call.get("name") if isinstance(call, dict) else None
        args = call.get("arguments", {}) if isinstance(call, dict) else None
        if isinstance(name, str) and isinstance(args, dict):
            calls.append({"name": name, "args": args})
        else:
            named = _NAME.search(block)
            invalid.append({"name": named.group(1) if named else None, "args": block.strip(), "error": error})
    return text[:start].rstrip(), calls, invalid


def settled_content(text: str) -> str:
    """The part of a partial answer that is content for sure, whatever follows: the text before
    `<tool_call>`, less a tail that may be the start of one, less trailing whitespace (the parsed content
    has none)."""
    end = text.find(TOOL_CALL_OPEN)
    if end < 0:
        end = len(text) - next((n for n in range(len(TOOL_CALL_OPEN) - 1, 0, -1)
                                if text.endswith(TOOL_CALL_OPEN[:n])), 0)
    return text[:end].rstrip()


def check_tool_choice(tools: Sequence[Mapping[str, Any]], tool_choice: str) -> None:
    """Refuse a `tool_choice` that is neither `auto`, `required`, `none` nor the name of one of `tools`.

    Raises:
        ValueError: the choice names no tool, or a call is required with no tools.
    """
    names = [tool_name(t) for t in tools]
    if tool_choice not in TOOL_CHOICES and tool_choice not in names:
        raise ValueError(f"tool_choice must be one of {TOOL_CHOICES} or a tool's name {names}, got {tool_choice!r}")
    if tool_choice == "required" and not names:
        raise ValueError("tool_choice='required' needs at least one tool")


def tool_grammar(tools: Sequence[Mapping[str, Any]], tool_choice: str = "auto", parallel: bool = True) -> str | None:
    """The Lark grammar (llguidance's dialect, which vLLM's `guidance` backend reads too) that an answer with
    tools must match, or None without tools.

    `auto`: text without `<tool_call>`, or such text, `<tool_call>` and then a call; `required`: a call right
    away; a tool's name: a call of that tool right away; `none`: text without `<tool_call>` (a model that has
    seen calls in its history would otherwise write one as text). A call is `CALL_PREFIX name
    ARGUMENTS_PREFIX <arguments> CALL_SUFFIX` with the arguments valid against the tool's `parameters` schema
    (any object when it has none). With `parallel`, more calls may follow a call, each on its own line;
    without, the answer ends after the first.
    """
    if not tools:
        return None
    check_tool_choice(tools, tool_choice)
    text = f"TEXT: /(.|\\n)*/ & ~/(.|\\n)*{re.escape(TOOL_CALL_OPEN)}(.|\\n)*/"
    if tool_choice == "none":
        return f"%llguidance {{}}\nstart: TEXT\n{text}\n"
    chosen = [t for t in tools if tool_choice in ("auto", "required") or tool_name(t) == tool_choice]
    bodies = [f"{_lark_text(CALL_PREFIX + tool_name(t) + ARGUMENTS_PREFIX)} %json "
              f"{json.dumps(_arguments_schema(t), ensure_ascii=False)} {_lark_text(CALL_SUFFIX)}" for t in chosen]
    rules = ["%llguidance {}", "call: " + " | ".join(bodies),
             "calls: " + (f'call ("\\n" {_lark_text(TOOL_CALL_OPEN)} call)*' if parallel else "call")]
    if tool_choice == "auto":
        # A lazy lexeme ends at the first `<tool_call>`: from there on only a call can follow.
        rules += ["start: TEXT | opened calls", text, f"opened[lazy]: TEXT {_lark_text(TOOL_CALL_OPEN)}"]
    else:
        rules += [f"start: {_lark_text(TOOL_CALL_OPEN)} calls"]
    return "\n".join(rules) + "\n"


def json_grammar(schema: Mapping[str, Any]) -> str:
    """The Lark grammar of an answer that is one JSON value valid against `schema` (structured output), written
    as tool arguments are (`JSON_STYLE`), with `additionalProperties: false` where `strict_schema` sets it.

    Raises:
        ValueError: `schema` is not a JSON object schema (a mapping).
    """
    if not isinstance(schema, Mapping):
        raise ValueError(f"a JSON schema must be a mapping, got {type(schema).__name__}")
    constrained = {**strict_schema(dict(schema)), "x-guidance": JSON_STYLE}
    return f"%llguidance {{}}\nstart: %json {json.dumps(constrained, ensure_ascii=False)}\n"


def _arguments_schema(tool: Mapping[str, Any]) -> dict[str, Any]:
    parameters = tool["function"].get("parameters") or {"type": "object", "properties": {}}
    return {**strict_schema(parameters), "x-guidance": JSON_STYLE}


def strict_schema(schema: Any) -> Any:
    """`schema` with `additionalProperties: false` on every object schema that lists `properties` and leaves
    it unset, as OpenAI's strict mode and xgrammar's read it: otherwise any key is valid, and a small model
    under the grammar writes keys of its own (seen: the tool's signature echoed as its arguments)."""
    if isinstance(schema, list):
        return [strict_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in ("properties", "$defs", "definitions", "patternProperties"):
        if isinstance(out.get(key), dict):
            out[key] = {name: strict_schema(sub) for name, sub in out[key].items()}
    for key in ("items", "prefixItems", "anyOf", "oneOf", "allOf", "not", "additionalProperties"):
        if key in out:
            out[key] = strict_schema(out[key])
    if "properties" in out:
        out.setdefault("additionalProperties", False)
    return out


def _lark_text(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)
