"""The LoRA value type: algebra, validation, and the PEFT / safetensors file formats."""

from __future__ import annotations

import math

import pytest
import torch

from d2l_memory.errors import AdapterError
from d2l_memory.functional import lora_applied, module_shapes
from d2l_memory.lora import LoRA

NAMES = [f"model.layers.{i}.mlp.down_proj" for i in (3, 17, 29)]


def random_lora(rank: int = 4, seed: int = 0, scale: float = 2.0, std: float = 0.05,
                base_model: str = "smollm2-135m-instruct") -> LoRA:
    g = torch.Generator().manual_seed(seed)
    return LoRA({n: (torch.randn(rank, 1536, generator=g) * std, torch.randn(576, rank, generator=g) * std)
                 for n in NAMES}, scale=scale, base_model=base_model, hypernet="h" * 64)


def test_concat_is_exactly_the_weighted_sum_of_deltas():
    x, y = random_lora(4, 1, scale=2.0), random_lora(8, 2, scale=0.5)
    both = LoRA.concat([x, y], weights=[1.0, -0.3])
    assert both.rank == 12
    for name in NAMES:
        assert torch.allclose(both.delta(name), x.delta(name) - 0.3 * y.delta(name), atol=1e-6)


def test_truncate_error_equals_the_dropped_singular_values():
    lora = random_lora(8, 3)
    small, error = lora.truncate(3)
    assert small.rank == 3
    dropped = kept = 0.0
    for name in NAMES:
        s = torch.linalg.svdvals(lora.delta(name))
        kept += float((s[:3] ** 2).sum())
        dropped += float((s[3:] ** 2).sum())
        residual = torch.linalg.matrix_norm(lora.delta(name) - small.delta(name))
        assert math.isclose(float(residual), float((s[3:] ** 2).sum().sqrt()), rel_tol=1e-4)
    assert math.isclose(error, math.sqrt(dropped / (kept + dropped)), rel_tol=1e-6)
    assert lora.truncate(8) == (lora, 0.0)


def test_pad_keeps_the_delta_and_bytes_round_trip():
    lora = random_lora(4, 4)
    padded = lora.pad(8)
    assert padded.rank == 8
    assert torch.allclose(padded.delta(NAMES[0]), lora.delta(NAMES[0]))
    back = LoRA.from_bytes(lora.to_bytes())
    assert back.scale == lora.scale and back.base_model == lora.base_model and back.hypernet == lora.hypernet
    assert all(torch.equal(back.weights[n][0], lora.weights[n][0]) for n in NAMES)
    assert lora.nbytes() == 3 * 4 * (1536 + 576) * 4
    assert lora.to(torch.bfloat16).nbytes() == lora.nbytes() // 2


def test_peft_round_trip_matches_functional_application(base, tmp_path):
    from peft import PeftModel

    lora = random_lora(8, 5)
    ids = base.tokenizer("Memories live in weights now.", return_tensors="pt").input_ids
    with torch.no_grad():
        plain = base.model(ids).logits
        with lora_applied(base.model, lora):
            ours = base.model(ids).logits
    lora.save_peft(tmp_path / "adapter")
    assert LoRA.load_peft(tmp_path / "adapter").scale == pytest.approx(lora.scale)
    peft_model = PeftModel.from_pretrained(base.model, tmp_path / "adapter")
    try:
        with torch.no_grad():
            theirs = peft_model(ids).logits
    finally:
        peft_model.unload()  # restore the shared session model
    assert (ours - plain).abs().max() > 1e-2  # the adapter really changes the output
    assert torch.allclose(ours, theirs, atol=1e-4)  # tolerance: fp32 summation order


def test_validation_rejects_bad_adapters(base):
    shapes = module_shapes(base.model, NAMES)
    good = random_lora()
    good.validate(shapes, base_model="smollm2-135m-instruct", hypernet="h" * 64)
    nan = random_lora()
    nan.weights[NAMES[0]][0][0, 0] = float("nan")
    with pytest.raises(AdapterError, match="NaN"):
        nan.validate(shapes)
    wrong = LoRA({NAMES[0]: (torch.zeros(4, 1000), torch.zeros(576, 4))})
    with pytest.raises(AdapterError, match="1000"):
        wrong.validate(shapes)
    with pytest.raises(AdapterError, match="base model"):
        random_lora(base_model="gemma-3-270m").validate(shapes, base_model="smollm2-135m-instruct")
    with pytest.raises(AdapterError, match="hypernetwork"):
        good.validate(shapes, hypernet="0" * 64)
    with pytest.raises(ValueError, match="rank"):
        LoRA({NAMES[0]: (torch.zeros(4, 8), torch.zeros(8, 4)), NAMES[1]: (torch.zeros(2, 8), torch.zeros(8, 2))})
    with pytest.raises(AdapterError, match="not valid safetensors"):
        LoRA.from_bytes(b"\x00garbage that is not an adapter")


def test_concat_keeps_a_shared_bias_slot_once():
    def d2l_like(seed: int) -> LoRA:
        g = torch.Generator().manual_seed(seed)
        doc = {n: (torch.randn(4, 1536, generator=g) * 0.05, torch.randn(576, 4, generator=g) * 0.05) for n in NAMES}
        bias_g = torch.Generator().manual_seed(99)  # the same bias in every adapter of this hypernetwork
        weights = {}
        for n in NAMES:
            bias_a, bias_b = torch.randn(4, 1536, generator=bias_g) * 0.05, torch.randn(576, 4, generator=bias_g) * 0.05
            weights[n] = (torch.cat([doc[n][0], bias_a]), torch.cat([doc[n][1], bias_b], 1))
        return LoRA(weights, scale=2.0, base_model="smollm2-135m-instruct", hypernet="h" * 64, bias_rows=4)

    x, y = d2l_like(1), d2l_like(2)
    both = LoRA.concat([x, y], weights=[1.0, 0.5])
    assert both.rank == 12 and both.bias_rows == 4
    for name in NAMES:
        bias = 2.0 * (x.weights[name][1][:, 4:].double() @ x.weights[name][0][4:].double())
        expected = (x.delta(name) - bias) + 0.5 * (y.delta(name) - bias) + bias
        assert torch.allclose(both.delta(name), expected, atol=1e-6)
    padded = both.pad(16)
    assert padded.bias_rows == 4 and torch.equal(padded.weights[NAMES[0]][0][-4:], both.weights[NAMES[0]][0][-4:])
    assert LoRA.from_bytes(both.to_bytes()).bias_rows == 4
