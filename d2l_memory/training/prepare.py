"""Build the cached meta-training set: samples -> teacher targets -> shards (resumable by shard).

    python -m d2l_memory.training.prepare --out runs/data --n 20000 --seed 1            # training shards
    python -m d2l_memory.training.prepare --out runs/eval-data --n 200 --split eval     # held-out shard
    python -m d2l_memory.training.prepare --model gemma-3-270m --out runs/gemma-data   # another base model
    python -m d2l_memory.training.prepare --out runs/recital --mix recital=1            # one source only

`build_mix` draws each sample from a source with the proportions of a mix (`DEFAULT_MIX`): synthetic
users' conversations, notes and tool results (`conversations.py`, open-vocabulary values, many
phrasings), needles of many kinds in essay filler, the first generation's template facts and needles
(`data.py`, kept so that what was learnt is not forgotten), SQuADShifts/SQuAD-train and FairytaleQA
passages, FriendsQA scenes (named speakers, asked about in the third person), self-supervised
recitals of real text (`recital.py`: a memory said back, or continued from a quoted piece), and `hybrid`
conversations whose student also reads the answer's memory in its prompt.
`--split eval` draws only held-out phrasings, attributes and values (QA sources and `hybrid` are then
left out: the reading sets' held-out halves are the evaluation's own files, and the held-out shard
measures adapters alone).
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from d2l_memory.models import DEFAULT_MODEL, load_model
from d2l_memory.training import conversations
from d2l_memory.training.data import (
    FAIRYTALE_TRAIN_FILE,
    FRIENDS_TRAIN_FILE,
    TRAIN_FILES,
    Sample,
    control_questions,
    essays,
    fact_sample,
    fairytale_samples,
    friends_samples,
    needle_sample,
    shared_data,
    squad_samples,
)
from d2l_memory.training.recital import recital_sample
from d2l_memory.training.teacher import build_shard

DEFAULT_MIX = {"conversation": 0.3, "hybrid": 0.04, "note": 0.08, "tool": 0.08, "needles": 0.1, "facts": 0.06,
               "needle": 0.04, "squad": 0.11, "fairytale": 0.04, "friends": 0.05, "recital": 0.15}
GENERATED = {"conversation", "note", "tool", "needles"}  # the eval split measures adapters alone: no hybrid


def build_mix(n: int, seed: int, mix: dict[str, float], needle_chars: tuple[int, int] = (200, 1500),
              max_answer_chars: int = 40, max_context_chars: int = 800, split: conversations.Split = "train",
              count_tokens: Callable[[str], int] | None = None) -> list[Sample]:
    """Draw `n` samples with source proportions `mix` (keys: those of `DEFAULT_MIX`)."""
    rng = random.Random(seed)
    pools: dict[str, list[Sample]] = {}
    if mix.get("squad"):
        pools["squad"] = [s for f in TRAIN_FILES for s in squad_samples(shared_data() / f, max_context_chars)
                          if len(s.answer) <= max_answer_chars]
    if mix.get("fairytale"):
        pools["fairytale"] = list(fairytale_samples(shared_data() / FAIRYTALE_TRAIN_FILE, max_context_chars))
    if mix.get("friends"):
        pools["friends"] = [s for s in friends_samples(shared_data() / FRIENDS_TRAIN_FILE, count_tokens)
                            if len(s.answer) <= max_answer_chars]
    filler = essays() if mix.get("needle") or mix.get("needles") else []
    names, weights = zip(*[(k, v) for k, v in mix.items() if v > 0], strict=True)
    out: list[Sample] = []
    for _ in range(n):
        kind = rng.choices(names, weights)[0]
        if kind in ("conversation", "hybrid"):
            out.append(conversations.conversation_sample(rng, split, count_tokens, hybrid=kind == "hybrid"))
        elif kind == "note":
            out.append(conversations.note_sample(rng, split))
        elif kind == "tool":
            out.append(conversations.tool_sample(rng, split))
        elif kind == "needles":
            out.append(conversations.needle_sample(rng, filler, rng.randint(*needle_chars), split))
        elif kind == "facts":
            out.append(fact_sample(rng))
        elif kind == "needle":
            out.append(needle_sample(rng, filler, rng.randint(*needle_chars)))
        elif kind == "recital":
            out.append(recital_sample(rng, count_tokens))
        else:
            out.append(rng.choice(pools[kind]))
    return out


def draw(n: int, seed: int, mix: dict[str, float], split: conversations.Split, count_tokens: Callable[[str], int],
         needle_chars: tuple[int, int] = (150, 3000)) -> list[Sample]:
    """The samples of a `prepare` run: `build_mix` with only the generated sources on the eval split (the
    held-out phrasings and values live there; the reading sets have no held-out half)."""
    if split == "eval":
        mix = {k: v for k, v in mix.items() if k in GENERATED}
    return build_mix(n, seed, mix, needle_chars=needle_chars, split=split, count_tokens=count_tokens)


def shard_plan(samples: Sequence[Sample], split: conversations.Split, seed: int, shard_size: int,
               control_frac: float) -> list[tuple[str, list[Sample], list[str]]]:
    """`(name, samples, control questions)` of each shard, in order (names and draws fixed by the seed, so
    that a resumed `prepare` and a burst's bundle make the same shards)."""
    controls = control_prompts(split)
    rng = random.Random(seed)
    plan = []
    for index, start in enumerate(range(0, len(samples), shard_size)):
        group = list(samples[start : start + shard_size])
        plan.append((f"shard-{split}-{seed:03d}-{index:04d}", group,
                     [rng.choice(controls) for _ in range(int(len(group) * control_frac))]))
    return plan


def control_prompts(split: conversations.Split) -> list[str]:
    """Questions unrelated to any memory, whose teacher is the base model without context: an unrelated
    adapter must leave its answers alone. Training draws from the general questions' training half and
    the training passages' own questions asked without their passage (thousands, so that the student
    learns to leave every unrelated question alone, not a few dozen); the held-out shard only from the
    general questions' other half, which the interference evaluation asks."""
    general = [q for q, _ in control_questions(split)]
    if split == "eval":
        return general
    asked = {s.question.strip() for f in TRAIN_FILES for s in squad_samples(shared_data() / f)}
    return general + sorted(asked)


def token_counter(tokenizer) -> Callable[[str], int]:
    """Tokens of a text without special tokens (what segment budgets count)."""
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def prepare(out: Path, n: int, shard_size: int, seed: int, mix: dict[str, float], control_frac: float,
            model_name: str = DEFAULT_MODEL, needle_chars: tuple[int, int] = (150, 3000),
            split: conversations.Split = "train") -> None:
    """Write `n` samples (before teacher filtering) as shards of `shard_size`; existing shards are kept."""
    model = load_model(model_name)
    samples = draw(n, seed, mix, split, token_counter(model.tokenizer), needle_chars)
    for name, group, control in shard_plan(samples, split, seed, shard_size, control_frac):
        path = out / name
        if path.with_suffix(".jsonl").exists():
            continue
        counts = build_shard(model, group, path, control=control)
        print(f"{path.name}: {counts}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/data"))
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--shard-size", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", choices=["train", "eval"], default="train")
    parser.add_argument("--control-frac", type=float, default=0.2)
    parser.add_argument("--needle-chars", type=int, nargs=2, metavar=("MIN", "MAX"), default=(150, 3000),
                        help="filler characters around each needle, drawn uniformly (long documents: "
                        "the teacher reads them whole, the student through its chunks' adapters)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--mix", nargs="+", metavar="SOURCE=WEIGHT", type=_mix_entry,
                        help=f"the sources to draw and their weights (default: {DEFAULT_MIX})")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="the base model whose teacher targets the shards "
                        "hold (registry name, directory or hub id): train the hypernetwork for that model on them")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    mix = dict(args.mix) if args.mix else DEFAULT_MIX
    low, high = args.needle_chars
    if not 0 <= low <= high:
        parser.error(f"--needle-chars {low} {high}: expected 0 <= MIN <= MAX")
    prepare(args.out, args.n, args.shard_size, args.seed, mix, args.control_frac, model_name=args.model,
            needle_chars=(low, high), split=args.split)


def _mix_entry(text: str) -> tuple[str, float]:
    source, _, weight = text.partition("=")
    if source not in DEFAULT_MIX:
        raise argparse.ArgumentTypeError(f"unknown source {source!r}; expected one of {sorted(DEFAULT_MIX)}")
    try:
        value = float(weight)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: the weight must be a number (SOURCE=WEIGHT)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: weights cannot be negative")
    return source, value


if __name__ == "__main__":
    main()
