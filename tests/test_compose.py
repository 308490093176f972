"""Composition of adapters and the on-disk cache of composed adapters."""

from __future__ import annotations

import json
import math

import pytest
import torch

from d2l_memory.compose import (
    VLLM_RANKS,
    ComposedCache,
    Recipe,
    check_name,
    compose,
    member_weights,
    vllm_rank,
)
from d2l_memory.errors import AdapterError
from d2l_memory.lora import LoRA

BASE = "smollm2-135m-instruct"
MODULES = [f"model.layers.{i}.mlp.down_proj" for i in range(3)]


def random_lora(seed: int, rank: int = 8, std: float = 0.05, scale: float = 1.0, hypernet: str = "",
                shape: tuple[int, int] = (576, 1536)) -> LoRA:
    g = torch.Generator().manual_seed(seed)
    d_out, d_in = shape
    return LoRA({m: (torch.randn(rank, d_in, generator=g) * std, torch.randn(d_out, rank, generator=g) * std)
                 for m in MODULES}, scale=scale, base_model=BASE, hypernet=hypernet)


class Source:
    """An in-memory `AdapterSource` that counts reads."""

    def __init__(self, adapters: dict[str, LoRA]) -> None:
        self.adapters = adapters
        self.reads = 0

    def get_adapters(self, memory_ids, *, base_model: str | None, hypernet: str | None) -> dict[str, LoRA]:
        self.reads += len(memory_ids)
        return {memory_id: self.adapters[memory_id] for memory_id in memory_ids}

    def existing(self, memory_ids) -> set[str]:
        return set(memory_ids) & set(self.adapters)


def mid(i: int) -> str:
    return f"{i:032x}"


def test_concat_is_the_weighted_sum_of_deltas() -> None:
    loras = [random_lora(1), random_lora(2, scale=2.0), random_lora(3, rank=4)]  # real down_proj shapes
    weights = [1.0, 0.5, -2.0]
    out = compose(loras, weights, rank_budget=64)
    assert out.rank == 20 and out.lora.rank == 32 and not out.truncated and out.rel_error == 0.0
    for m in MODULES:
        expected = sum(w * lo.delta(m) for lo, w in zip(loras, weights, strict=True))
        torch.testing.assert_close(out.lora.delta(m), expected, rtol=1e-5, atol=1e-7)


def test_relevance_weights_sum_to_one_and_favour_the_best_match() -> None:
    scores = [0.7, 0.55, 0.5, 0.3]
    weights = member_weights("relevance", scores, temperature=0.1)
    assert weights == sorted(weights, reverse=True) and abs(sum(weights) - 1) <= 0.02
    assert weights[0] > 0.5 and weights[-1] < 0.02
    assert member_weights("relevance", scores, temperature=100.0) == [0.25] * 4  # a flat softmax is the mean
    assert member_weights("relevance", [0.4], temperature=0.1) == [1.0]
    with pytest.raises(ValueError, match="at least one member"):
        member_weights("relevance", [], temperature=0.1)
    with pytest.raises(ValueError, match="temperature must be positive"):
        member_weights("relevance", scores, temperature=0.0)


def test_truncation_error_is_the_dropped_singular_values() -> None:
    # small modules: a full SVD of 576 x 1536 takes seconds on a shared CPU
    loras = [random_lora(i, shape=(48, 80)) for i in range(4)]  # stacked rank 32 > budget 16
    out = compose(loras, rank_budget=16)
    assert out.truncated and out.rank == 16 and out.lora.rank == 16
    kept = dropped = 0.0
    for m in MODULES:
        full = sum(lo.delta(m) for lo in loras)
        s = torch.linalg.svdvals(full)
        kept += float((s[:16] ** 2).sum())
        dropped += float((s[16:] ** 2).sum())
        # Eckart-Young: the truncation is the best rank-16 approximation, its error the dropped tail
        err = torch.linalg.matrix_norm(full - out.lora.delta(m))
        assert math.isclose(float(err), math.sqrt(float((s[16:] ** 2).sum())), rel_tol=1e-6)
    assert math.isclose(out.rel_error, math.sqrt(dropped / (kept + dropped)), rel_tol=1e-6)
    assert 0 < out.rel_error < 1


@pytest.mark.parametrize(("rank", "padded"),
                         [(1, 1), (2, 8), (8, 8), (9, 16), (40, 64), (300, 320), (512, 512)])
def test_ranks_pad_to_what_vllm_accepts(rank: int, padded: int) -> None:
    assert vllm_rank(rank) == padded


def test_padding_keeps_the_delta_and_bad_ranks_are_refused() -> None:
    a, b = random_lora(1, rank=3), random_lora(2, rank=2)
    out = compose([a, b], rank_budget=64)
    assert out.rank == 5 and out.lora.rank == 8 and out.lora.rank in VLLM_RANKS
    torch.testing.assert_close(out.lora.delta(MODULES[0]), a.delta(MODULES[0]) + b.delta(MODULES[0]))
    for bad in (0, 513):
        with pytest.raises(ValueError):
            vllm_rank(bad)
    with pytest.raises(ValueError):
        compose([random_lora(1)], rank_budget=1000)


def test_cache_hit_reads_no_adapters_and_key_covers_the_recipe(tmp_path) -> None:
    source = Source({mid(1): random_lora(1), mid(2): random_lora(2)})
    cache = ComposedCache(tmp_path)
    recipe = Recipe(members=((mid(2), 1.0), (mid(1), 0.5)), base_model=BASE)
    first = cache.get_or_compose(recipe, source)
    assert source.reads == 2 and first.name.startswith("d2l-")
    assert (first.path / "adapter_config.json").is_file()
    again = cache.get_or_compose(Recipe(members=((mid(1), 0.5), (mid(2), 1.0)), base_model=BASE), source)
    assert source.reads == 2 and again.name == first.name  # member order does not matter
    torch.testing.assert_close(again.lora.delta(MODULES[1]), first.lora.delta(MODULES[1]))
    others = [Recipe(members=((mid(1), 1.0), (mid(2), 1.0)), base_model=BASE),
              Recipe(members=recipe.members, base_model="other-model"),
              Recipe(members=recipe.members, base_model=BASE, hypernet="abc"),
              Recipe(members=recipe.members, base_model=BASE, rank_budget=8)]
    assert len({r.name for r in others} | {first.name}) == 5
    with pytest.raises(ValueError):
        Recipe(members=((mid(1), 1.0), (mid(1), 2.0)), base_model=BASE)


def test_foreign_adapters_are_never_composed(tmp_path) -> None:
    source = Source({mid(1): random_lora(1, hypernet="old")})
    with pytest.raises(AdapterError):
        ComposedCache(tmp_path).get_or_compose(Recipe(members=((mid(1), 1.0),), base_model=BASE,
                                                      hypernet="new"), source)


def test_erase_drops_every_entry_containing_a_forgotten_memory(tmp_path) -> None:
    source = Source({mid(i): random_lora(i) for i in range(1, 4)})
    cache = ComposedCache(tmp_path)
    ab = cache.get_or_compose(Recipe(members=((mid(1), 1.0), (mid(2), 1.0)), base_model=BASE), source)
    bc = cache.get_or_compose(Recipe(members=((mid(2), 1.0), (mid(3), 1.0)), base_model=BASE), source)
    c = cache.get_or_compose(Recipe(members=((mid(3), 1.0),), base_model=BASE), source)
    assert sorted(cache.erase([mid(2)])) == sorted([ab.name, bc.name])
    assert not ab.path.exists() and not bc.path.exists() and cache.get(c.name) is not None
    assert cache.recipe(ab.name) is None  # nothing of the forgotten memory stays, not even the recipe
    assert cache.erase([mid(9)]) == []


def test_lru_eviction_keeps_recipes_and_recomposes(tmp_path) -> None:
    source = Source({mid(i): random_lora(i) for i in range(1, 5)})
    one = Recipe(members=((mid(1), 1.0),), base_model=BASE)
    cache = ComposedCache(tmp_path, max_bytes=10**9)
    size = cache.get_or_compose(one, source).path.joinpath("adapter_model.safetensors").stat().st_size
    cache.max_bytes = 2 * size + 100  # room for two entries
    names = [cache.get_or_compose(Recipe(members=((mid(i), 1.0),), base_model=BASE), source).name
             for i in (2, 3)]
    assert cache.names() == names  # the first entry, least recently used, lost its weights
    assert cache.get(one.name) is None and cache.recipe(one.name) == one
    assert cache.size_bytes() <= cache.max_bytes
    reads = source.reads
    assert cache.get_or_compose(one, source).name == one.name and source.reads == reads + 1


def test_entries_are_whole_and_loadable_by_peft_config(tmp_path) -> None:
    cache = ComposedCache(tmp_path)
    entry = cache.export(random_lora(7, rank=5))
    config = json.loads((entry.path / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 8.0 and entry.rank == 5
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    assert cache.export(random_lora(7, rank=5)).name == entry.name  # named by content, stably
    assert random_lora(7, rank=5).content_hash() != random_lora(8, rank=5).content_hash()


@pytest.mark.parametrize("name", ["../x", "d2l-../../etc", "a/b", "/abs", "..", "D2L-ABC", "d2l_x", "",
                                  "d2l-x\n", "x" * 200])
def test_names_with_path_characters_are_refused(tmp_path, name: str) -> None:
    cache = ComposedCache(tmp_path)
    with pytest.raises(ValueError):
        check_name(name)
    with pytest.raises(ValueError):
        cache.get(name)
    with pytest.raises(ValueError):
        cache.recipe(name)


def test_forgetting_a_memory_in_the_store_erases_its_compositions(tmp_path) -> None:
    from d2l_memory.store import MemoryStore

    store = MemoryStore(tmp_path / "db")
    cache = ComposedCache(tmp_path / "composed")
    store.on_erase(cache.erase)
    vector = [1.0] + [0.0] * 383
    one, two = (store.add("alice", random_lora(i), vector=vector).id for i in (1, 2))
    both = cache.get_or_compose(Recipe(members=((one, 1.0), (two, 1.0)), base_model=BASE), store)
    alone = cache.get_or_compose(Recipe(members=((two, 1.0),), base_model=BASE), store)
    torch.testing.assert_close(both.lora.delta(MODULES[0]),
                               random_lora(1).delta(MODULES[0]) + random_lora(2).delta(MODULES[0]))
    store.delete(one)
    assert not both.path.exists() and cache.recipe(both.name) is None
    assert cache.get(alone.name) is not None


def test_a_cache_never_touches_a_cache_nested_under_its_root(tmp_path) -> None:
    outer, inner = ComposedCache(tmp_path), ComposedCache(tmp_path / "0123456789abcdef")
    entry = inner.export(random_lora(1))
    outer.export(random_lora(2))
    outer.clear()
    assert outer.names() == [] and inner.get(entry.name) is not None


def test_server_and_memory_share_the_store_cache(tmp_path, monkeypatch) -> None:
    # `d2l-memory serve --store` (through the resolver's env) must serve the directory D2LMemory writes to.
    from d2l_memory.compose import cache_root_for
    from d2l_memory.engines.resolver_plugin import cache_from_env

    monkeypatch.setenv("D2L_MEMORY_HOME", str(tmp_path / "home"))
    store = tmp_path / "memories"
    assert cache_root_for(store) == cache_root_for(f"{tmp_path}/./memories/")  # one root per store, any spelling
    assert cache_root_for(store) != cache_root_for(tmp_path / "other")
    monkeypatch.delenv("D2L_MEMORY_COMPOSED_DIR", raising=False)
    monkeypatch.setenv("D2L_MEMORY_STORE_URI", str(store))
    assert cache_from_env().root == cache_root_for(store)
    monkeypatch.setenv("D2L_MEMORY_COMPOSED_DIR", str(tmp_path / "explicit"))
    assert cache_from_env().root == tmp_path / "explicit"


def test_server_engine_by_name_accepts_the_memory_targets() -> None:
    # D2LMemory passes lora_target_modules to every vLLM engine; a running server's engine ignores it.
    from d2l_memory.engines import make_engine

    engine = make_engine("vllm-server", url="http://127.0.0.1:9", lora_target_modules=("down_proj",))
    assert engine.url == "http://127.0.0.1:9"
    engine.http.close()
