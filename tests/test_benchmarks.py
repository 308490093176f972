"""The memory benchmarks' quick sizes run end to end (real model, store and engine) and report every
system with sane values; the scorers follow the papers' protocols."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
from typer.testing import CliRunner

from d2l_memory.benchmarks import common, locomo, longmemeval
from d2l_memory.cli import BENCHMARKS, app
from d2l_memory.d2l import shipped_checkpoint
from d2l_memory.hypernet import HypernetConfig
from d2l_memory.models import DEFAULT_MODEL
from d2l_memory.scoring import echoes


def _systems() -> set[str]:
    return set(common.SYSTEMS)


def _run_main(module, tmp_path, monkeypatch, *extra: str) -> dict:
    out = tmp_path / f"{module.__name__.rsplit('.', 1)[-1]}.json"
    plot = tmp_path / "plot.png"
    monkeypatch.setattr(sys, "argv", [module.__name__, "--quick", "--out", str(out), "--plot", str(plot), *extra])
    module.main()
    assert plot.stat().st_size > 10_000  # a real figure was drawn
    return json.loads(out.read_text())


def test_registry_names_every_benchmark_module():
    for name in ("internalize", "locomo", "longmemeval", "needle", "cost", "gate", "composition", "store",
                 "train-throughput", "recall", "object-store", "resolve"):
        module = __import__(BENCHMARKS[name], fromlist=["main"])
        assert callable(module.main)


def test_locomo_scoring_follows_the_paper():
    assert locomo.f1_score("Adoption agencies!", "adoption agencies") == 1.0
    assert locomo.f1_score("the and", "x") == 0.0  # articles and "and" are dropped, as LoCoMo does
    assert locomo.multi_f1("psychology, counseling", "Psychology, counseling certification") == pytest.approx(
        (1.0 + 2 * 0.5 / 1.5) / 2)
    qa = {"category": 5, "question": "q", "adversarial_answer": "a dog"}
    question, options = locomo.prompt_for(qa, __import__("random").Random(0))
    no_info = next(k for k, v in options.items() if v == locomo.NO_INFO)
    assert "(a)" in question and "(b)" in question
    assert locomo.score(qa, f"({no_info})", options) == 1.0
    assert locomo.score(qa, "No information available.", options) == 1.0
    assert locomo.score(qa, "I like turtles", options) == 0.0
    assert locomo.score({"category": 3, "answer": "likely yes; she said so"}, "likely yes", {}) == 1.0


def test_longmemeval_scoring():
    assert longmemeval.correct({"question_id": "x", "answer": "over a year"}, "It took Over a year.") == 1.0
    assert longmemeval.correct({"question_id": "x", "answer": 7}, "I packed 741 shirts") == 0.0
    assert longmemeval.correct({"question_id": "x_abs", "answer": "n/a"}, "You did not mention that.") == 1.0
    assert longmemeval.correct({"question_id": "x_abs", "answer": "n/a"}, "Blue.") == 0.0


def test_store_benchmark_measures_a_real_store():
    from d2l_memory.benchmarks.store import _COLUMNS, run_store_bench

    (result,) = run_store_bench(False, sizes=[300], settings=("many",), rank=1, n_adds=5, n_searches=10)
    assert set(_COLUMNS) <= set(result) and result["memories"] == 305 and result["users"] == 3
    assert result["recall@5"] == 1.0 == result["recall@5_opt"]  # small scopes are searched exactly
    assert result["bytes_per_memory_after"] > result["adapter_bytes"] > 100_000


def test_an_answer_that_says_the_memory_back_is_an_echo():
    told = "Hi! My name is Alice and my favorite color is teal. What about you?"
    assert echoes("User: Hi! My name is Alice and my favorite color is teal.", told) == 1.0
    assert echoes("Your favorite color is teal, Alice.", told) == 0.0
    assert echoes("teal", told) == 0.0 and echoes("anything", "too short") == 0.0


@pytest.mark.slow
def test_history_is_cut_to_its_most_recent_tokens(base):
    reader = common.HistoryReader(base, "old news. " * 400 + "The code is 4711.", max_new_tokens=8, window=512)
    assert reader.truncated and reader.history_tokens == reader.budget
    got = reader.answer("What is the code?")
    assert got.prompt_tokens <= 512 - 8 and got.seconds >= reader.prefill_s
    assert reader.answer("What is the code?").text == got.text  # the cache is back to the prefix each time


@pytest.mark.slow
def test_locomo_quick_through_the_cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["bench", "locomo", "--quick"])
    assert result.exit_code == 0, result.output
    rows = {}
    for line in result.output.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 10 and cells[0] in common.SYSTEMS:
            rows[cells[0]] = cells
    assert set(rows) == _systems() - {"cd"}  # the quick size leaves CD to LongMemEval's
    for cells in rows.values():
        assert 0.0 <= float(cells[1]) <= 1.0  # F1 on categories 1-4
        p50, p95 = map(float, cells[8].split(" / "))
        assert p95 >= p50 > 0
    # what separates the systems: the prompt each one pays for, and who pays at write time
    tokens = {s: float(cells[7]) for s, cells in rows.items()}
    assert tokens["none"] <= tokens["adapter"] < tokens["hybrid"] < tokens["full-history"]
    assert tokens["adapter"] < tokens["rag"]
    absorb = {s: float(cells[9]) for s, cells in rows.items()}
    assert absorb["adapter"] > 0 and absorb["full-history"] == absorb["none"] == 0


def test_a_missing_candidate_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no hypernetwork checkpoint in .*missing"):
        locomo.run(locomo.SIZES["quick"], ["adapter"], hypernet=tmp_path / "missing")


@pytest.mark.slow
def test_longmemeval_quick_values(tmp_path, monkeypatch):
    candidate = shutil.copytree(shipped_checkpoint("smollm2-135m-instruct"), tmp_path / "candidate")
    result = _run_main(longmemeval, tmp_path, monkeypatch, "--composition", "sum", "--hypernet", str(candidate))
    assert result["composition"] == "sum"  # the default is relevance: the option reached the memory
    assert result["hypernet"] == str(candidate)
    summary = result["summary"]
    assert set(summary) == _systems()
    for row in summary.values():
        assert 0.0 <= row["accuracy"] <= 1.0 and row["n"] == len(longmemeval.QUICK.types)
        assert set(row["by_type"]) == set(longmemeval.QUICK.types)
    assert summary["adapter"]["prompt_tokens"] < summary["full-history"]["prompt_tokens"]


@pytest.mark.slow
def test_needle_quick_values(tmp_path, monkeypatch):
    from d2l_memory.benchmarks import needle

    result = _run_main(needle, tmp_path, monkeypatch)
    sweep = result["needle"]["needle_256"]
    assert {"adapter", "icl", "none"} <= set(sweep) and sweep["icl"] >= sweep["none"]
    assert result["squad"]["icl"] >= result["squad"]["none"]  # the model reads SQuAD passages in its prompt
    assert all(0.0 <= result["squad"][s] <= 1.0 for s in ("adapter", "icl", "none"))


@pytest.mark.slow
def test_cost_quick_values(tmp_path, monkeypatch):
    from d2l_memory.benchmarks import cost

    result = _run_main(cost, tmp_path, monkeypatch)
    b = result["bytes"]
    assert b["kv_measured_bytes"] == b["kv_per_token"] * b["kv_measured_tokens"]  # the formula holds
    rows = {r["tokens"]: r for r in b["rows"]}
    assert rows[1024]["kv_bytes"] == 23_040 * 1024  # SmolLM2: 30 layers x 2 x 3 heads x 64 x bf16
    shipped = HypernetConfig.model_validate_json((shipped_checkpoint(DEFAULT_MODEL) / "config.json").read_text())
    assert rows[32768]["adapter_rank"] == 64 * shipped.chunk_rank + shipped.rank  # 64 chunks and the bias slot
    assert rows[32768]["served_rank"] == 64
    write = result["writes"][0]
    assert write["absorb_s"] > 0 and (write["cd_s"] is None or write["cd_s"] > 0)
    assert result["first_token_s"]["context_1024"] > result["first_token_s"]["adapter"]


def test_gate_calibration_quick(tmp_path, monkeypatch):
    from d2l_memory.benchmarks import gate

    result = _run_main(gate, tmp_path, monkeypatch)
    assert set(result["scorings"]) == {"whole", "best part"}
    for scoring in result["scorings"].values():
        rows = scoring["rows"]
        assert [r["threshold"] for r in rows] == list(gate.THRESHOLDS)
        for name in rows[0]:
            if name != "threshold":  # a higher threshold lets fewer questions through, of every sort
                assert all(0.0 <= r[name] <= 1.0 for r in rows)
                assert [r[name] for r in rows] == sorted((r[name] for r in rows), reverse=True)
        # Questions about a memory are far more similar to it than unrelated ones.
        assert scoring["similarity"]["first person"]["p50"] > scoring["similarity"]["unrelated"]["p50"] + 0.1
    whole, parts = (result["scorings"][k]["rows"] for k in ("whole", "best part"))
    # Scoring by the best part lets at least as many related questions through at every threshold.
    assert all(p["related first person"] >= w["related first person"] for w, p in zip(whole, parts, strict=True))
    conversations = result["conversations"]
    assert conversations["users"] == 10 and conversations["memories"] >= 10 and conversations["chat_questions"] > 0
    for name in conversations["rows"][0]:
        values = [r[name] for r in conversations["rows"]]
        assert name == "threshold" or (all(0.0 <= v <= 1.0 for v in values) and values == sorted(values, reverse=True))
    assert result["personal_default"] < result["default"]


def test_composition_quick(tmp_path, monkeypatch):
    from d2l_memory.benchmarks import composition

    result = _run_main(composition, tmp_path, monkeypatch, "--rank-budget", "128")
    assert result["rank_budget"] == 128  # the default is 64: the option reached the memory
    assert set(result["accuracy"]) == set(composition.SYSTEMS)
    assert all(0.0 <= v <= 1.0 for v in result["accuracy"].values())
    assert 1.0 <= result["composed_per_question"] <= composition.QUICK.memories  # the asked memory is recalled


def test_train_throughput_quick_trains_both_variants_on_the_same_examples(tmp_path, monkeypatch):
    from d2l_memory.benchmarks import train_throughput

    result = _run_main(train_throughput, tmp_path, monkeypatch)
    before, after = result["variants"]["before"], result["variants"]["after"]
    assert before["examples"] == after["examples"] == 2 * 4
    assert result["speedup"] > 0 and before["eval_loss"] > 0
    # Micro-batching changes only how chunks are padded, not what is computed: same held-out loss.
    assert after["eval_loss"] == pytest.approx(before["eval_loss"], rel=1e-3)
