"""What the benchmarks share: timing, peak memory, tables, and the memory benchmarks' systems and harness."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, get_args

import numpy as np
import psutil
import torch

from d2l_memory.engines.base import GenerationParams, render_chat
from d2l_memory.lora import LoRA
from d2l_memory.memory import MemoryConfig
from d2l_memory.prompts import QA_TEMPLATE
from d2l_memory.training.cd import GENERIC_PROBES, context_distill
from d2l_memory.transcripts import segment_turns

if TYPE_CHECKING:
    from d2l_memory.memory import D2LMemory
    from d2l_memory.models import LoadedModel


@contextmanager
def peak_rss() -> Iterator[dict[str, int]]:
    """Sample this process's resident memory every 5 ms; yields a dict filled with `peak` and `start`."""
    proc, result, stop = psutil.Process(), {"start": psutil.Process().memory_info().rss, "peak": 0}, threading.Event()

    def watch() -> None:
        while not stop.is_set():
            result["peak"] = max(result["peak"], proc.memory_info().rss)
            time.sleep(0.005)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        result["peak"] = max(result["peak"], proc.memory_info().rss)


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """Fastest wall time of `repeats` calls (seconds): the least disturbed run on a shared machine."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def environment() -> str:
    """One line naming the date, machine and commit a result was measured on."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=False).stdout.strip() or "uncommitted"
    except OSError:
        commit = "unknown"
    return (f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.machine()}, {os.cpu_count()} CPUs, "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB, commit {commit}")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table (what docs/benchmarks.md holds)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# -- the memory benchmarks' shared harness --------------------------------------------------------------
# Every memory benchmark compares these systems, all answering with the same base model and prompt format:
#   adapter       D2LMemory mode="adapter": recalled memories' adapters composed, nothing in the prompt (ours)
#   hybrid        D2LMemory mode="hybrid": the adapters plus the best recalled snippet in the prompt
#   full-history  the whole history in the prompt, keeping its most recent tokens that fit the window
#   rag           D2LMemory mode="context": the same top-k recall from the same LanceDB, text in the prompt
#                 (what mem0/Zep-style memories do)
#   cd            per-document context distillation: a gradient-trained LoRA per memory, stored and recalled
#                 like ours (d2l_memory.training.cd), answered in mode="adapter"
#   none          the base model alone
SYSTEMS: tuple[str, ...] = ("adapter", "hybrid", "full-history", "rag", "cd", "none")
MODE_OF = {"adapter": "adapter", "hybrid": "hybrid", "rag": "context", "cd": "adapter", "none": "none"}


class Answer(NamedTuple):
    """One system's answer to one question, with what it cost."""

    text: str
    seconds: float
    prompt_tokens: int


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (linear interpolation), 0.0 for no values."""
    return float(np.percentile(values, q)) if len(values) else 0.0


def segments(sessions: Sequence[tuple[str, Sequence[str]]], tokenizer: Any, budget: int) -> list[str]:
    """Dated sessions as the memories `D2LMemory.absorb_messages` would make of them, each starting with
    its session's header line (e.g. its date)."""
    count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    return [seg for header, turns in sessions for seg in segment_turns(turns, count, budget, header)]


def ask(mem: D2LMemory, question: str, user_id: str, system: str, max_new_tokens: int) -> Answer:
    """Answer through the real API (`prepare` = recall, gate, compose; then the engine), timed end to end."""
    start = time.perf_counter()
    messages, adapter = mem.prepare(question, user_id, MODE_OF[system])
    text = mem.engine.generate(messages, adapter, GenerationParams(max_new_tokens=max_new_tokens))
    seconds = time.perf_counter() - start
    return Answer(text.strip(), seconds, len(render_chat(mem.d2l.base.tokenizer, messages)))


class HistoryReader:
    """The full-history baseline: `history` in the prompt (the `context` modes' format), cut to its most
    recent tokens so that the prompt, a question of up to `question_tokens` and the answer fit the window
    (the model's, or a smaller `window`).

    The history prefix is prefilled once and its KV cache reused for every question (cropped back after
    each): the tokens and answers are those of a cold query, computed once. `answer` reports the latency
    of a cold query, `prefill_s` (measured once) plus the question's own prefill and decoding, because
    without a prefix cache (vLLM on CPU has none here) every query pays the whole prefill.
    """

    def __init__(self, base: LoadedModel, history: str, max_new_tokens: int, question_tokens: int = 96,
                 window: int | None = None) -> None:
        self.base, self.max_new_tokens = base, max_new_tokens
        tok = base.tokenizer
        marker = "\u2063HISTORY\u2063"
        rendered = tok.apply_chat_template(
            [{"role": "user", "content": QA_TEMPLATE.format(context=marker, question="\u2063Q\u2063")}],
            add_generation_prompt=True, tokenize=False)
        before, rest = rendered.split(marker)
        self._middle, self._after = rest.split("\u2063Q\u2063")
        self._before = tok(before, add_special_tokens=False)["input_ids"]
        window = window or int(getattr(base.model.config, "max_position_embeddings", 8192))
        fixed = len(self._before) + len(self._encode(self._middle + self._after)) + question_tokens
        ids = self._encode(history)
        self.budget = window - fixed - max_new_tokens
        self.history_tokens = min(len(ids), self.budget)
        self.truncated = len(ids) > self.budget
        self._prefix = self._before + ids[len(ids) - self.history_tokens:]
        start = time.perf_counter()
        with base.lock, torch.inference_mode():
            self._cache = base.model(input_ids=torch.tensor([self._prefix]), use_cache=True,
                                     logits_to_keep=1).past_key_values
        self.prefill_s = time.perf_counter() - start

    def _encode(self, text: str) -> list[int]:
        return self.base.tokenizer(text, add_special_tokens=False)["input_ids"]

    def answer(self, question: str) -> Answer:
        q_ids = self._encode(self._middle + question + self._after)
        eos = {self.base.tokenizer.eos_token_id, *self._eos_ids()}
        start = time.perf_counter()
        out: list[int] = []
        with self.base.lock, torch.inference_mode():
            ids = torch.tensor([q_ids])
            for _ in range(self.max_new_tokens):
                step = self.base.model(input_ids=ids, past_key_values=self._cache, use_cache=True, logits_to_keep=1)
                token = int(step.logits[0, -1].argmax())
                if token in eos:
                    break
                out.append(token)
                ids = torch.tensor([[token]])
            extra = self._cache.get_seq_length() - len(self._prefix)
            if extra > 0:
                self._cache.crop(-extra)  # back to the history prefix for the next question
        seconds = self.prefill_s + time.perf_counter() - start
        text = self.base.tokenizer.decode(out, skip_special_tokens=True).strip()
        return Answer(text, seconds, len(self._prefix) + len(q_ids))

    def _eos_ids(self) -> list[int]:
        eos = self.base.model.generation_config.eos_token_id
        return [eos] if isinstance(eos, int) else list(eos or [])


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (benchmarks draw PNGs, never windows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> None:
    """Lay out `fig`, write it as a PNG to `path` (parents created) and free it."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    pyplot().close(fig)


def smoke_probes(n: int | None) -> dict[str, Any]:
    """`context_distill` keyword arguments for `n` generic probes only (quick sizes: a smoke test of the
    harness, about 5x cheaper than CD's default probes and not a measurement of CD); None: the default."""
    if n is None:
        return {}
    return {"queries": list(GENERIC_PROBES[:n])}


def distill_into_store(mem: D2LMemory, texts: Sequence[str], user_id: str, steps: int,
                       session_ids: Sequence[str | None] | None = None, probes: int | None = None) -> list[float]:
    """The `cd` system's absorb: one context-distilled LoRA per memory text, stored for `user_id` like
    any adapter (tagged with the hypernetwork's checksum so that the same recall/compose path serves it).
    Returns the seconds each distillation took (the store write excluded, as for `absorb_timed`)."""
    seconds = []
    tok = mem.d2l.base.tokenizer
    for i, text in enumerate(texts):
        start = time.perf_counter()
        lora = context_distill(mem.d2l, text, steps=steps, seed=i, **smoke_probes(probes))
        seconds.append(time.perf_counter() - start)
        lora = LoRA(lora.weights, scale=lora.scale, base_model=mem.d2l.base.model_id, hypernet=mem.d2l.checksum,
                    n_chunks=lora.n_chunks, bias_rows=lora.bias_rows)
        mem.store.add(user_id, lora, text=text, kind="chat", n_tokens=len(tok(text, add_special_tokens=False)
                      ["input_ids"]), session_id=session_ids[i] if session_ids else None)
    return seconds


def absorb_timed(mem: D2LMemory, texts: Sequence[str], user_id: str,
                 session_ids: Sequence[str | None] | None = None) -> list[float]:
    """Ours: `D2LMemory.absorb` of each memory text (internalize + store), seconds per memory."""
    seconds = []
    for i, text in enumerate(texts):
        start = time.perf_counter()
        mem.absorb(text, user_id, "chat", session_id=session_ids[i] if session_ids else None)
        seconds.append(time.perf_counter() - start)
    return seconds


@contextmanager
def memory_in_tempdir(**config: Any) -> Iterator[D2LMemory]:
    """A `D2LMemory` (transformers engine, shipped hypernetwork) on a fresh LanceDB store in a temp dir;
    the store and its composed-adapter cache are deleted afterwards. `config` entries set to None keep
    `MemoryConfig`'s default."""
    from d2l_memory import D2LMemory

    root = Path(tempfile.mkdtemp(prefix="d2l-bench-"))
    mem = D2LMemory(root / "store", **{key: value for key, value in config.items() if value is not None})
    try:
        yield mem
    finally:
        mem.close()
        shutil.rmtree(mem.cache.root, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)


def save_json(path: str | Path | None, result: Mapping[str, Any]) -> None:
    """Write a benchmark's result as JSON (no-op for None)."""
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=1, default=str))


def report(result: Mapping[str, Any], args: argparse.Namespace, render: Callable[[Any], str],
           plot: Callable[[Any, Path], None]) -> None:
    """A benchmark's ending: print its tables, write its JSON (`--out`) and draw its figure (`--plot`)."""
    print(render(result))
    save_json(args.out, result)
    if args.plot:
        plot(result, args.plot)


def bench_args(description: str, quick_help: str, systems: bool = False) -> argparse.ArgumentParser:
    """The arguments every benchmark takes: `--quick`, `--out` (JSON result), `--plot` (PNG); with
    `systems`, also `--systems` (a memory benchmark run for some of its systems only), `--composition`
    (how the recalled memories' adapters are weighted) and `--hypernet` (which checkpoint writes them)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    parser.add_argument("--plot", type=Path, default=None, help="draw the figure into this PNG (docs/img/...)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the dev machine has 2 shared cores)")
    if systems:
        parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=None,
                            help="run only these systems (default: every system of the size)")
        parser.add_argument("--composition", choices=get_args(MemoryConfig.model_fields["composition"].annotation),
                            default=None, help="sum or mean of the recalled adapters (default: MemoryConfig's)")
        parser.add_argument("--hypernet", type=Path, default=None,
                            help="hypernetwork checkpoint dir (default: the shipped one), e.g. a training candidate")
    return parser


def system_list(cd: bool) -> tuple[str, ...]:
    """The systems a run compares: all, less `cd` when the size leaves it out."""
    return tuple(s for s in SYSTEMS if s != "cd" or cd)
