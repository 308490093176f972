"""The embedded transformers engine on the real base model: greedy answers, per-row adapters, streaming."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from chats import BASE, COLOR, FRANCE, HELLO, SHORT, down_proj_lora

from d2l_memory.compose import ComposedCache, Recipe
from d2l_memory.engines import GenerationParams, make_engine
from d2l_memory.engines.transformers_engine import TransformersEngine
from d2l_memory.errors import AdapterError
from d2l_memory.lora import LoRA

pytestmark = pytest.mark.slow



@pytest.fixture(scope="module")
def engine() -> TransformersEngine:
    return TransformersEngine(BASE)


@pytest.fixture(scope="module")
def adapters() -> dict[str, LoRA | None]:
    return {"base": None, "a": down_proj_lora(1, 0.05), "b": down_proj_lora(6, 0.08)}


@pytest.fixture(scope="module")
def alone(engine: TransformersEngine, adapters: dict[str, LoRA | None]) -> dict[tuple[str, str], str]:
    """Each (prompt, adapter) answered on its own, once for the whole module (CPU time is scarce)."""
    prompts = {"france": FRANCE, "hello": HELLO, "color": COLOR}
    pairs = [("france", "base"), ("france", "a"), ("france", "b"), ("hello", "base"), ("color", "a")]
    return {(p, k): engine.generate(prompts[p], adapters[k], SHORT) for p, k in pairs}


def test_greedy_answer_is_right_and_reproducible(engine: TransformersEngine, alone: dict) -> None:
    assert "Paris" in alone["france", "base"]
    assert engine.generate(FRANCE, None, SHORT) == alone["france", "base"]  # also: adapters left no trace


def test_adapters_change_the_answer(alone: dict) -> None:
    answers = {alone["france", k] for k in ("base", "a", "b")}
    assert len(answers) == 3


def test_rows_with_different_adapters_in_one_batch_equal_each_alone(
        engine: TransformersEngine, adapters: dict[str, LoRA | None], alone: dict) -> None:
    a, b = adapters["a"], adapters["b"]
    requests = [(FRANCE, a), (HELLO, None), (FRANCE, b), (COLOR, a), (FRANCE, None)]
    batch = engine.generate_batch(requests, SHORT)
    assert batch == [alone["france", "a"], alone["hello", "base"], alone["france", "b"], alone["color", "a"],
                     alone["france", "base"]]


def test_streamed_text_equals_generated_text(engine: TransformersEngine, adapters: dict[str, LoRA | None],
                                             alone: dict) -> None:
    pieces = list(engine.stream(FRANCE, adapters["a"], SHORT))
    assert len(pieces) > 1 and "".join(pieces) == alone["france", "a"]


def test_streams_step_from_any_thread_and_interleave(engine: TransformersEngine,
                                                     adapters: dict[str, LoRA | None], alone: dict) -> None:
    # What a web server's thread pool does: each step of an answer on whichever thread is free, other
    # requests in between, and a client that leaves closes its answer from yet another thread.
    def on_new_thread(fn, *args):  # a timeout, not a hang, when a step waits on a lock another thread kept
        pool = ThreadPoolExecutor(max_workers=1)  # a fresh thread each time: a pool reuses its idle ones
        try:
            return pool.submit(fn, *args).result(timeout=120)
        finally:
            pool.shutdown(wait=False)

    first, second = engine.stream(FRANCE, adapters["a"], SHORT), engine.stream(FRANCE, None, SHORT)
    pieces = [on_new_thread(next, first)]
    assert on_new_thread(next, second)
    assert on_new_thread(engine.generate, HELLO, None, SHORT) == alone["hello", "base"]
    pieces += on_new_thread(list, first)
    on_new_thread(second.close)
    assert "".join(pieces) == alone["france", "a"]
    assert engine.generate(FRANCE, None, SHORT) == alone["france", "base"]  # the lock is free, no hooks left


def test_stop_string_ends_the_answer_before_it_in_both_paths(engine: TransformersEngine) -> None:
    params = GenerationParams(max_new_tokens=12, stop=("Paris",))
    answer = engine.generate(FRANCE, None, params)
    assert answer and "Paris" not in answer and "France is" in answer
    assert "".join(engine.stream(FRANCE, None, params)) == answer


def test_sampling_is_reproducible_with_a_seed(engine: TransformersEngine) -> None:
    params = GenerationParams(max_new_tokens=8, temperature=0.8, top_p=0.9, seed=3)
    assert "".join(engine.stream(FRANCE, None, params)) == "".join(engine.stream(FRANCE, None, params))


def test_composed_adapters_from_the_cache_serve_like_their_lora(
        engine: TransformersEngine, adapters: dict[str, LoRA | None], alone: dict, tmp_path) -> None:
    class Source:
        def get_adapters(self, memory_ids, *, base_model: str | None, hypernet: str | None) -> dict[str, LoRA]:
            return {memory_id: adapters["a"] for memory_id in memory_ids}

        def existing(self, memory_ids) -> set[str]:
            return set(memory_ids)

    composed = ComposedCache(tmp_path).get_or_compose(
        Recipe(members=((f"{1:032x}", 1.0),), base_model=BASE), Source())
    assert composed.lora.rank == 8
    assert engine.generate(FRANCE, composed, SHORT) == alone["france", "a"]


def test_bad_requests_are_refused(engine: TransformersEngine) -> None:
    with pytest.raises(TypeError):
        engine.generate("What is the capital of France?")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        engine.generate([])
    with pytest.raises(ValueError):
        engine.generate([{"role": "wizard", "content": "hi"}])
    wrong_shape = LoRA({"model.layers.0.mlp.down_proj": (torch.zeros(8, 100), torch.zeros(576, 8))},
                       base_model=BASE)
    with pytest.raises(AdapterError):
        engine.generate(FRANCE, wrong_shape)
    with pytest.raises(AdapterError):
        engine.generate(FRANCE, LoRA(down_proj_lora(1, 0.05).weights, base_model="another-model"))
    with pytest.raises(ValueError):
        make_engine("tgi")  # type: ignore[arg-type]


def test_make_engine_shares_a_loaded_model(engine: TransformersEngine, alone: dict) -> None:
    other = make_engine("transformers", loaded=engine.loaded)
    assert other.model is engine.model
    assert other.generate(HELLO, None, SHORT) == alone["hello", "base"]
