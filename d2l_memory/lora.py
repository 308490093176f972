"""The `LoRA` value type: low-rank weight deltas for named linear modules, and their file formats.

Convention, written once here: for a target linear `y = W x` (W: `[d_out, d_in]`) the adapter adds

    delta_W x = scale * B (A x),    A: [r, d_in],  B: [d_out, r]

with one rank `r` and one `scale` for every module of an adapter. PEFT computes
`(lora_alpha / r) * B A x`, so PEFT files carry `lora_alpha = scale * r` and load back exactly.

Operations never form the full `[d_out, d_in]` delta unless asked (`delta`): `concat` stacks ranks
(exactly the sum of the deltas), `truncate` compresses with a QR of each factor and an `[r, r]` SVD.
Storage is safetensors only; nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load, load_file, save, save_file

from d2l_memory.errors import AdapterError

FORMAT_VERSION = "1"
PEFT_PREFIX = "base_model.model."
WEIGHTS_FILE = "adapter_model.safetensors"  # PEFT's file names: what peft and vLLM read from a directory
CONFIG_FILE = "adapter_config.json"


class LoRA:
    """Per-module `(A, B)` factors, one shared rank and scale, and their provenance.

    Args:
        weights: module name (e.g. `model.layers.3.mlp.down_proj`) -> `(A [r, d_in], B [d_out, r])`.
        scale: the factor in `delta_W = scale * B A`.
        base_model: id of the base model the adapter was made for.
        hypernet: checksum of the hypernetwork that made it ("" for adapters made otherwise).
        n_chunks: how many document chunks were internalized into it.
        bias_rows: the last `bias_rows` rank slots hold the hypernetwork's document-independent bias LoRA,
            identical in every adapter that hypernetwork makes; `concat` keeps one copy of them.

    Raises:
        ValueError: no modules, mismatched ranks, or factor shapes that do not chain.
    """

    def __init__(
        self,
        weights: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
        scale: float = 1.0,
        base_model: str = "",
        hypernet: str = "",
        n_chunks: int = 1,
        bias_rows: int = 0,
    ) -> None:
        if not weights:
            raise ValueError("a LoRA needs at least one target module")
        ranks = {a.shape[0] for a, _ in weights.values()}
        if len(ranks) != 1:
            raise ValueError(f"all modules of a LoRA share one rank, got ranks {sorted(ranks)}")
        for name, (a, b) in weights.items():
            if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
                raise ValueError(
                    f"module {name}: A must be [r, d_in] and B [d_out, r], got {tuple(a.shape)} and "
                    f"{tuple(b.shape)}"
                )
        self.weights = dict(weights)
        self.scale = float(scale)
        self.base_model = base_model
        self.hypernet = hypernet
        self.n_chunks = int(n_chunks)
        if not 0 <= bias_rows <= self.rank:
            raise ValueError(f"bias_rows must be in 0..{self.rank}, got {bias_rows}")
        self.bias_rows = int(bias_rows)

    # -- basic facts ---------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return next(iter(self.weights.values()))[0].shape[0]

    @property
    def modules(self) -> list[str]:
        return list(self.weights)

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.weights.values()))[0].dtype

    def nbytes(self) -> int:
        """Bytes held by the factors."""
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.weights.values())

    def shapes(self) -> dict[str, tuple[int, int]]:
        """Module name -> `(d_out, d_in)` of the weight the module adapts."""
        return {name: (b.shape[0], a.shape[1]) for name, (a, b) in self.weights.items()}

    def delta(self, module: str) -> torch.Tensor:
        """The full `[d_out, d_in]` delta of one module (for tests and small checks)."""
        a, b = self.weights[module]
        return self.scale * (b.double() @ a.double())

    def to(self, dtype: torch.dtype) -> LoRA:
        """A copy with factors in another dtype."""
        return self._replace({n: (a.to(dtype), b.to(dtype)) for n, (a, b) in self.weights.items()})

    def _replace(self, weights: Mapping[str, tuple[torch.Tensor, torch.Tensor]], **kw: object) -> LoRA:
        fields = {"scale": self.scale, "base_model": self.base_model, "hypernet": self.hypernet,
                  "n_chunks": self.n_chunks, "bias_rows": self.bias_rows, **kw}
        return LoRA(weights, **fields)  # type: ignore[arg-type]

    # -- validation ----------------------------------------------------------------------------
    def validate(
        self,
        shapes: Mapping[str, tuple[int, int]] | None = None,
        base_model: str | None = None,
        hypernet: str | None = None,
    ) -> None:
        """Check that the adapter is safe to compose into a model.

        Args:
            shapes: the model's `(d_out, d_in)` for each module the adapter may target.
            base_model: the id of the model it will be applied to.
            hypernet: the checksum of the hypernetwork it must come from.

        Raises:
            AdapterError: non-finite values, an unknown module or wrong shape, another base model, or
                another hypernetwork.
        """
        if base_model is not None and self.base_model != base_model:
            raise AdapterError(f"adapter was made for base model '{self.base_model}', not '{base_model}'")
        if hypernet is not None and self.hypernet != hypernet:
            raise AdapterError(
                f"adapter was made by hypernetwork {self.hypernet[:12] or '(none)'}, not {hypernet[:12]}"
            )
        for name, (a, b) in self.weights.items():
            if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                raise AdapterError(f"adapter module {name} holds NaN or infinite values")
            if shapes is not None:
                if name not in shapes:
                    raise AdapterError(f"adapter targets {name}, which the base model does not have")
                if (b.shape[0], a.shape[1]) != tuple(shapes[name]):
                    raise AdapterError(
                        f"adapter module {name} is {b.shape[0]}x{a.shape[1]}, the base model's is "
                        f"{shapes[name][0]}x{shapes[name][1]}"
                    )
        if not math.isfinite(self.scale):
            raise AdapterError("adapter scale is not finite")

    # -- algebra -------------------------------------------------------------------------------
    @staticmethod
    def concat(loras: Sequence[LoRA], weights: Sequence[float] | None = None) -> LoRA:
        """Stack ranks: the result's delta is exactly `sum_i weights[i] * delta_i`, except that a bias
        slot shared by all inputs (same hypernetwork, same `bias_rows`) is kept once, unweighted:
        `sum_i weights[i] * document_delta_i + bias_delta`. Composing memories must not multiply the
        hypernetwork's prior by the number of memories.

        Modules missing from some inputs get zero rows there. The result keeps the first input's scale
        and folds each input's `weight * scale / scale_0` into its A rows.

        Raises:
            ValueError: no inputs, a weight count that differs, or inputs for different base models.
        """
        if not loras:
            raise ValueError("concat needs at least one LoRA")
        weights = [1.0] * len(loras) if weights is None else list(weights)
        if len(weights) != len(loras):
            raise ValueError(f"got {len(loras)} LoRAs but {len(weights)} weights")
        bases = {lo.base_model for lo in loras}
        if len(bases) != 1:
            raise ValueError(f"cannot concat adapters of different base models: {sorted(bases)}")
        hypernets = {lo.hypernet for lo in loras}
        shared = loras[0].bias_rows if len(hypernets) == 1 and "" not in hypernets and \
            len({lo.bias_rows for lo in loras}) == 1 else 0
        scale = loras[0].scale
        modules: dict[str, tuple[int, int]] = {}
        for lo in loras:
            for name, shape in lo.shapes().items():
                if modules.setdefault(name, shape) != shape:
                    raise ValueError(f"module {name} has shapes {modules[name]} and {shape}")
        dtype = loras[0].dtype
        # (adapter, weight, first row, last row): document rows of every input, then one shared bias.
        parts = [(lo, w, 0, lo.rank - shared) for lo, w in zip(loras, weights, strict=True)]
        if shared:
            parts.append((loras[0], 1.0, loras[0].rank - shared, loras[0].rank))
        out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, (d_out, d_in) in modules.items():
            a_parts, b_parts = [], []
            for lo, w, start, end in parts:
                if name in lo.weights:
                    a, b = lo.weights[name]
                    a_parts.append(a[start:end].to(dtype) * (w * lo.scale / scale))
                    b_parts.append(b[:, start:end].to(dtype))
                else:
                    a_parts.append(torch.zeros(end - start, d_in, dtype=dtype))
                    b_parts.append(torch.zeros(d_out, end - start, dtype=dtype))
            out[name] = (torch.cat(a_parts, 0), torch.cat(b_parts, 1))
        return LoRA(out, scale=scale, base_model=loras[0].base_model,
                    hypernet=hypernets.pop() if len(hypernets) == 1 else "mixed",
                    n_chunks=sum(lo.n_chunks for lo in loras), bias_rows=shared)

    def truncate(self, rank: int) -> tuple[LoRA, float]:
        """Best rank-`rank` approximation of every module's delta, and the relative error.

        Per module: `B = Q_b R_b`, `A^T = Q_a R_a` (thin QR), then the SVD of the small `R_b R_a^T`
        gives the singular values of `B A` without forming it. The error is the Frobenius norm of
        the dropped singular values over that of all of them, pooled over modules (0 when nothing
        is dropped).

        Raises:
            ValueError: a rank below 1.
        """
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        if rank >= self.rank:
            return self, 0.0
        out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        kept = dropped = 0.0
        for name, (a, b) in self.weights.items():
            q_b, r_b = torch.linalg.qr(b.double())
            q_a, r_a = torch.linalg.qr(a.double().T)
            u, s, vh = torch.linalg.svd(r_b @ r_a.T)
            root = s[:rank].sqrt()
            out[name] = ((root[:, None] * (vh[:rank] @ q_a.T)).to(a.dtype),
                         ((q_b @ u[:, :rank]) * root[None, :]).to(b.dtype))
            kept += float((s[:rank] ** 2).sum())
            dropped += float((s[rank:] ** 2).sum())
        total = kept + dropped
        return self._replace(out, bias_rows=0), math.sqrt(dropped / total) if total > 0 else 0.0

    def pad(self, rank: int) -> LoRA:
        """The same delta at a larger rank (zero rows), e.g. to reach a rank vLLM accepts."""
        if rank < self.rank:
            raise ValueError(f"cannot pad rank {self.rank} down to {rank}; use truncate")
        extra = rank - self.rank
        if extra == 0:
            return self
        cut = self.rank - self.bias_rows  # zeros go before the bias slot, which stays last
        return self._replace({
            n: (torch.cat([a[:cut], a.new_zeros(extra, a.shape[1]), a[cut:]]),
                torch.cat([b[:, :cut], b.new_zeros(b.shape[0], extra), b[:, cut:]], 1))
            for n, (a, b) in self.weights.items()
        })

    # -- storage -------------------------------------------------------------------------------
    def _metadata(self) -> dict[str, str]:
        return {"format": "d2l-lora", "version": FORMAT_VERSION, "scale": repr(self.scale),
                "base_model": self.base_model, "hypernet": self.hypernet, "n_chunks": str(self.n_chunks),
                "bias_rows": str(self.bias_rows)}

    def _tensors(self) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        for name, (a, b) in self.weights.items():
            tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a.contiguous()
            tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b.contiguous()
        return tensors

    def to_bytes(self) -> bytes:
        """Safetensors bytes (PEFT tensor names, our provenance in the header metadata)."""
        return save(self._tensors(), metadata=self._metadata())

    @classmethod
    def from_bytes(cls, data: bytes) -> LoRA:
        """Parse what `to_bytes` wrote.

        Raises:
            AdapterError: bytes that are not a d2l-memory safetensors adapter.
        """
        try:
            header_len = int.from_bytes(data[:8], "little")
            header = json.loads(data[8 : 8 + header_len])
            tensors = load(data)
        except Exception as exc:  # safetensors raises several types for corrupt input
            raise AdapterError(f"adapter bytes are not valid safetensors: {exc}") from exc
        meta = header.get("__metadata__") or {}
        if meta.get("format") != "d2l-lora":
            raise AdapterError("safetensors data is not a d2l-memory adapter (no d2l-lora metadata)")
        return cls(_pairs(tensors), scale=float(meta["scale"]), base_model=meta.get("base_model", ""),
                   hypernet=meta.get("hypernet", ""), n_chunks=int(meta.get("n_chunks", 1)),
                   bias_rows=int(meta.get("bias_rows", 0)))

    def content_hash(self) -> str:
        """sha256 of the factors (dtype, shape and bytes, in module order), scale and provenance: a stable
        id of the content, independent of any file layout (safetensors writes its header in no fixed
        order, so equal adapters can serialise to different bytes). Composed adapters are named by it."""
        digest = hashlib.sha256(json.dumps([self.scale, self.base_model, self.hypernet]).encode())
        for name in sorted(self.weights):
            digest.update(name.encode())
            for factor in self.weights[name]:
                digest.update(str((factor.dtype, tuple(factor.shape))).encode())
                digest.update(factor.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def save_peft(self, directory: str | Path) -> Path:
        """Write a PEFT adapter directory (`WEIGHTS_FILE` + `CONFIG_FILE`)
        that `peft.PeftModel.from_pretrained` and vLLM's `LoRARequest` both load."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(self._tensors(), directory / WEIGHTS_FILE, metadata=self._metadata())
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": self.rank,
            "lora_alpha": self.scale * self.rank,
            "target_modules": sorted({m.rsplit(".", 1)[-1] for m in self.modules}),
            "layers_to_transform": sorted({_layer_index(m) for m in self.modules if _layer_index(m) >= 0}) or None,
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": False,
            "use_rslora": False,
            "inference_mode": True,
            "base_model_name_or_path": self.base_model,
        }
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=1))
        return directory

    @classmethod
    def load_peft(cls, directory: str | Path) -> LoRA:
        """Read a PEFT LoRA directory (ours or any plain LoRA without biases or DoRA).

        Raises:
            AdapterError: a missing file or an adapter type this class does not represent.
        """
        directory = Path(directory)
        try:
            config = json.loads((directory / CONFIG_FILE).read_text())
            tensors = load_file(directory / WEIGHTS_FILE)
            with safe_open(directory / WEIGHTS_FILE, "pt") as fh:
                meta = fh.metadata() or {}
        except (OSError, ValueError) as exc:
            raise AdapterError(f"cannot read PEFT adapter in {directory}: {exc}") from exc
        if config.get("peft_type") != "LORA" or config.get("use_dora") or config.get("use_rslora"):
            raise AdapterError(f"{directory} is not a plain LoRA adapter")
        return cls(_pairs(tensors), scale=config["lora_alpha"] / config["r"],
                   base_model=meta.get("base_model", config.get("base_model_name_or_path") or ""),
                   hypernet=meta.get("hypernet", ""), n_chunks=int(meta.get("n_chunks", 1)),
                   bias_rows=int(meta.get("bias_rows", 0)))

    def __repr__(self) -> str:
        return (f"LoRA(modules={len(self.weights)}, rank={self.rank}, scale={self.scale:g}, "
                f"base_model={self.base_model!r}, n_chunks={self.n_chunks})")


def _layer_index(module: str) -> int:
    parts = module.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "layers" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return -1


def _pairs(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            name = key.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight")
            b_key = key.replace(".lora_A.weight", ".lora_B.weight")
            if b_key not in tensors:
                raise AdapterError(f"adapter has lora_A but no lora_B for {name}")
            pairs[name] = (a, tensors[b_key])
    if not pairs:
        raise AdapterError("adapter holds no lora_A/lora_B tensors")
    return pairs
