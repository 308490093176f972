"""What the fast-weight slots read: how many distinct tokens they pick, and whether they reach the values.

    python -m d2l_memory.training.slots                              # the shipped checkpoint, 8 memories
    python -m d2l_memory.training.slots --checkpoint runs/fast7/last --n 16 --json runs/evals/slots.json

Each slot of a layer attends over a chunk's tokens and writes the attended tokens' module inputs (keys)
into its A row and their successors' embeddings (values) into its B row (`HyperLoRA.slot_attention`).
A told value of t tokens needs t pairs whose keys are the tokens *before* each value token. For held-out
conversation memories (`conversations.conversation_sample`, eval split: held-out phrasings and values),
on the first chunk of the memory that holds the answer, this prints per memory:

- `distinct`: distinct argmax tokens among a layer's slots, mean over layers (head slots; fast-only slots
  apart when the network has them);
- `entropy`: mean attention entropy of a slot in nats (how blurred its pick is);
- `value/layer`: fraction of the value's tokens whose predecessor some slot of a layer picks (argmax),
  mean over layers; `value/any`: the same with any layer's slots.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from d2l_memory.d2l import DocToLoRA
from d2l_memory.training.conversations import conversation_sample
from d2l_memory.training.evaluate import EVAL_SEED
from d2l_memory.training.prepare import token_counter


def token_spans(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> list[tuple[int, int]]:
    """Character span of each token in `tokenizer.decode(ids)`."""
    spans, end = [], 0
    for i in range(len(ids)):
        new_end = len(tokenizer.decode(ids[: i + 1]))
        spans.append((end, new_end))
        end = new_end
    return spans


@torch.no_grad()
def slot_report(d2l: DocToLoRA, text: str, value: str) -> dict[str, float]:
    """The figures above for the first chunk of `text`, in which `value` is told."""
    chunk = d2l.chunks(text)[0]
    weights = d2l.hypernet.slot_attention(d2l.features([chunk]))[0]  # [L, R, N]
    picks = weights.argmax(-1)  # [L, R]
    entropy = -(weights * weights.clamp_min(1e-12).log()).sum(-1)  # [L, R]
    decoded = d2l.base.tokenizer.decode(chunk)
    start = decoded.find(value)
    spans = token_spans(d2l.base.tokenizer, chunk)
    value_tokens = [i for i, (s, e) in enumerate(spans) if start >= 0 and s < start + len(value) and e > start]
    keys = {i - 1 for i in value_tokens if i > 0}
    r = d2l.config.rank
    out = {"tokens": len(chunk), "value_tokens": len(value_tokens),
           "distinct": sum(len(set(p[:r].tolist())) for p in picks) / len(picks),
           "entropy": entropy.mean().item()}
    if d2l.config.fast_slots:
        out["distinct_fast"] = sum(len(set(p[r:].tolist())) for p in picks) / len(picks)
    if keys:
        out["value_per_layer"] = sum(len(keys & set(p.tolist())) for p in picks) / (len(picks) * len(keys))
        out["value_any"] = len(keys & set(picks.flatten().tolist())) / len(keys)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=None, help="hypernetwork directory (default: shipped)")
    parser.add_argument("--n", type=int, default=8, help="held-out conversation memories")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows and means here")
    args = parser.parse_args()
    d2l = DocToLoRA.from_pretrained(args.checkpoint)
    d2l.hypernet.eval()
    rng = random.Random(EVAL_SEED)
    count = token_counter(d2l.base.tokenizer)
    rows = []
    for _ in tqdm(range(args.n), desc="slots", unit="memory"):
        sample = conversation_sample(rng, "eval", count)  # as `absorb_messages` cuts it
        rows.append(slot_report(d2l, sample.context, sample.answer))
    keys = list(dict.fromkeys(k for row in rows for k in row))
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join("" if k not in row else f"{row[k]:.2f}" if isinstance(row[k], float) else str(row[k])
                                for k in keys) + " |")
    means = {k: sum(row[k] for row in rows if k in row) / max(1, sum(k in row for row in rows)) for k in keys}
    print("| " + " | ".join(f"**{means[k]:.2f}**" for k in keys) + " |")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"checkpoint": str(args.checkpoint), "rows": rows, "means": means}, indent=1))


if __name__ == "__main__":
    main()
