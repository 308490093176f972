"""The embedded engine: one frozen transformers model, adapters applied functionally per batch row.

The base model is loaded once. An adapter never changes or reloads it: `functional.lora_applied` adds
`scale * B (A x)` to the target linears for the duration of one call, a different adapter (or none)
per batch row, so requests of several users share one batch. Prompts use the model's chat template
with the generation prompt (`render_chat`: contents as plain text, cut to the model's window less the
answer's tokens); batches are left-padded so every row continues from its last prompt token.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from d2l_memory.engines.base import Adapter, Engine, GenerationParams, Message, cut_at_stop, render_chat
from d2l_memory.engines.guided import Guide, guide_tokenizer
from d2l_memory.functional import Factors, applied, lora_applied, module_shapes, stack
from d2l_memory.lora import LoRA
from d2l_memory.models import DEFAULT_MODEL, LoadedModel, load_model


class TransformersEngine(Engine):
    """Generation with transformers on CPU (or a GPU), no server and no extra process.

    Args:
        model: a registry name, local directory or Hugging Face id (see `models.load_model`).
        dtype: weight dtype; float32 matches vLLM's float32 tokens exactly.
        loaded: an already loaded base model to share (e.g. with the hypernetwork's encoder).
        device: where to run; the model is moved there once.
    """

    def __init__(self, model: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32,
                 loaded: LoadedModel | None = None, device: str = "cpu") -> None:
        self.loaded = loaded or load_model(model, dtype=dtype)
        self.model = self.loaded.model.to(device)
        self.tokenizer = self.loaded.tokenizer
        self.model_id = self.loaded.model_id
        self.device = torch.device(device)
        self._shapes = module_shapes(self.model)
        self.window = int(getattr(self.model.config, "max_position_embeddings", 8192))
        eos = self.model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        self._eos = {int(t) for t in eos} | {self.tokenizer.eos_token_id}
        self._pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self._eos)
        # The hooks live on the shared model for the length of a call: one call at a time, shared with
        # the hypernetwork's encoder when it reads documents through the same model.
        self._lock = self.loaded.lock
        self._guide_tokenizer: Any = None

    def _lora(self, adapter: Adapter | None) -> LoRA | None:
        if adapter is None:
            return None
        lora = adapter if isinstance(adapter, LoRA) else adapter.lora
        lora.validate(shapes=self._shapes, base_model=self.model_id if lora.base_model else None)
        return lora

    def generate(self, messages: Sequence[Message], adapter: Adapter | None = None,
                 params: GenerationParams | None = None) -> str:
        return self.generate_batch([(messages, adapter)], params)[0]

    def generate_batch(self, requests: Sequence[tuple[Sequence[Message], Adapter | None]],
                       params: GenerationParams | None = None) -> list[str]:
        """Answer all requests in one left-padded batch, each row with its own adapter.

        Raises:
            AdapterError: an adapter with non-finite values, or made for another model or module shapes.
        """
        if not requests:
            return []
        params = params or GenerationParams()
        if params.grammar is not None:  # constrained answers go through the token loop, one at a time
            return ["".join(self.stream(messages, adapter, params)) for messages, adapter in requests]
        prompts = [self._prompt(messages, params) for messages, _ in requests]
        loras = [self._lora(adapter) for _, adapter in requests]
        width = max(map(len, prompts))
        ids = torch.tensor([[self._pad] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        if params.temperature > 0:
            sampling = {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p}
        else:  # None overrides the sampling defaults of the model's generation_config
            sampling = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        if params.stop:
            sampling |= {"stop_strings": list(params.stop), "tokenizer": self.tokenizer}
        per_row = loras if any(lo is not None for lo in loras) else None
        with self._lock, lora_applied(self.model, per_row), torch.inference_mode():
            if params.seed is not None:
                torch.manual_seed(params.seed)
            out = self.model.generate(input_ids=ids, attention_mask=mask, pad_token_id=self._pad,
                                      max_new_tokens=params.max_new_tokens, eos_token_id=sorted(self._eos),
                                      **sampling)
        return [cut_at_stop(self._decode(row[width:]), params.stop)[0] for row in out.tolist()]

    def _prompt(self, messages: Sequence[Message], params: GenerationParams) -> list[int]:
        return render_chat(self.tokenizer, messages, max_tokens=max(1, self.window - params.max_new_tokens),
                           tools=params.stated_tools)

    def _guide(self, params: GenerationParams) -> Guide | None:
        grammar = params.grammar
        if grammar is None:
            return None
        with self._lock:  # built once, on the first constrained answer
            if self._guide_tokenizer is None:
                self._guide_tokenizer = guide_tokenizer(self.tokenizer)
        return Guide(self._guide_tokenizer, grammar)

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def stream(self, messages: Sequence[Message], adapter: Adapter | None = None,
               params: GenerationParams | None = None) -> Iterator[str]:
        """Yield the answer in pieces: a token-by-token loop over the KV cache, same tokens as `generate`.

        The generator may be stepped and closed from any thread; the model is locked only while a token
        is computed.

        Text that might be the start of a stop string, or half of a multi-byte character, is held back
        until the next token decides it.

        With tools, each token is picked among those `tool_calls.tool_grammar` allows (llguidance), and the
        text the grammar forces is fed in one step; those tokens count towards `max_new_tokens`.
        """
        params = params or GenerationParams()
        ids = torch.tensor([self._prompt(messages, params)], device=self.device)
        lora = self._lora(adapter)
        # Stacked once per answer (a dtype copy of every factor); only the hooks are set per token.
        factors = stack([lora], self.model.dtype, self.device) if lora is not None else ({}, 1.0)
        return self._stream(ids, factors, params, self._guide(params))

    def _stream(self, ids: torch.Tensor, factors: tuple[Factors, float], params: GenerationParams,
                guide: Guide | None = None) -> Iterator[str]:
        hold = max((len(s) for s in params.stop), default=1) - 1
        rng = torch.Generator(device=self.device)
        if params.seed is not None:
            rng.manual_seed(params.seed)
        tokens: list[int] = []
        sent = ""
        out = self._forward(factors, input_ids=ids)
        while len(tokens) < params.max_new_tokens:
            logits = out.logits[0, -1]
            token = self._pick(guide.mask(logits) if guide else logits, params, rng)
            if token in self._eos:
                break
            new = ([token, *guide.advance(token)] if guide else [token])[: params.max_new_tokens - len(tokens)]
            tokens.extend(new)
            text, stopped = cut_at_stop(self._decode(tokens), params.stop)
            if stopped or (guide and guide.stopped):
                break
            ready = text[: len(text) - hold] if hold else text
            if len(ready) > len(sent) and not ready.endswith("\ufffd"):
                yield ready[len(sent):]
                sent = ready
            out = self._forward(factors, input_ids=torch.tensor([new], device=self.device),
                                past_key_values=out.past_key_values)
        text = cut_at_stop(self._decode(tokens), params.stop)[0]
        if len(text) > len(sent):
            yield text[len(sent):]

    def _forward(self, factors: tuple[Factors, float], **inputs: torch.Tensor | Cache) -> CausalLMOutputWithPast:
        # The lock and the adapter's hooks are held for one forward pass, never across a `yield`: a stream
        # may then be stepped from any thread (a web server's pool) and closed from any, and other users'
        # requests interleave with its tokens instead of waiting for the whole answer.
        with self._lock, applied(self.model, *factors), torch.inference_mode():
            return self.model(**inputs, use_cache=True)

    @staticmethod
    def _pick(logits: torch.Tensor, params: GenerationParams, rng: torch.Generator) -> int:
        if params.temperature == 0:
            return int(logits.argmax())
        probs = torch.softmax(logits.float() / params.temperature, -1)
        if params.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            outside = sorted_p.cumsum(-1) - sorted_p >= params.top_p  # keep the smallest set reaching top_p
            probs = probs.scatter(0, order[outside], 0.0)
        return int(torch.multinomial(probs / probs.sum(), 1, generator=rng))

    def close(self) -> None:
        """Drop the engine's references to the model; memory is freed once nothing else holds it."""
        del self.model, self.loaded
