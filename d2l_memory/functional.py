"""Apply LoRA factors to a frozen model without changing or reloading it, one adapter per example.

PEFT attaches one adapter to a whole batch; a hypernetwork that emits an adapter per document, and an
engine that serves several users in one batch, need a different adapter for each row. Forward hooks
on the target linears add, for batch row b,

    y_b += scale * B_b (A_b x_b)        (einsum over the rank; autograd flows into A and B)

so the same code serves meta-training (A/B are hypernetwork outputs with gradients) and inference.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from d2l_memory.lora import LoRA

# module name -> (A [batch, r, d_in], B [batch, d_out, r]); batch 1 broadcasts over the input batch.
Factors = Mapping[str, tuple[torch.Tensor, torch.Tensor]]


def module_shapes(model: nn.Module, names: Sequence[str] | None = None) -> dict[str, tuple[int, int]]:
    """`(d_out, d_in)` of the model's linear modules (all of them, or the named ones)."""
    shapes = {n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    return shapes if names is None else {n: shapes[n] for n in names if n in shapes}


def stack(loras: Sequence[LoRA | None], dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
          ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
    """Batch several adapters (None = no adapter for that row) into `Factors` and one scale.

    Ranks are zero-padded to the largest; scales are folded into A so that one scale (1.0) serves all.
    """
    present = [lo for lo in loras if lo is not None]
    if not present:
        return {}, 1.0
    rank = max(lo.rank for lo in present)
    shapes: dict[str, tuple[int, int]] = {}
    for lo in present:
        shapes.update(lo.shapes())
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, (d_out, d_in) in shapes.items():
        a = torch.zeros(len(loras), rank, d_in, dtype=dtype, device=device)
        b = torch.zeros(len(loras), d_out, rank, dtype=dtype, device=device)
        for i, lo in enumerate(loras):
            if lo is not None and name in lo.weights:
                a_i, b_i = lo.weights[name]
                a[i, : lo.rank] = a_i.to(device, dtype) * lo.scale
                b[i, :, : lo.rank] = b_i.to(device, dtype)
        factors[name] = (a, b)
    return factors, 1.0


def _delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    # x: [batch, seq, d_in]; a: [batch|1, r, d_in]; b: [batch|1, d_out, r]
    low = torch.einsum("bsi,bri->bsr", x, a.to(x.dtype).expand(x.shape[0], -1, -1))
    return scale * torch.einsum("bsr,bor->bso", low, b.to(x.dtype).expand(x.shape[0], -1, -1))


@contextmanager
def applied(model: nn.Module, factors: Factors, scale: float | torch.Tensor = 1.0) -> Iterator[nn.Module]:
    """Within the block, the named linears of `model` also add `scale * B (A x)` per batch row.

    Raises:
        KeyError: a module name the model does not have.
    """
    modules = dict(model.named_modules())
    handles = []
    try:
        for name, (a, b) in factors.items():
            if name not in modules:
                raise KeyError(f"the model has no module named {name}")
            a3 = a if a.dim() == 3 else a.unsqueeze(0)
            b3 = b if b.dim() == 3 else b.unsqueeze(0)

            def hook(_m: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor,
                     a3: torch.Tensor = a3, b3: torch.Tensor = b3) -> torch.Tensor:
                return output + _delta(inputs[0], a3, b3, scale)

            handles.append(modules[name].register_forward_hook(hook))
        yield model
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def lora_applied(model: nn.Module, lora: LoRA | Sequence[LoRA | None] | None) -> Iterator[nn.Module]:
    """Apply one adapter to every row, or one adapter (or None) per batch row."""
    if lora is None:
        yield model
        return
    param = next(model.parameters())
    factors, scale = stack([lora] if isinstance(lora, LoRA) else list(lora), dtype=param.dtype, device=param.device)
    with applied(model, factors, scale):
        yield model
