"""The Doc-to-LoRA hypernetwork: per-layer document activations in, rank-r LoRA factors out.

Pipeline for one chunk (paper §3; official code `ctx_to_lora/modeling/hypernet.py`, re-derived):

1. input projection: RMSNorm + SwiGLU from the base model's width D to the latent width d, plus a
   learned embedding of the target layer (one shared Perceiver serves all layers, folded into the batch);
2. Perceiver aggregator: `n_latents` learned latents cross-attend to the chunk tokens (keys and values
   from the tokens only, no self-attention), pre/post RMSNorm, SwiGLU, `n_blocks` times;
3. decoder: one learned query per rank slot cross-attends to the latents;
4. per-layer residual MLP, L2 normalisation, per-layer linear head -> one row of A (d_in) and one row of
   B^T (d_out) per rank slot;
5. learned per-(layer, rank) scalers, A's at 1 and B's at 0, so a fresh network emits delta_W = 0;
6. a learned document-independent bias LoRA, appended as r extra rank slots when adapters are built.

Deviations, and why:
- Sized for a 2-core CPU (defaults: d=256, 2 Perceiver blocks, input SwiGLU of width d) instead of the
  paper's d=512, 8-9 blocks and 4D-wide input projection: the paper's 309M parameters would not train
  here. By default one shared aggregator pass reads one block's activations and its decoder emits
  L x r slot queries (the paper's NIAH configuration); `layer_to_layer=True` runs the paper's main
  configuration (one pass per target layer), L times the aggregator cost.
- Fast-weight path (`fast_weights`, on by default): each rank slot also attends directly over the chunk
  tokens and writes the attended tokens' *target-module input activations* (keys, same space as the
  activations the adapted linear sees at question time) into its A row and the attended tokens'
  *successor embeddings* (values; tied embeddings make them logit directions) into its B row, so
  `delta_W = sum_i b_i a_i^T` is a key-value memory from the start. A measured prototype of the plain
  design never used the document on this compute budget (issue #4); this gives the gradient a short
  path from the document to the adapter.
- Fast-only slots (`fast_slots`, default 0): extra rank slots per layer with their own decoder queries
  that write only the fast-weight key-value pair (no head rows), so a chunk's adapter has
  `chunk_rank = rank + fast_slots` rows per layer. The `rank` slots pick only a few distinct tokens of a
  chunk (docs/training.md, "What the fast-weight path writes"), while every token of every told value
  needs a pair of its own; these slots add that capacity without widening the head. Their B scalers
  start at zero, so they can be added to a trained network without changing what it emits.
- Learned key and value maps (`fast_map_rank`, default 0): a raw key is the module input *at the
  document token*, but the adapter is read at the *answer*, whose module input is nearly orthogonal to
  it (docs/training.md, "Where the fast-weight keys point"). Rank-q residual maps per layer,
  `a = k + (k V_l) U_l` and `b = e + (e V'_l) U'_l`, let training move keys into the space the answer
  position reads and values into the space later blocks turn into the told tokens. `U` starts at zero,
  so the maps too can be added to a trained network without changing what it emits.
"""

from __future__ import annotations

import hashlib
import math
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from d2l_memory.encoder import ContextFeatures

if TYPE_CHECKING:
    from d2l_memory.models import LoadedModel


class HypernetConfig(BaseModel):
    """Shape of a hypernetwork and of the adapters it emits (saved beside the checkpoint)."""

    model_config = ConfigDict(extra="forbid")

    base_model: str = "smollm2-135m-instruct"
    hidden_size: int = Field(576, description="base model width D")
    target: str = Field("mlp.down_proj", description="adapted module inside each block")
    d_in: int = Field(1536, description="input width of the target module")
    d_out: int = Field(576, description="output width of the target module")
    layers: list[int] = Field(default_factory=lambda: list(range(30)), description="target blocks")
    rank: int = 8
    encoder: Literal["per_layer", "early_exit"] = "per_layer"
    early_exit_layers: int = 8
    layer_to_layer: bool = Field(False, description="one Perceiver pass per target layer (paper main) or "
                                 "one shared pass whose decoder emits L x r slots (paper NIAH)")
    feature_layer: int | None = Field(None, description="block whose input the shared pass reads "
                                      "(default: the first target layer)")
    latent_dim: int = 256
    n_latents: int = 8
    n_blocks: int = 2
    n_heads: int = 4
    mlp_ratio: int = 2
    fast_weights: bool = True
    fast_slots: int = Field(0, ge=0, description="extra rank slots per layer that only the fast-weight path "
                            "writes (needs fast_weights)")
    fast_map_rank: int = Field(0, ge=0, description="rank of the learned residual maps on the fast-weight keys "
                               "and values (0: raw module inputs and successor embeddings)")
    bias_lora: bool = True
    scale: float = Field(1.0, description="delta_W = scale * B A")
    chunk_tokens: int = Field(512, description="document tokens per chunk")

    @model_validator(mode="after")
    def _check(self) -> HypernetConfig:
        if not self.layers or sorted(set(self.layers)) != self.layers:
            raise ValueError("layers must be a non-empty ascending list of distinct block indices")
        if self.fast_weights and self.encoder != "per_layer":
            raise ValueError("fast_weights needs encoder='per_layer' (keys are per-layer activations)")
        if (self.fast_slots or self.fast_map_rank) and not self.fast_weights:
            raise ValueError("fast_slots and fast_map_rank need fast_weights=true (they act on the fast-weight "
                             "key-value pairs)")
        if self.layer_to_layer and self.encoder != "per_layer":
            raise ValueError("layer_to_layer needs encoder='per_layer'")
        if self.rank < 1 or self.chunk_tokens < 16:
            raise ValueError("rank must be >= 1 and chunk_tokens >= 16")
        return self

    @classmethod
    def for_model(cls, loaded: LoadedModel, **fields: Any) -> HypernetConfig:
        """A config that fits `loaded`: `base_model`, `hidden_size` (the embedding width D), `d_in`/`d_out`
        (the `target` linear's widths) and `layers` (every block) are read from the model; `fields` set any
        other field (`target`, `layers`, `rank`, ...), and those that the model determines are checked.

        Works for any decoder-only transformers model whose blocks are `model.layers` (Llama, Qwen, Mistral,
        Gemma, Phi-3, OLMo...). Training calls it with the fields a config gives explicitly, so a new run on
        another base model needs only `hypernet.base_model`.

        Raises:
            ValueError: the model has no `model.layers`; `target` is not a linear module of every target
                block (the message lists the linears there are); a given width, base model or layer does not
                fit the model; `fast_weights` with `d_out` other than D (its B rows are token embeddings:
                target a module that writes the residual stream, e.g. `mlp.down_proj` or `self_attn.o_proj`,
                or set `fast_weights=false`); a tokenizer without a chat template (training, chunking and
                serving all read documents and questions as chat turns).
        """
        model = loaded.model
        blocks = getattr(getattr(model, "model", None), "layers", None)
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
            raise ValueError(f"{type(model).__name__} has no decoder blocks at model.layers: d2l-memory adapts "
                             "decoder-only models laid out as transformers' Llama, Qwen, Mistral and Gemma are")
        layers = fields.get("layers", list(range(len(blocks))))
        if any(not 0 <= layer < len(blocks) for layer in layers):
            raise ValueError(f"hypernet.layers={layers} does not fit {loaded.model_id}, which has blocks "
                             f"0..{len(blocks) - 1}")
        target = fields.get("target", cls.model_fields["target"].default)
        shapes = set()
        for layer in layers:
            module = dict(blocks[layer].named_modules()).get(target)
            if not isinstance(module, nn.Linear):
                linears = sorted(n for n, m in blocks[layer].named_modules() if isinstance(m, nn.Linear))
                raise ValueError(f"hypernet.target={target!r} is not a linear module of block {layer} of "
                                 f"{loaded.model_id}; its linear modules are {linears}")
            shapes.add((module.in_features, module.out_features))
        if len(shapes) > 1:
            raise ValueError(f"{target} has different widths across hypernet.layers ({sorted(shapes)}): "
                             "choose layers whose target modules are alike")
        ((d_in, d_out),) = shapes
        derived = {"base_model": loaded.model_id, "hidden_size": model.get_input_embeddings().embedding_dim,
                   "d_in": d_in, "d_out": d_out}
        for key, value in derived.items():
            if key in fields and fields[key] != value:
                raise ValueError(f"hypernet.{key}={fields[key]!r} does not fit {loaded.model_id}, whose value is "
                                 f"{value!r}: leave it out to read it from the model")
        config = cls(**{**fields, **derived, "layers": layers})
        if config.fast_weights and config.d_out != config.hidden_size:
            raise ValueError(f"fast_weights writes token embeddings (width {config.hidden_size}) into B, but "
                             f"{target} writes {config.d_out}: target a module that writes the residual stream "
                             "(mlp.down_proj, self_attn.o_proj) or set fast_weights=false")
        if not getattr(loaded.tokenizer, "chat_template", None):
            raise ValueError(f"the tokenizer of {loaded.model_id} has no chat template, which d2l-memory reads "
                             "documents and questions through: add one (tokenizer_config.json 'chat_template')")
        return config

    @property
    def chunk_rank(self) -> int:
        """Rank rows one chunk's adapter has per layer: the head's `rank` slots plus the fast-only slots."""
        return self.rank + self.fast_slots

    def hidden_layers(self) -> list[int]:
        """The blocks whose input hidden state the aggregator reads."""
        if self.layer_to_layer:
            return self.layers
        return [self.feature_layer if self.feature_layer is not None else self.layers[0]]

    def module_names(self) -> list[str]:
        return [f"model.layers.{layer}.{self.target}" for layer in self.layers]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class SwiGLU(nn.Module):
    def __init__(self, dim_in: int, hidden: int, dim_out: int) -> None:
        super().__init__()
        self.gate = nn.Linear(dim_in, hidden, bias=False)
        self.up = nn.Linear(dim_in, hidden, bias=False)
        self.down = nn.Linear(hidden, dim_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class CrossAttentionBlock(nn.Module):
    """Queries attend to a memory (no self-attention); pre/post RMSNorm, residual, SwiGLU."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm_q, self.norm_kv = RMSNorm(dim), RMSNorm(dim)
        self.q, self.kv, self.o = nn.Linear(dim, dim, bias=False), nn.Linear(dim, 2 * dim, bias=False), \
            nn.Linear(dim, dim, bias=False)
        self.post_attn, self.norm_mlp, self.post_mlp = RMSNorm(dim), RMSNorm(dim), RMSNorm(dim)
        self.mlp = SwiGLU(dim, mlp_ratio * dim, dim)

    def forward(self, queries: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, nq, d = queries.shape
        h = self.heads
        q = self.q(self.norm_q(queries)).view(b, nq, h, d // h).transpose(1, 2)
        k, v = self.kv(self.norm_kv(memory)).view(b, memory.shape[1], 2, h, d // h).permute(2, 0, 3, 1, 4)
        attn_mask = None if mask is None else mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        queries = queries + self.post_attn(self.o(out.transpose(1, 2).reshape(b, nq, d)))
        return queries + self.post_mlp(self.mlp(self.norm_mlp(queries)))


class HyperLoRA(nn.Module):
    """Maps one chunk's `ContextFeatures` to LoRA factors for every target layer.

    `forward` returns `A [B, L, R, d_in]` and `B [B, L, d_out, R]` with `R = config.chunk_rank` (before the
    bias LoRA is appended); the applied delta is `config.scale * B @ A` per layer. Rows `:rank` are the
    head's slots (head rows plus, with `fast_weights`, their fast-weight pair), rows `rank:` the fast-only
    slots.
    """

    def __init__(self, config: HypernetConfig) -> None:
        super().__init__()
        self.config = c = config
        n_layers, d = len(c.layers), c.latent_dim
        self.in_norm = RMSNorm(c.hidden_size)
        self.in_proj = SwiGLU(c.hidden_size, d, d)
        self.layer_embed = nn.Parameter(torch.randn(n_layers, d) * 0.02)
        self.latents = nn.Parameter(torch.randn(c.n_latents, d))
        self.blocks = nn.ModuleList(CrossAttentionBlock(d, c.n_heads, c.mlp_ratio) for _ in range(c.n_blocks))
        self.latent_norm = RMSNorm(d)
        self.slot_queries = nn.Parameter(torch.randn(c.rank, d))
        self.decoder = CrossAttentionBlock(d, c.n_heads, c.mlp_ratio)
        # Per-layer residual MLP and head: weights indexed by target layer.
        self.pre_norm = nn.LayerNorm(d)
        self.pre_up = nn.Parameter(torch.randn(n_layers, d, c.mlp_ratio * d) / math.sqrt(d))
        self.pre_down = nn.Parameter(torch.zeros(n_layers, c.mlp_ratio * d, d))
        self.post_norm = nn.LayerNorm(d)
        self.head = nn.Parameter(torch.randn(n_layers, d, c.d_in + c.d_out)
                                 * (0.5 / math.sqrt(d + (c.d_in + c.d_out) * c.rank)))
        self.scaler_a = nn.Parameter(torch.ones(n_layers, c.rank))
        self.scaler_b = nn.Parameter(torch.zeros(n_layers, c.rank))
        if c.fast_weights:
            self.slot_key = nn.Linear(d, d, bias=False)
            self.token_key = nn.Linear(d, d, bias=False)
            self.value_gain = nn.Parameter(torch.ones(n_layers, 1, 1))
        if c.fast_slots:
            self.fast_queries = nn.Parameter(torch.randn(c.fast_slots, d))
            self.fast_scaler_a = nn.Parameter(torch.ones(n_layers, c.fast_slots))
            self.fast_scaler_b = nn.Parameter(torch.zeros(n_layers, c.fast_slots))
        if c.fast_map_rank:
            q = c.fast_map_rank
            self.fast_key_down = nn.Parameter(torch.randn(n_layers, c.d_in, q) / math.sqrt(c.d_in))
            self.fast_key_up = nn.Parameter(torch.zeros(n_layers, q, c.d_in))
            self.fast_value_down = nn.Parameter(torch.randn(n_layers, c.d_out, q) / math.sqrt(c.d_out))
            self.fast_value_up = nn.Parameter(torch.zeros(n_layers, q, c.d_out))
        if c.bias_lora:
            self.bias_a = nn.Parameter(torch.randn(n_layers, c.rank, c.d_in) * (0.2 / math.sqrt(c.d_in * c.rank)))
            self.bias_b = nn.Parameter(torch.zeros(n_layers, c.d_out, c.rank))

    def forward(self, feats: ContextFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        slots, tokens = self._slots(feats)
        r = c.rank
        rows = torch.einsum("blrd,ldo->blro", slots[:, :, :r], self.head)
        a, b = rows[..., : c.d_in], rows[..., c.d_in :]
        scaler_a, scaler_b = self.scaler_a, self.scaler_b
        if c.fast_weights:
            a_fast, b_fast = self._fast_weights(self._attention(slots, tokens, feats.mask), feats)
            a = torch.cat([a + a_fast[:, :, :r], a_fast[:, :, r:]], dim=2)
            b = torch.cat([b + self.value_gain * b_fast[:, :, :r], self.value_gain * b_fast[:, :, r:]], dim=2)
        if c.fast_slots:
            scaler_a = torch.cat([scaler_a, self.fast_scaler_a], dim=1)
            scaler_b = torch.cat([scaler_b, self.fast_scaler_b], dim=1)
        a = a * scaler_a[None, :, :, None]
        b = b * scaler_b[None, :, :, None]
        return a, b.transpose(-1, -2)

    def slot_attention(self, feats: ContextFeatures) -> torch.Tensor:
        """Which chunk tokens each fast-weight slot reads: `[B, L, R, N]`, rows summing to 1 over real tokens
        (`R = config.chunk_rank`). Slot i writes the weighted mean of the tokens' module inputs into its A row
        and of their successors' embeddings into its B row (`training/slots.py` reports how many distinct
        tokens the slots of a layer pick)."""
        if not self.config.fast_weights:
            raise ValueError("this hypernetwork has no fast-weight path (fast_weights=false)")
        slots, tokens = self._slots(feats)
        return self._attention(slots, tokens, feats.mask)

    def _slots(self, feats: ContextFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit slot vectors `[B, L, R, d]` and the projected chunk tokens `[B, L|1, N, d]`."""
        c = self.config
        batch, _, n_tok, _ = feats.hidden.shape
        n_layers, n_slots = len(c.layers), c.chunk_rank
        slot_queries = self.slot_queries if not c.fast_slots else torch.cat([self.slot_queries, self.fast_queries])
        tokens = self.in_proj(self.in_norm(feats.hidden.float()))  # [B, L|1, N, d]
        if c.layer_to_layer:  # fold layers into the batch: one shared Perceiver per layer's activations
            tokens = (tokens + self.layer_embed[None, :, None, :]).reshape(batch * n_layers, n_tok, -1)
            mask = feats.mask.repeat_interleave(n_layers, dim=0)
            queries = slot_queries.expand(batch * n_layers, -1, -1)
        else:  # one pass; the decoder asks one query per (layer, rank slot)
            tokens, mask = tokens[:, 0], feats.mask
            queries = (self.layer_embed[:, None, :] + slot_queries[None]).reshape(1, n_layers * n_slots, -1)
            queries = queries.expand(batch, -1, -1)
        latents = self.latents.expand(tokens.shape[0], -1, -1)
        for block in self.blocks:
            latents = block(latents, tokens, mask)
        slots = self.decoder(queries, self.latent_norm(latents), None).reshape(batch, n_layers, n_slots, -1)
        tokens = tokens.reshape(batch, -1, n_tok, tokens.shape[-1])  # [B, L|1, N, d]
        hidden = torch.einsum("blrd,ldh->blrh", self.pre_norm(slots), self.pre_up)
        slots = self.post_norm(slots + torch.einsum("blrh,lhd->blrd", F.silu(hidden), self.pre_down))
        return F.normalize(slots, dim=-1), tokens

    def _attention(self, slots: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        token_keys = self.token_key(tokens).expand(-1, slots.shape[1], -1, -1)
        scores = torch.einsum("blrd,blnd->blrn", self.slot_key(slots), token_keys)
        scores = scores / math.sqrt(slots.shape[-1])
        return scores.masked_fill(~mask[:, None, None, :], float("-inf")).softmax(-1)

    def _fast_weights(self, weights: torch.Tensor, feats: ContextFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        # Each slot picks document tokens; its A row is their (normalised) module-input activations,
        # its B row their successors' embeddings: a key -> value association written into delta_W.
        keys = F.normalize(feats.keys.float(), dim=-1)  # [B, L, N, d_in]
        a = torch.einsum("blrn,blni->blri", weights, keys)
        b = torch.einsum("blrn,bno->blro", weights, feats.next_embed.float())
        if self.config.fast_map_rank:
            a = a + torch.einsum("blrq,lqi->blri", torch.einsum("blri,liq->blrq", a, self.fast_key_down),
                                 self.fast_key_up)
            b = b + torch.einsum("blrq,lqo->blro", torch.einsum("blro,loq->blrq", b, self.fast_value_down),
                                 self.fast_value_up)
        return a, b

    def bias(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The document-independent bias LoRA `(A [L, r, d_in], B [L, d_out, r])`, if configured."""
        if not self.config.bias_lora:
            return None
        return self.bias_a, self.bias_b

    def checksum(self) -> str:
        """sha256 over the config and every parameter: the provenance adapters carry."""
        digest = hashlib.sha256(self.config.model_dump_json().encode())
        for name, tensor in sorted(self.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
        return digest.hexdigest()
