"""Plot a run's metrics: training loss, held-out loss (own whole or in chunks / shuffled / no document), the
usage gap, and exact recall of held-out values where the run logged it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def plot(run: Path, out: Path | None = None) -> Path:
    """Write `<run>/curves.png` (or `out`) from `<run>/metrics.jsonl`; returns the image path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [r for r in rows if "usage_gap" in r]
    fig, (ax_loss, ax_gap) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot([r["samples"] for r in rows], [r["loss"] for r in rows], alpha=0.3, label="train (batch)")
    for key, label in [("eval_loss", "held-out, own document"),
                       ("eval_loss_chunked", "held-out, own, in chunks"),
                       ("eval_loss_shuffled", "held-out, other document"),
                       ("eval_loss_no_lora", "held-out, no adapter")]:
        points = [r for r in evals if key in r]  # older runs did not log the chunked loss
        if points:
            ax_loss.plot([r["samples"] for r in points], [r[key] for r in points], marker=".", label=label)
    ax_loss.set_xlabel("training examples")
    ax_loss.set_ylabel("distillation loss (nats/token)")
    ax_loss.legend()
    ax_gap.plot([r["elapsed"] / 3600 for r in evals], [r["usage_gap"] for r in evals], marker=".")
    ax_gap.axhline(0, color="grey", lw=0.5)
    ax_gap.set_xlabel("training hours (CPU)")
    ax_gap.set_ylabel("usage gap: other - own document (nats/token)")
    recalled = [r for r in evals if "eval_recall" in r]  # older runs did not answer held-out questions
    if recalled:
        ax_recall = ax_gap.twinx()
        ax_recall.plot([r["elapsed"] / 3600 for r in recalled], [r["eval_recall"] for r in recalled], marker="x",
                       color="tab:red")
        ax_recall.set_ylabel("exact recall of held-out values", color="tab:red")
        ax_recall.set_ylim(0, 1)
    fig.suptitle(run.name)
    fig.tight_layout()
    path = out or run / "curves.png"
    fig.savefig(path, dpi=110)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    print(plot(args.run, args.out))


if __name__ == "__main__":
    main()
