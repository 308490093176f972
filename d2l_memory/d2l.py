"""`DocToLoRA`: a document in, a LoRA adapter out, in one forward pass (no gradient steps).

text -> chunks (chat turns) -> frozen base model (per-layer activations) -> hypernetwork -> per-chunk
rank-`chunk_rank` factors -> concatenated along the rank with the learned rank-r bias slot -> `LoRA` of rank
K chunk_rank + r (chunk_rank = r without fast-only slots).
Chunks are encoded a few at a time and only their small factors are kept, so memory stays flat in
the document length.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from d2l_memory.chunking import chunk_document
from d2l_memory.encoder import ContextFeatures, encode
from d2l_memory.hypernet import HyperLoRA, HypernetConfig
from d2l_memory.lora import LoRA
from d2l_memory.models import LoadedModel, load_model

CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"
WEIGHTS, CONFIG = "hypernet.safetensors", "config.json"


def shipped_checkpoint(base_model: str) -> Path:
    """The directory of the hypernetwork shipped for a registered base model."""
    return CHECKPOINTS / base_model


def micro_batches(lengths: Sequence[int], pass_tokens: int) -> list[list[int]]:
    """Indices of sequences grouped, shortest first, so that each group padded to its longest member
    holds at most `pass_tokens` positions (a sequence longer than that is a group of its own)."""
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if groups and (len(groups[-1]) + 1) * lengths[i] <= pass_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


class DocToLoRA:
    """A frozen base model and the hypernetwork that writes adapters for it.

    Args:
        base: the loaded base model (shared with engines; never modified).
        hypernet: the hypernetwork; its `config.base_model` must name `base`.
        pass_tokens: padded tokens per encoder pass (chunks are grouped by length into passes of at
            most this many positions, so memory stays flat and short chunks are not padded to long ones).
    """

    def __init__(self, base: LoadedModel, hypernet: HyperLoRA, pass_tokens: int = 2048) -> None:
        if hypernet.config.base_model != base.model_id:
            raise ValueError(f"hypernetwork was trained for '{hypernet.config.base_model}', "
                             f"base model is '{base.model_id}'")
        self.base = base
        self.hypernet = hypernet
        self.config = hypernet.config
        self.pass_tokens = pass_tokens
        self._checksum: str | None = None
        self.max_positions = int(getattr(base.model.config, "max_position_embeddings", 8192))

    # -- construction and files ----------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, checkpoint: str | Path | None = None, base: LoadedModel | None = None,
                        dtype: torch.dtype = torch.float32) -> DocToLoRA:
        """Load a hypernetwork checkpoint (default: the one shipped for `smollm2-135m-instruct`).

        Raises:
            FileNotFoundError: no checkpoint at that path.
        """
        directory = Path(checkpoint) if checkpoint is not None else shipped_checkpoint(
            base.model_id if base is not None else "smollm2-135m-instruct")
        if not (directory / CONFIG).is_file():
            raise FileNotFoundError(f"no hypernetwork checkpoint in {directory} (expected {CONFIG} + {WEIGHTS})")
        config = HypernetConfig.model_validate_json((directory / CONFIG).read_text())
        base = base if base is not None else load_model(config.base_model, dtype=dtype)
        hypernet = HyperLoRA(config)
        state = load_file(directory / WEIGHTS)
        hypernet.load_state_dict({k: v.float() for k, v in state.items()})
        return cls(base, hypernet.eval())

    @classmethod
    def untrained(cls, config: HypernetConfig, base: LoadedModel | None = None, seed: int = 0) -> DocToLoRA:
        """A freshly initialised hypernetwork (emits exactly-zero deltas until trained)."""
        torch.manual_seed(seed)
        return cls(base if base is not None else load_model(config.base_model), HyperLoRA(config))

    def save(self, directory: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
        """Write `config.json` + `hypernet.safetensors` (weights in `dtype`)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to(dtype).contiguous() for k, v in self.hypernet.state_dict().items()}
        save_file(state, directory / WEIGHTS)
        (directory / CONFIG).write_text(json.dumps(self.config.model_dump(), indent=1))
        return directory

    @property
    def checksum(self) -> str:
        """Provenance of the adapters this instance writes (recomputed after training changes it)."""
        if self._checksum is None or self.hypernet.training:
            self._checksum = self.hypernet.checksum()
        return self._checksum

    @property
    def bias_rows(self) -> int:
        """Rows of the bias slot at the end of every adapter's rank (0 without one)."""
        return self.config.rank if self.hypernet.bias() is not None else 0

    # -- the forward pass ----------------------------------------------------------------------
    def chunks(self, text: str) -> list[list[int]]:
        """The wrapped token ids of each chunk of `text` (validates the text)."""
        return chunk_document(self.base.tokenizer, text, self.config.chunk_tokens, self.max_positions)

    def chunk_factors(self, chunks: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Factors for wrapped chunks: `A [K, L, R, d_in]`, `B [K, L, d_out, R]` (`R = config.chunk_rank`), in order.

        Encoded in passes of similar-length chunks (`micro_batches`): one pass over a mixed batch pads
        every chunk to the longest, and in training most positions were padding. Gradients flow into the
        hypernetwork when it is in training mode; never into the base model.
        """
        passes = micro_batches([len(c) for c in chunks], self.pass_tokens)
        parts = [self._pass([chunks[i] for i in group]) for group in passes]
        order = torch.tensor([i for group in passes for i in group])
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(len(order))
        return torch.cat([a for a, _ in parts])[inverse], torch.cat([b for _, b in parts])[inverse]

    def _pass(self, chunks: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.hypernet(self.features(chunks))

    def features(self, chunks: Sequence[list[int]]) -> ContextFeatures:
        """What the hypernetwork reads from wrapped chunks (one encoder pass, padded to the longest)."""
        pad = self.base.tokenizer.pad_token_id or 0
        width = max(len(c) for c in chunks)
        ids = torch.full((len(chunks), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunks), width), dtype=torch.long)
        for i, chunk in enumerate(chunks):
            ids[i, : len(chunk)] = torch.tensor(chunk)
            mask[i, : len(chunk)] = 1
        c = self.config
        with self.base.lock:  # the encoder's hooks must not meet an engine's on the shared model
            return encode(self.base.model, ids, mask, c.layers, c.target, c.hidden_layers(), c.encoder,
                          c.early_exit_layers, with_keys=c.fast_weights)

    def assemble(self, a_chunks: torch.Tensor, b_chunks: torch.Tensor,
                 rows: Sequence[Sequence[tuple[int, float]]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row adapters from per-chunk factors: the one assembly serving and training share.

        Row i stacks the chunks `rows[i]` (pairs of chunk index into `a_chunks [K, L, R_c, d_in]` /
        `b_chunks [K, L, d_out, R_c]`, `R_c = config.chunk_rank`, and weight) along the rank, each weight
        folded into its A rows, zero-pads to the widest row, then appends the bias slot once, unweighted
        (as `LoRA.concat` composes stored memories):

            delta_W_i = scale * (sum_{(k, w) in rows[i]} w * B_k A_k + B_bias A_bias)

        Returns:
            `A [n_rows, L, R, d_in]`, `B [n_rows, L, d_out, R]` with `R = max_i len(rows[i]) * R_c (+ r bias)`;
            gradients flow through when the factors carry them.
        """
        n_layers, r, d_in, d_out = a_chunks.shape[1], a_chunks.shape[2], self.config.d_in, self.config.d_out
        width = max(len(row) for row in rows) * r
        a_rows, b_rows = [], []
        for row in rows:
            index = torch.tensor([k for k, _ in row], dtype=torch.long)
            weight = torch.tensor([w for _, w in row], dtype=a_chunks.dtype)
            a_i = (a_chunks[index] * weight[:, None, None, None]).permute(1, 0, 2, 3).reshape(n_layers, -1, d_in)
            b_i = b_chunks[index].permute(1, 2, 0, 3).reshape(n_layers, d_out, -1)
            pad = width - len(row) * r
            a_rows.append(torch.nn.functional.pad(a_i, (0, 0, 0, pad)))
            b_rows.append(torch.nn.functional.pad(b_i, (0, pad)))
        a_all, b_all = torch.stack(a_rows), torch.stack(b_rows)
        bias = self.hypernet.bias()
        if bias is not None:
            a_all = torch.cat([a_all, bias[0].expand(len(rows), -1, -1, -1).to(a_all.dtype)], dim=2)
            b_all = torch.cat([b_all, bias[1].expand(len(rows), -1, -1, -1).to(b_all.dtype)], dim=3)
        return a_all, b_all

    def _lora(self, a_chunks: torch.Tensor, b_chunks: torch.Tensor) -> LoRA:
        a, b = self.assemble(a_chunks, b_chunks, [[(k, 1.0) for k in range(a_chunks.shape[0])]])
        weights = {name: (a[0, j].detach().float(), b[0, j].detach().float())
                   for j, name in enumerate(self.config.module_names())}
        return LoRA(weights, scale=self.config.scale, base_model=self.base.model_id, hypernet=self.checksum,
                    n_chunks=a_chunks.shape[0], bias_rows=self.bias_rows)

    def internalize(self, text: str) -> LoRA:
        """Turn `text` into an adapter: rank `K chunk_rank + r` for K chunks (`+ r`: the bias slot; without
        fast-only slots, `(K+1) r`).

        Raises:
            TypeError / ValueError: `text` is not a non-empty str (see `chunking.validate_text`).
        """
        return self.internalize_batch([text])[0]

    @torch.no_grad()
    def internalize_batch(self, texts: Sequence[str]) -> list[LoRA]:
        """`internalize` for several texts (their chunks share encoder passes)."""
        per_text = [self.chunks(t) for t in texts]
        a_all, b_all = self.chunk_factors([c for chunks in per_text for c in chunks])
        out, offset = [], 0
        for chunks in per_text:
            out.append(self._lora(a_all[offset : offset + len(chunks)], b_all[offset : offset + len(chunks)]))
            offset += len(chunks)
        return out
