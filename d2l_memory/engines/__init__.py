"""Generation engines behind one interface: `transformers` (embedded), `vllm` (offline), `vllm-server`.

Engines are imported when made, so `import d2l_memory.engines` never imports vLLM.
"""

from __future__ import annotations

from typing import Any, Literal

from d2l_memory.engines.base import Adapter, Engine, GenerationParams, Message
from d2l_memory.models import DEFAULT_MODEL

EngineKind = Literal["transformers", "vllm", "vllm-server"]

__all__ = ["Adapter", "Engine", "EngineKind", "GenerationParams", "Message", "make_engine"]


def make_engine(kind: EngineKind = "transformers", model: str = DEFAULT_MODEL, **kw: Any) -> Engine:
    """Build an engine by kind.

    Args:
        kind: "transformers" (`TransformersEngine`), "vllm" (`VLLMEngine`) or "vllm-server"
            (`VLLMServerEngine`: starts a server unless `url=` is given).
        model: the base model (a registry name, directory or Hugging Face id).
        **kw: passed to the engine's constructor.

    Raises:
        ValueError: an unknown kind.
    """
    if kind == "transformers":
        from d2l_memory.engines.transformers_engine import TransformersEngine

        return TransformersEngine(model, **kw)
    if kind == "vllm":
        from d2l_memory.engines.vllm_engine import VLLMEngine

        return VLLMEngine(model, **kw)
    if kind == "vllm-server":
        from d2l_memory.engines.vllm_server import ServerConfig, VLLMServerEngine

        # Which modules carry LoRA is the server's setting: given to one we start, moot for a running one.
        targets = kw.pop("lora_target_modules", None)
        if "url" in kw:
            return VLLMServerEngine(model=model, **kw)
        server = kw.pop("server", None) or ServerConfig(model=model, lora_target_modules=targets)
        return VLLMServerEngine(server=server, model=model, **kw)
    raise ValueError(f"unknown engine kind {kind!r}; expected 'transformers', 'vllm' or 'vllm-server'")
