"""What the fast-weight path writes: which tokens its slots pick, where its keys point, whether values land.

    python -m d2l_memory.training.slots                              # the shipped checkpoint, 8 memories
    python -m d2l_memory.training.slots --checkpoint runs/fastmap/last --n 24 --json runs/evals/slots.json

Each slot of a layer attends over a chunk's tokens and writes the attended tokens' module inputs (keys)
into its A row and their successors' embeddings (values) into its B row (`HyperLoRA.slot_attention`).
A told value of t tokens needs t pairs, and a pair fires only where the module input at question time
points along its key. For held-out conversation memories (`conversations.conversation_sample`, eval
split: held-out phrasings and values), each with a reference answer that leads in to the value ("Your
partner is" Vít), this prints per memory:

- `distinct`: distinct argmax tokens among a layer's slots, mean over layers (head slots; fast-only slots
  apart as `distinct_fast` when the network has them); `entropy`: mean attention entropy of a slot (nats);
- `value_per_layer`: fraction of the value's tokens whose predecessor some slot of a layer picks (argmax),
  mean over layers; `value_any`: the same with any layer's slots;
- `pred_cos`: cosine between the module input at the answer position (question, then the lead-in) and the
  raw key of the value's predecessor in the document, mean over layers: how well a raw copied key fits;
- `key_cos` / `key_cos_other`: the best cosine between that module input and the A rows of this memory's
  adapter / of another memory's adapter, mean over layers (specific keys score above the other memory);
- `lead_in` / `lead_in_none`: 1 when greedy decoding after the lead-in starts with the value, with this
  memory's adapter / with none: recall of the value once the answer's form is given.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from d2l_memory.d2l import DocToLoRA
from d2l_memory.functional import lora_applied
from d2l_memory.lora import LoRA
from d2l_memory.training.conversations import conversation_sample
from d2l_memory.training.data import Sample
from d2l_memory.training.evaluate import EVAL_SEED
from d2l_memory.training.objective import value_positions
from d2l_memory.training.prepare import token_counter
from d2l_memory.training.teacher import greedy, prompt_ids


def _best_key_cos(query: torch.Tensor, lora: LoRA, names: list[str]) -> float:
    """Mean over layers of the best cosine between `query [L, d_in]` and the adapter's chunk rows of A."""
    rows = lora.rank - lora.bias_rows
    return sum(F.normalize(lora.weights[n][0][:rows].float(), dim=-1).matmul(query[j]).max().item()
               for j, n in enumerate(names)) / len(names)


@torch.no_grad()
def slot_report(d2l: DocToLoRA, sample: Sample, other: Sample) -> dict[str, float | int]:
    """The figures above for `sample` (its first chunk for the slot figures), `other` as the unrelated memory."""
    tok, names, r = d2l.base.tokenizer, d2l.config.module_names(), d2l.config.rank
    chunk = d2l.chunks(sample.context)[0]
    feats = d2l.features([chunk])
    weights = d2l.hypernet.slot_attention(feats)[0]  # [L, R, N]
    picks = weights.argmax(-1)  # [L, R]
    entropy = -(weights * weights.clamp_min(1e-12).log()).sum(-1)
    value_tokens = value_positions(tok, chunk, sample.answer)
    keys = {i - 1 for i in value_tokens if i > 0}
    out: dict[str, float | int] = {"tokens": len(chunk), "value_tokens": len(value_tokens),
                                   "distinct": sum(len(set(p[:r].tolist())) for p in picks) / len(picks),
                                   "entropy": entropy.mean().item()}
    if d2l.config.fast_slots:
        out["distinct_fast"] = sum(len(set(p[r:].tolist())) for p in picks) / len(picks)
    if keys:
        out["value_per_layer"] = sum(len(keys & set(p.tolist())) for p in picks) / (len(picks) * len(keys))
        out["value_any"] = len(keys & set(picks.flatten().tolist())) / len(keys)
    if not sample.response or sample.answer not in sample.response or not keys:
        return out
    lead_in = sample.response[: sample.response.index(sample.answer)]
    ids = prompt_ids(d2l.base, sample.question, None) + tok(lead_in, add_special_tokens=False)["input_ids"]
    query = F.normalize(d2l.features([ids]).keys[0, :, -1].float(), dim=-1)  # [L, d_in]
    raw = F.normalize(feats.keys[0, :, min(keys)].float(), dim=-1)  # the first value token's predecessor
    own, unrelated = d2l.internalize(sample.context), d2l.internalize(other.context)
    out["pred_cos"] = (raw * query).sum(-1).mean().item()
    out["key_cos"], out["key_cos_other"] = _best_key_cos(query, own, names), _best_key_cos(query, unrelated, names)
    stem = sample.answer.lower()[: max(3, len(sample.answer) // 2)]
    for name, adapter in (("lead_in", own), ("lead_in_none", None)):
        with lora_applied(d2l.base.model, adapter):
            reply = tok.decode(greedy(d2l.base, [ids], 8)[0], skip_special_tokens=True)
        out[name] = int(reply.strip().lower().startswith(stem))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=None, help="hypernetwork directory (default: shipped)")
    parser.add_argument("--n", type=int, default=8, help="held-out conversation memories")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows and means here")
    args = parser.parse_args()
    d2l = DocToLoRA.from_pretrained(args.checkpoint)
    d2l.hypernet.eval()
    rng, count = random.Random(EVAL_SEED), token_counter(d2l.base.tokenizer)
    samples = [conversation_sample(rng, "eval", count) for _ in range(args.n + 1)]  # as `absorb_messages` cuts
    rows = [slot_report(d2l, samples[i], samples[i + 1])
            for i in tqdm(range(args.n), desc="slots", unit="memory")]
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
