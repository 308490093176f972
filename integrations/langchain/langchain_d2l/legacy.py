"""`D2LClassicMemory`: d2l-memory as a `langchain_classic` `BaseMemory`, for legacy chains. **Legacy.**

`BaseMemory` is deprecated in LangChain (since 0.3.3, removal in 2.0) and gone from langchain-core 1.x;
new code should use `D2LMemoryMiddleware` with `create_agent`, or `D2LStore`. Needs the `classic` extra:
`pip install "langchain-d2l[classic]"`.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from d2l_memory import D2LMemory

try:
    from langchain_classic.base_memory import BaseMemory
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "langchain_d2l.legacy needs langchain-classic: pip install 'langchain-d2l[classic]'"
    ) from exc


class D2LClassicMemory(BaseMemory):
    """Legacy `BaseMemory` adapter: loads the user's relevant memories as text, saves each exchange.

    `load_memory_variables` returns the text of the memories relevant to the chain input (what
    `D2LMemory.relevant` returns, joined by blank lines; empty when nothing is relevant) under
    `memory_key`. `save_context` absorbs the input and output as a `chat` memory; `clear` forgets all of
    the user's memories. Only text reaches the prompt here: legacy chains have no way to apply adapters.

    Example:
        ```python
        memory = D2LClassicMemory(memory=D2LMemory("./memories"), user_id="alice")
        memory.save_context({"input": "My dog is Pixel."}, {"output": "Nice name!"})
        memory.load_memory_variables({"input": "What is my dog called?"})  # {"history": "User: My dog..."}
        ```
    """

    memory: D2LMemory = Field(exclude=True, repr=False)
    user_id: str
    memory_key: str = "history"
    """The chain input variable the recalled text is put in."""
    input_key: str | None = None
    """The chain input that holds the query; None: the only input other than `memory_key`."""
    output_key: str | None = None
    """The chain output to save; None: the only output."""
    k: int | None = None

    @property
    def memory_variables(self) -> list[str]:
        return [self.memory_key]

    def _input(self, inputs: dict[str, Any]) -> str:
        if self.input_key is not None:
            return str(inputs[self.input_key])
        keys = [k for k in inputs if k not in (self.memory_key, "stop")]
        if len(keys) != 1:
            raise ValueError(f"D2LClassicMemory cannot tell the input among {keys}: set input_key")
        return str(inputs[keys[0]])

    def load_memory_variables(self, inputs: dict[str, Any]) -> dict[str, Any]:
        hits = self.memory.relevant(self._input(inputs), self.user_id, self.k)
        return {self.memory_key: "\n\n".join(h.text for h in hits if h.text)}

    def save_context(self, inputs: dict[str, Any], outputs: dict[str, str]) -> None:
        if self.output_key is None and len(outputs) != 1:
            raise ValueError(f"D2LClassicMemory cannot tell the output among {list(outputs)}: set output_key")
        output = outputs[self.output_key] if self.output_key is not None else next(iter(outputs.values()))
        self.memory.absorb_messages([("user", self._input(inputs)), ("assistant", str(output))], self.user_id)

    def clear(self) -> None:
        self.memory.forget(user_id=self.user_id)
