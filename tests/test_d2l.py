"""Doc-to-LoRA core: chunking, the hypernetwork's guarantees, batching, checkpoints, bad input."""

from __future__ import annotations

import pytest
import torch

from d2l_memory.chunking import split_tokens, validate_text
from d2l_memory.d2l import DocToLoRA
from d2l_memory.hypernet import HypernetConfig
from d2l_memory.lora import LoRA

SMALL = HypernetConfig(layers=[10, 12, 14], chunk_tokens=32, latent_dim=64, n_heads=2)


@pytest.fixture(scope="module")
def fresh(base):
    return DocToLoRA.untrained(SMALL, base, seed=1)


@pytest.fixture(scope="module")
def trained_like(base):
    d2l = DocToLoRA.untrained(SMALL, base, seed=2)
    with torch.no_grad():  # stand-in for training: open the B scalers so deltas are non-zero
        d2l.hypernet.scaler_b.fill_(0.5)
        d2l.hypernet.bias_b.normal_(0, 0.01)
    d2l.hypernet.eval()
    return d2l


def test_fresh_hypernetwork_emits_exactly_zero_delta(fresh):
    lora = fresh.internalize("Alice's favorite color is teal.")
    assert all(torch.count_nonzero(lora.delta(name)) == 0 for name in lora.modules)


def test_k_chunks_give_rank_k_plus_one_times_r(trained_like):
    text = " ".join(f"Fact {i}: the code of box {i} is {1000 + i}." for i in range(40))
    n_tokens = len(trained_like.base.tokenizer(text, add_special_tokens=False)["input_ids"])
    k = -(-n_tokens // SMALL.chunk_tokens)
    lora = trained_like.internalize(text)
    assert k > 3 and lora.n_chunks == k
    assert lora.rank == (k + 1) * SMALL.rank
    assert lora.base_model == "smollm2-135m-instruct" and len(lora.hypernet) == 64


def test_batched_equals_one_by_one(trained_like):
    texts = ["Bob lives in Oslo.", "Carla plays the cello every Sunday. " * 12, "The code is 4242."]
    batched = trained_like.internalize_batch(texts)
    for text, lora in zip(texts, batched, strict=True):
        alone = trained_like.internalize(text)
        assert lora.rank == alone.rank
        for name in lora.modules:
            assert torch.allclose(lora.delta(name), alone.delta(name), atol=1e-4)


def test_chunks_are_equal_contiguous_and_fit_the_window(trained_like):
    pieces = split_tokens(list(range(103)), 25)
    assert [len(p) for p in pieces] == [21, 21, 21, 20, 20]
    assert [i for piece in pieces for i in piece] == list(range(103))
    chunks = trained_like.chunks("word " * 5000)
    assert max(len(c) for c in chunks) <= SMALL.chunk_tokens + 16
    with pytest.raises(ValueError, match="window"):
        from d2l_memory.chunking import chunk_document

        chunk_document(trained_like.base.tokenizer, "hello", 9000, max_positions=8192)


def test_checkpoint_round_trip(trained_like, tmp_path, base):
    trained_like.save(tmp_path / "ckpt", dtype=torch.float32)
    loaded = DocToLoRA.from_pretrained(tmp_path / "ckpt", base=base)
    assert loaded.checksum == trained_like.checksum
    a, b = trained_like.internalize("Dana is a pilot."), loaded.internalize("Dana is a pilot.")
    assert torch.allclose(a.delta(a.modules[0]), b.delta(b.modules[0]))
    with pytest.raises(FileNotFoundError, match="no hypernetwork checkpoint"):
        DocToLoRA.from_pretrained(tmp_path / "missing", base=base)


@pytest.mark.parametrize(("bad", "error", "match"), [
    ("", ValueError, "empty"), ("   \n\t", ValueError, "whitespace"), (42, TypeError, "int"),
    (b"bytes", TypeError, "bytes"), ("lone \ud800 surrogate", ValueError, "surrogate"), (None, TypeError, "NoneType"),
])
def test_bad_documents_get_clear_errors(fresh, bad, error, match):
    with pytest.raises(error, match=match):
        fresh.internalize(bad)
    with pytest.raises(error, match=match):
        validate_text(bad)


def test_wrong_base_model_is_refused(base):
    with pytest.raises(ValueError, match="trained for"):
        DocToLoRA.untrained(SMALL.model_copy(update={"base_model": "gemma-3-270m"}), base)


def test_a_hypernetwork_trained_for_one_base_model_is_refused_for_another(base):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from d2l_memory.d2l import shipped_checkpoint
    from d2l_memory.models import LoadedModel

    # A small Gemma-3 of random weights stands in for gemma-3-270m: only its identity and shape matter here.
    gemma = Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                                               num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                               head_dim=32)).eval()
    other = LoadedModel(model=gemma, tokenizer=base.tokenizer, model_id="gemma-3-270m")
    with pytest.raises(ValueError, match="trained for 'smollm2-135m-instruct', base model is 'gemma-3-270m'"):
        DocToLoRA.from_pretrained(shipped_checkpoint("smollm2-135m-instruct"), base=other)
    for_gemma = HypernetConfig.for_model(other, latent_dim=32, n_heads=2)
    assert (for_gemma.hidden_size, for_gemma.d_in, for_gemma.d_out, for_gemma.layers) == (64, 128, 64, [0, 1])
    with pytest.raises(ValueError, match="trained for 'gemma-3-270m', base model is 'smollm2-135m-instruct'"):
        DocToLoRA.untrained(for_gemma, base)
    with pytest.raises(ValueError, match="d_in=1536 does not fit gemma-3-270m, whose value is 128"):
        HypernetConfig.for_model(other, d_in=1536)


def test_adapter_applies_and_changes_output(trained_like):
    from d2l_memory.functional import lora_applied

    lora = trained_like.internalize("Erin's favorite food is ramen.")
    assert isinstance(lora, LoRA)
    ids = trained_like.base.tokenizer("Hi", return_tensors="pt").input_ids
    with torch.no_grad():
        plain = trained_like.base.model(ids).logits
        with lora_applied(trained_like.base.model, lora):
            changed = trained_like.base.model(ids).logits
    assert (plain - changed).abs().max() > 0


def test_fast_only_slots_and_maps_start_silent_on_trained_weights(base, trained_like):
    with pytest.raises(ValueError, match="need fast_weights"):
        HypernetConfig(**{**SMALL.model_dump(), "fast_slots": 4, "fast_weights": False})
    grown = DocToLoRA.untrained(SMALL.model_copy(update={"fast_slots": 4, "fast_map_rank": 8}), base, seed=3)
    missing, unexpected = grown.hypernet.load_state_dict(trained_like.hypernet.state_dict(), strict=False)
    assert sorted(missing) == ["fast_key_down", "fast_key_up", "fast_queries", "fast_scaler_a", "fast_scaler_b",
                               "fast_value_down", "fast_value_up"] and not unexpected
    grown.hypernet.eval()
    text = " ".join(f"Fact {i}: the code of box {i} is {1000 + i}." for i in range(12))
    before, after = trained_like.internalize(text), grown.internalize(text)
    assert after.rank == after.n_chunks * (SMALL.rank + 4) + SMALL.rank and after.n_chunks > 1
    # Added to trained weights, the new slots' zero B scalers leave every delta as it was ...
    for name in before.modules:
        assert torch.allclose(before.delta(name), after.delta(name), atol=1e-5)
    # ... and once they open, they write keys of their own into the adapter, which the maps then move.
    with torch.no_grad():
        grown.hypernet.fast_scaler_b.fill_(0.5)
    opened = grown.internalize(text)
    assert any((opened.delta(n) - before.delta(n)).abs().max() > 1e-4 for n in before.modules)
    with torch.no_grad():
        grown.hypernet.fast_key_up.normal_(0, 0.1)
    mapped = grown.internalize(text)
    assert any((mapped.delta(n) - opened.delta(n)).abs().max() > 1e-4 for n in before.modules)


def test_slot_attention_covers_every_slot_and_the_slot_report_locates_the_value(base):
    from d2l_memory.training.data import Sample
    from d2l_memory.training.slots import slot_report

    grown = DocToLoRA.untrained(SMALL.model_copy(update={"fast_slots": 4}), base, seed=3)
    chunk = grown.chunks("User: My locker code is 7731, please keep it.")[0]
    weights = grown.hypernet.slot_attention(grown.features([chunk]))
    assert weights.shape == (1, len(SMALL.layers), SMALL.rank + 4, len(chunk))
    assert torch.allclose(weights.sum(-1), torch.ones(1, len(SMALL.layers), SMALL.rank + 4))
    told = Sample(context="User: My locker code is 7731, please keep it.", question="What is my locker code?",
                  answer="7731", source="conversation", response="Your locker code is 7731.")
    other = Sample(context="User: I grew up in Lyon.", question="Where did I grow up?", answer="Lyon",
                   source="conversation", response="You grew up in Lyon.")
    report = slot_report(grown, told, other)
    assert report["value_tokens"] >= 1 and 1 <= report["distinct"] <= SMALL.rank
    assert 1 <= report["distinct_fast"] <= 4 and 0 <= report["value_per_layer"] <= report["value_any"] <= 1
    assert all(-1 <= report[k] <= 1 for k in ("pred_cos", "key_cos", "key_cos_other"))
    assert report["lead_in_none"] == 0  # the base model cannot guess a locker code
    with pytest.raises(ValueError, match="no fast-weight path"):
        DocToLoRA.untrained(SMALL.model_copy(update={"fast_weights": False}), base).hypernet.slot_attention(
            grown.features([chunk]))
