"""Context encoder: the frozen base model reads a document and hands per-layer activations over.

Features for target layer l (paper: `Z_{l-1}`, the input hidden state of block l):
- `hidden` `[L, N, D]`: block inputs at every target layer (`per_layer`), or the output of the first
  k blocks, shared by all layers (`early_exit`: k blocks instead of all, the cheap variant);
- `keys` `[L, N, d_in]`: the target module's own input activations (e.g. `down_proj`'s) at each
  target layer, for the hypernetwork's fast-weight path (`per_layer` only);
- `next_embed` `[N, D]`: the input embedding of each token's successor (zero at the end), the value
  the fast-weight path may write (tied embeddings make it the logit direction of that token).
Everything runs under `no_grad`: no gradient ever reaches the base model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ContextFeatures:
    """What the hypernetwork reads from one document chunk (batch first)."""

    hidden: torch.Tensor  # [B, L or 1, N, D]
    mask: torch.Tensor  # [B, N] bool, True for real tokens
    keys: torch.Tensor | None  # [B, L, N, d_in]
    next_embed: torch.Tensor  # [B, N, D]


class _EnoughBlocks(Exception):
    """Raised from a hook to stop the forward pass once the deepest needed block has run."""


def _blocks(model: nn.Module) -> nn.ModuleList:
    return model.model.layers  # type: ignore[return-value]


@torch.no_grad()
def encode(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    layers: list[int],
    target: str,
    hidden_layers: list[int] | None = None,
    mode: str = "per_layer",
    early_exit_layers: int = 8,
    with_keys: bool = True,
) -> ContextFeatures:
    """Run the frozen model over `input_ids` `[B, N]` (right-padded) and collect the features.

    Args:
        layers: target layer indices, ascending (keys are collected there).
        hidden_layers: blocks whose input hidden state is returned (`per_layer`; default `layers`).
        target: the adapted module inside each block, e.g. `mlp.down_proj`.
        mode: `per_layer` (all blocks up to the last target) or `early_exit` (first k blocks).
    """
    blocks = _blocks(model)
    hidden_layers = layers if hidden_layers is None else hidden_layers
    depth = (max(layers + hidden_layers) + 1) if mode == "per_layer" else early_exit_layers
    hidden: dict[int, torch.Tensor] = {}
    keys: dict[int, torch.Tensor] = {}

    def block_input(layer: int):
        def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden[layer] = (args[0] if args else kwargs["hidden_states"]).detach()
        return hook

    def key_input(layer: int):
        def hook(_m: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            keys[layer] = inputs[0].detach()
        return hook

    def stop(_m: nn.Module, _inputs: tuple, output: torch.Tensor | tuple) -> None:
        hidden[depth] = (output[0] if isinstance(output, tuple) else output).detach()
        raise _EnoughBlocks

    handles = [blocks[depth - 1].register_forward_hook(stop)]
    if mode == "per_layer":
        for layer in hidden_layers:
            handles.append(blocks[layer].register_forward_pre_hook(block_input(layer), with_kwargs=True))
        for layer in layers if with_keys else []:
            handles.append(blocks[layer].get_submodule(target).register_forward_pre_hook(key_input(layer)))
    # Hooks instead of truncating the module list: the shared model stays untouched for other threads,
    # and the blocks above the deepest one needed never run.
    try:
        model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _EnoughBlocks:
        pass
    finally:
        for handle in handles:
            handle.remove()
    if mode == "per_layer":
        stacked = torch.stack([hidden[layer] for layer in hidden_layers], dim=1)
        key_stack = torch.stack([keys[layer] for layer in layers], dim=1) if with_keys else None
    else:
        stacked, key_stack = hidden[depth].unsqueeze(1), None
    embed = model.get_input_embeddings()
    next_ids = torch.cat([input_ids[:, 1:], input_ids[:, -1:]], dim=1)
    next_mask = torch.cat([attention_mask[:, 1:], torch.zeros_like(attention_mask[:, -1:])], dim=1)
    next_embed = embed(next_ids) * next_mask.unsqueeze(-1).to(stacked.dtype)
    return ContextFeatures(hidden=stacked, mask=attention_mask.bool(), keys=key_stack, next_embed=next_embed)
