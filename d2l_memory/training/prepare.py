"""Build the cached meta-training set: samples -> teacher targets -> shards (resumable by shard)."""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch

from d2l_memory.models import DEFAULT_MODEL, load_model
from d2l_memory.training.data import build_mix, control_questions
from d2l_memory.training.teacher import build_shard

DEFAULT_MIX = {"facts": 0.6, "needle": 0.2, "squad": 0.15, "fairytale": 0.05}


def prepare(out: Path, n: int, shard_size: int, seed: int, mix: dict[str, float], control_frac: float,
            model_name: str = DEFAULT_MODEL, needle_chars: tuple[int, int] = (150, 600)) -> None:
    """Write `n` samples (before teacher filtering) as shards of `shard_size`; existing shards are kept."""
    model = load_model(model_name)
    samples = build_mix(n, seed, mix, needle_chars=needle_chars)
    controls = [q for q, _ in control_questions("train")]
    rng = random.Random(seed)
    for index, start in enumerate(range(0, n, shard_size)):
        path = out / f"shard-{seed:03d}-{index:04d}"
        if path.with_suffix(".jsonl").exists():
            continue
        group = samples[start : start + shard_size]
        control = [rng.choice(controls) for _ in range(int(len(group) * control_frac))]
        counts = build_shard(model, group, path, control=control)
        print(f"{path.name}: {counts}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("runs/data"))
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--shard-size", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--control-frac", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prepare(args.out, args.n, args.shard_size, args.seed, DEFAULT_MIX, args.control_frac)


if __name__ == "__main__":
    main()
