"""Meta-training throughput: examples per CPU-hour before and after the encoder's micro-batching, in one run.

    d2l-memory bench train-throughput [--quick] [--data runs/data --eval-data runs/eval-data]

Both variants train the same hypernetwork (the shipped one, or a tiny fresh one with `--quick`) from the same
weights on the same examples in the same order (same seed) for the same number of steps, one after the
other in this process: `before` encodes each batch's chunks in one padded pass (how training ran until
micro-batching), `after` groups chunks of similar length (`DocToLoRA.pass_tokens`, the default). The table
gives wall seconds, examples per hour, their ratio, and the held-out loss after the same examples seen, so
that a speed-up that changed what is learnt would show. Without `--data`, a small data set is drawn with
`prepare.build_mix` and its teacher targets built first (not timed).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from d2l_memory.benchmarks.common import bench_args, environment, pyplot, report, save_figure, table
from d2l_memory.d2l import shipped_checkpoint
from d2l_memory.hypernet import HypernetConfig
from d2l_memory.models import DEFAULT_MODEL, load_model
from d2l_memory.training.prepare import DEFAULT_MIX, build_mix
from d2l_memory.training.teacher import build_shard
from d2l_memory.training.train import TrainConfig, train

VARIANTS = {"before": 10**9, "after": TrainConfig.model_fields["pass_tokens"].default}
TINY = {"layers": [10, 12], "latent_dim": 64, "n_heads": 2, "chunk_tokens": 64}


def _data(root: Path, n: int, split: str, seed: int) -> Path:
    base = load_model(DEFAULT_MODEL)
    count = lambda text: len(base.tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    mix = DEFAULT_MIX if split == "train" else {"conversation": 0.7, "note": 0.3}
    samples = build_mix(n, seed, mix, split=split, count_tokens=count)  # type: ignore[arg-type]
    build_shard(base, samples, root / f"shard-{split}")
    return root


def run(quick: bool, data: Path | None = None, eval_data: Path | None = None, steps: int | None = None,
        threads: int = 1) -> dict[str, Any]:
    """Train each variant for `steps` steps and return their timings and held-out losses."""
    steps = steps or (2 if quick else 30)
    work = Path(tempfile.mkdtemp(prefix="d2l-train-bench-"))
    try:
        data = data or _data(work / "data", 16 if quick else 240, "train", 5)
        eval_data = eval_data or _data(work / "eval", 8 if quick else 48, "eval", 6)
        shipped = shipped_checkpoint(DEFAULT_MODEL)
        hypernet = HypernetConfig(**TINY) if quick else \
            HypernetConfig.model_validate_json((shipped / "config.json").read_text())
        rows: dict[str, dict[str, float]] = {}
        for name, pass_tokens in VARIANTS.items():
            config = TrainConfig(data=data, eval_data=eval_data, out=work / name, hypernet=hypernet,
                                 init_from=None if quick else shipped, total_steps=steps, warmup_steps=1,
                                 batch_size=4 if quick else 8, eval_every=steps, eval_examples=8 if quick else 48,
                                 recall_examples=0, stage2_step=0, checkpoint_minutes=10**6, threads=threads,
                                 pass_tokens=pass_tokens, seed=0)
            start = time.perf_counter()
            train(config)
            seconds = time.perf_counter() - start
            metrics = [json.loads(line) for line in (config.out / "metrics.jsonl").read_text().splitlines()]
            examples = metrics[-1]["samples"]
            rows[name] = {"seconds": seconds, "examples": examples, "examples_per_hour": examples / seconds * 3600,
                          "eval_loss": metrics[-1]["eval_loss"], "train_s_per_step": seconds / steps}
        return {"environment": environment(), "steps": steps, "quick": quick, "threads": threads,
                "variants": rows, "speedup": rows["after"]["examples_per_hour"] / rows["before"]["examples_per_hour"]}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def render(result: dict[str, Any]) -> str:
    rows = [[name, int(v["examples"]), f"{v['seconds']:.0f}", f"{v['examples_per_hour']:.0f}",
             f"{v['examples_per_hour'] / result['variants']['before']['examples_per_hour']:.2f}",
             f"{v['eval_loss']:.4f}"] for name, v in result["variants"].items()]
    return (f"{result['environment']}; {result['steps']} steps, {result['threads']} thread(s)\n\n"
            + table(["variant", "examples", "wall s", "examples/hour", "ratio", "held-out loss"], rows))


def _plot(result: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3))
    names = list(result["variants"])
    ax.bar(names, [result["variants"][n]["examples_per_hour"] for n in names], color=["grey", "tab:blue"])
    ax.set_ylabel("training examples per hour")
    ax.set_title(f"meta-training throughput ({result['threads']} thread)")
    save_figure(fig, path)


def main() -> None:
    parser = bench_args(__doc__.splitlines()[0], "2 steps of a tiny hypernetwork on 16 fresh examples (CI)")
    parser.add_argument("--data", type=Path, default=None, help="training shards (default: drawn afresh)")
    parser.add_argument("--eval-data", type=Path, default=None, help="held-out shards (default: drawn afresh)")
    parser.add_argument("--steps", type=int, default=None, help="steps per variant (default 30; quick 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report(run(args.quick, args.data, args.eval_data, args.steps, args.threads), args, render, _plot)


if __name__ == "__main__":
    main()
