"""Needle in a haystack up to 32k tokens, and SQuAD F1, through the meta-training evaluation (`run_eval`).

    python -m d2l_memory.benchmarks.needle [--quick] [--out result.json] [--plot docs/img/bench-needle.png]

Both tasks are `d2l_memory.training.evaluate.run_eval`'s, reused as they are: a secret code hidden at a
random depth in Paul Graham essay filler of each length (exact match), and the SQuAD v1.1 dev sample
(token F1, reported also as a fraction of the in-context score, the paper's normalisation). Systems:
`adapter` (the document internalized, nothing in the prompt), `icl` (the document in the prompt, only
where it fits the 8k window: that is the full-history system here), `none`, and with `cd_n > 0` `cd`
(per-document context distillation, on SQuAD only: its teacher must hold the document in its window). The Doc-to-LoRA
paper's own figures (Gemma-2-2b-it reader, not ours) are printed beside ours.

Sizes: `--quick` is 256-token needles (4) and 4 SQuAD questions; the reported size is `FULL`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from d2l_memory.benchmarks.common import bench_args, environment, pyplot, report, save_figure, table
from d2l_memory.d2l import DocToLoRA
from d2l_memory.training.evaluate import run_eval

# The paper's figures (Charakorn et al. 2026, arXiv 2602.15902; reader gemma-2-2b-it, 8k window), as
# digested in shared/reference/doc-to-lora.md. The NIAH curve has no per-length table in the paper.
PAPER = {
    "needle": "near-perfect exact recall up to about 40k tokens (5x the 8k window), above 0.5 at 128k; "
              "the base model with the haystack in context fails beyond its window",
    "squad_adapter_over_icl": 0.814,  # Table 2, D2L / in-context, SQuAD validation (token F1)
    "squad_cd_over_icl": 0.988,  # Table 4, CD with the oracle (test) question, 100 SQuAD samples
    "absorb_s": "under 1 s per document on a GPU (about 0.2 s batched)",
}


class Size(BaseModel):
    """How much one run measures."""

    needle_lengths: tuple[int, ...]
    needle_n: int  # run_eval's n for the sweep: max(4, n // 4) needles per length
    squad_n: int
    cd_n: int  # SQuAD documents CD distills (the first `cd_n` of the same seeded sample: about 1.5 min each)
    cd_steps: int


QUICK = Size(needle_lengths=(256,), needle_n=4, squad_n=4, cd_n=0, cd_steps=0)  # CD only in the full size
# CD on SQuAD (cd_n > 0) is what `d2l-memory eval --tasks squad --cd-steps 20` measures too; the reported run
# left it out for time (CD took 645 s per 256-token document on the shared CPU; see the cost benchmark)
FULL = Size(needle_lengths=(512, 2048, 8192, 32768), needle_n=16, squad_n=16, cd_n=0, cd_steps=20)


def run(size: Size, d2l: DocToLoRA | None = None, parts: tuple[str, ...] = ("sweep", "squad")) -> dict[str, Any]:
    """The sweep and SQuAD through `run_eval`; CD on SQuAD where this checkout's `run_eval` has it.

    `run_eval` samples SQuAD with a fixed seed, so its first `cd_n` questions are the first `cd_n` of the
    `squad_n`: the CD row is scored on them, next to the other systems on the same subset.
    """
    d2l = d2l or DocToLoRA.from_pretrained()
    result: dict[str, Any] = {"benchmark": "needle", "environment": environment(), "size": size.model_dump(),
                              "needles_per_length": max(4, size.needle_n // 4), "paper": PAPER, "wall_s": {}}
    if "sweep" in parts:
        start = time.perf_counter()
        result["needle"] = run_eval(d2l, size.needle_n, size.needle_lengths, ("needle",))
        result["wall_s"]["needle"] = time.perf_counter() - start
    if "squad" in parts:
        start = time.perf_counter()
        result["squad"] = run_eval(d2l, size.squad_n, (), ("squad",))["squad"]
        if size.cd_n and size.cd_steps:
            result["squad_cd"] = run_eval(d2l, size.cd_n, (), ("squad",), cd_steps=size.cd_steps)["squad"]
        result["wall_s"]["squad"] = time.perf_counter() - start
    return result


def render(result: dict[str, Any]) -> str:
    """The Markdown tables (sweep, SQuAD) of a result, for the parts it has."""
    paper = result["paper"]
    out = [result["environment"]]
    if "needle" in result:
        rows = [[f"{int(task.split('_')[1]):,}", f"{scores['adapter']:.2f}",
                 f"{scores['icl']:.2f}" if "icl" in scores else "n/a (over the window)", f"{scores['none']:.2f}",
                 f"{scores.get('absorb_s', 0):.1f}"] for task, scores in result["needle"].items()]
        out += [table(["haystack tokens", f"adapter (n={result['needles_per_length']})", "in context (icl)", "none",
                       "absorb s / document"], rows), f"paper (gemma-2-2b-it): {paper['needle']}"]
    if "squad" in result:
        s, n = result["squad"], result["size"]["squad_n"]

        def row(name: str, scores: dict[str, float], key: str, paper_ratio: str, seconds: str, n: int) -> list:
            ratio = scores[key] / scores["icl"] if scores.get("icl") else 0.0
            return [name, n, f"{scores[key]:.3f}", f"{ratio:.2f}", paper_ratio, seconds]

        rows = [row("adapter (ours)", s, "adapter", f"{paper['squad_adapter_over_icl']:.3f}",
                    f"{s.get('absorb_s', 0):.2f}", n),
                row("icl (document in the prompt)", s, "icl", "1.000", "0", n),
                row("none", s, "none", "-", "0", n)]
        if "squad_cd" in result:
            c, m = result["squad_cd"], result["size"]["cd_n"]
            rows += [row("cd (first questions of the same sample)", c, "cd",
                         f"{paper['squad_cd_over_icl']:.3f} (oracle query)", f"{c.get('cd_s', 0):.1f}", m),
                     row("adapter, same subset", c, "adapter", "", f"{c.get('absorb_s', 0):.2f}", m),
                     row("icl, same subset", c, "icl", "", "0", m)]
        out.append(table(["system", "n", "SQuAD token F1", "/ in-context", "paper / in-context",
                          "seconds per document (write)"], rows))
    return "\n\n".join(out)


def plot(result: dict[str, Any], path: Path) -> None:
    """Needle exact match vs haystack length per system, with the window marked."""
    plt = pyplot()
    tasks = result.get("needle")
    if not tasks:
        return
    lengths = [int(t.split("_")[1]) for t in tasks]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for system, style in (("adapter", "o-"), ("icl", "s--"), ("none", "x:")):
        points = [(n, tasks[t][system]) for n, t in zip(lengths, tasks, strict=True) if system in tasks[t]]
        if points:
            ax.plot(*zip(*points, strict=True), style, label=system)
    ax.axvline(8192, color="grey", lw=0.8)
    ax.text(8192, 1.02, " 8k window", fontsize=8, color="grey")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("haystack tokens")
    ax.set_ylabel("exact match")
    ax.set_ylim(-0.05, 1.1)
    ax.set_title("Needle in a haystack, SmolLM2-135M (paper, gemma-2-2b: ~1.0 to 40k)", fontsize=9)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main() -> None:
    parser = bench_args(__doc__.splitlines()[0], "4 needles at 256 tokens, 4 SQuAD questions")
    parser.add_argument("--part", choices=("all", "sweep", "squad"), default="all",
                        help="run only the needle sweep or only SQuAD (e.g. as two processes)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = run(QUICK if args.quick else FULL, parts=("sweep", "squad") if args.part == "all" else (args.part,))
    report(result, args, render, plot)


if __name__ == "__main__":
    main()
