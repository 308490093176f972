"""`internalize` time and peak memory against the floor: the frozen model's own pass over the same chunks.

    python -m d2l_memory.benchmarks.internalize [--quick]

The floor is what any Doc-to-LoRA must pay: the base model reading the document (the same chunks,
batched the same way). The hypernetwork's overhead is `internalize / floor - 1`. Memory is the peak
resident-set growth while internalizing: chunks are streamed, so it should stay flat as documents grow.
"""

from __future__ import annotations

import argparse

import torch

from d2l_memory.benchmarks.common import best_of, environment, peak_rss, table
from d2l_memory.d2l import DocToLoRA, micro_batches, shipped_checkpoint
from d2l_memory.hypernet import HypernetConfig
from d2l_memory.models import DEFAULT_MODEL, load_model
from d2l_memory.training.data import essays


def document(tokenizer, n_tokens: int) -> str:
    text = " ".join(essays())
    while len(tokenizer(text, add_special_tokens=False)["input_ids"]) < n_tokens:
        text += " " + text
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:n_tokens]
    return tokenizer.decode(ids)


def run(lengths: list[int], repeats: int) -> list[list[object]]:
    base = load_model(DEFAULT_MODEL)
    ckpt = shipped_checkpoint(DEFAULT_MODEL)
    d2l = (DocToLoRA.from_pretrained(ckpt, base=base) if (ckpt / "config.json").exists()
           else DocToLoRA.untrained(HypernetConfig(), base))
    rows = []
    for n in lengths:
        text = document(base.tokenizer, n)
        chunks = d2l.chunks(text)

        @torch.no_grad()
        def floor(chunks: list[list[int]] = chunks) -> None:
            for indices in micro_batches([len(c) for c in chunks], d2l.pass_tokens):
                group = [chunks[i] for i in indices]
                width = max(map(len, group))
                ids = torch.tensor([c + [0] * (width - len(c)) for c in group])
                mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in group])
                base.model.model(input_ids=ids, attention_mask=mask, use_cache=False)

        t_floor = best_of(floor, repeats)
        t_d2l = best_of(lambda text=text: d2l.internalize(text), repeats)
        with peak_rss() as mem:
            lora = d2l.internalize(text)
        rows.append([n, len(chunks), f"{t_floor:.2f}", f"{t_d2l:.2f}", f"{t_d2l / t_floor - 1:+.0%}",
                     f"{(mem['peak'] - mem['start']) / 2**20:.0f}", lora.rank, f"{lora.nbytes() / 2**20:.1f}"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="256 and 1k tokens only, one repeat")
    args = parser.parse_args()
    torch.set_num_threads(2)
    lengths = [256, 1024] if args.quick else [256, 1024, 8192, 32768]
    rows = run(lengths, 1 if args.quick else 2)
    print(environment())
    print(table(["doc tokens", "chunks", "floor s (LLM pass)", "internalize s", "hypernet overhead",
                 "peak RSS growth MiB", "adapter rank", "adapter MiB (fp32)"], rows))


if __name__ == "__main__":
    main()
