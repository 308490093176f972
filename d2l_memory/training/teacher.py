"""Teacher targets for context distillation, generated once and cached on disk in shards.

The teacher is the frozen base model *with the context in its prompt*
(`prompts.QA_TEMPLATE`, a format the 135M model follows).
Two ways to get the response (`mode`):
- `greedy` (the paper's): the teacher answers greedily; kept only if the answer contains the gold one;
- `gold` (about 10x cheaper on CPU: one forward, no generation): the response is the sample's reference
  sentence (or gold span), kept only if the teacher, teacher-forced, gives its tokens a mean
  probability >= `min_prob`, i.e. the teacher itself would say it.
For each response token (the closing end-of-turn included) the teacher's top-k log-probs are stored.
Unrelated "control" questions get the base model *without* context as teacher, which teaches the
hypernetwork to leave unrelated answers alone (interference, issue #4).

Shard format (no pickle): `NAME.safetensors` with `tokens [T]`, `topk_ids [T, k]`, `topk_logprobs [T, k]`
(fp16) and `offsets [n+1]`, plus `NAME.jsonl` with one `Sample` (+ teacher answer) per line.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from d2l_memory.models import LoadedModel
from d2l_memory.prompts import QA_TEMPLATE
from d2l_memory.scoring import normalize
from d2l_memory.training.data import Sample


def prompt_ids(model: LoadedModel, question: str, context: str | None) -> list[int]:
    """Chat-template ids of the user turn plus the assistant header (teacher with context, student without)."""
    content = question if context is None else QA_TEMPLATE.format(context=context, question=question)
    return model.tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                               add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]


@torch.no_grad()
def greedy(model: LoadedModel, prompts: Sequence[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations of several prompts (left-padded batch), each ending at end-of-turn."""
    tok = model.tokenizer
    width = max(len(p) for p in prompts)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                               pad_token_id=pad, eos_token_id=tok.eos_token_id)
    results = []
    for row in out[:, width:].tolist():
        if tok.eos_token_id in row:
            row = row[: row.index(tok.eos_token_id) + 1]
        results.append(row)
    return results


@torch.no_grad()
def topk_on(model: LoadedModel, prompt: list[int], response: list[int], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k log-probs of the model at each response position (teacher forcing)."""
    ids = torch.tensor([prompt + response])
    hidden = model.model.model(input_ids=ids).last_hidden_state[0, len(prompt) - 1 : -1]
    logprobs = model.model.lm_head(hidden).float().log_softmax(-1)
    values, indices = logprobs.topk(k, dim=-1)
    return indices.to(torch.int32), values.to(torch.float16)


def build_shard(model: LoadedModel, samples: Sequence[Sample], path: Path, k: int = 16,
                max_new_tokens: int = 24, batch: int = 8, control: Sequence[str] = (),
                mode: str = "gold", min_prob: float = 0.3) -> dict[str, int]:
    """Generate teacher targets for `samples` (plus unrelated `control` questions) into a shard.

    Returns counts: kept, dropped (teacher wrong or unfinished), control.
    """
    records, tokens, ids_rows, lp_rows, offsets = [], [], [], [], [0]
    kept = dropped = 0

    def add(record: dict, prompt: list[int], response: list[int]) -> None:
        idx, lp = topk_on(model, prompt, response, k)
        _append(records, tokens, ids_rows, lp_rows, offsets, record, response, idx, lp)

    eos = model.tokenizer.eos_token_id
    if mode == "gold":
        for sample in tqdm(samples, desc=f"teacher {path.name}", unit="sample", leave=False):
            prompt = prompt_ids(model, sample.question, sample.context)
            text = sample.response or sample.answer
            response = model.tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
            idx, lp = topk_on(model, prompt, response, k)
            hit = (idx == torch.tensor(response, dtype=torch.int32)[:, None])
            prob = (lp.float().exp() * hit).sum(-1)
            if prob.mean() < min_prob:
                dropped += 1
                continue
            kept += 1
            _append(records, tokens, ids_rows, lp_rows, offsets,
                    {**sample.model_dump(), "teacher": text, "control": False}, response, idx, lp)
    for start in tqdm(range(0, len(samples) if mode == "greedy" else 0, batch), desc=f"teacher {path.name}",
                      unit="batch", leave=False):
        group = samples[start : start + batch]
        prompts = [prompt_ids(model, s.question, s.context) for s in group]
        for sample, prompt, response in zip(group, prompts, greedy(model, prompts, max_new_tokens), strict=True):
            answer = model.tokenizer.decode(response, skip_special_tokens=True)
            if not response or response[-1] != eos or normalize(sample.answer) not in normalize(answer):
                dropped += 1
                continue
            kept += 1
            add({**sample.model_dump(), "teacher": answer, "control": False}, prompt, response)
    # Control questions: the teacher is the model without any context (what it would say anyway). An answer
    # the budget cuts short is kept as far as it goes: its tokens are the base model's all the same, and
    # passage questions asked without their passage get long answers (requiring the end-of-turn kept only
    # 4-7 of a shard's 40 controls).
    for start in range(0, len(control), batch):
        group = list(control[start : start + batch])
        prompts = [prompt_ids(model, q, None) for q in group]
        for question, prompt, response in zip(group, prompts, greedy(model, prompts, max_new_tokens), strict=True):
            if response:
                add({"context": "", "question": question, "answer": "", "source": "control",
                     "teacher": model.tokenizer.decode(response, skip_special_tokens=True), "control": True},
                    prompt, response)
    if records:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"tokens": torch.cat(tokens), "topk_ids": torch.cat(ids_rows), "topk_logprobs": torch.cat(lp_rows),
                   "offsets": torch.tensor(offsets, dtype=torch.int64)}, str(path.with_suffix(".safetensors")))
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        tmp.rename(path.with_suffix(".jsonl"))  # the .jsonl appears whole, after its tensors
    return {"kept": kept, "dropped": dropped, "control": len(records) - kept}


def _append(records: list, tokens: list, ids_rows: list, lp_rows: list, offsets: list, record: dict,
            response: list[int], idx: torch.Tensor, lp: torch.Tensor) -> None:
    records.append(record)
    tokens.append(torch.tensor(response, dtype=torch.int32))
    ids_rows.append(idx)
    lp_rows.append(lp)
    offsets.append(offsets[-1] + len(response))


class ShardSet:
    """Cached shards of a directory (all complete ones, or the named ones) as a flat list of examples."""

    def __init__(self, directory: Path, names: Sequence[str] | None = None) -> None:
        self.examples: list[dict] = []
        metas = sorted(directory.glob("*.jsonl")) if names is None else [directory / f"{n}.jsonl" for n in names]
        # A shard is complete once its .jsonl exists: build_shard writes the tensors first.
        self.names = [m.stem for m in metas if m.with_suffix(".safetensors").exists()]
        for meta in (directory / f"{n}.jsonl" for n in self.names):
            tensors = load_file(str(meta.with_suffix(".safetensors")))
            offsets = tensors["offsets"].tolist()
            for i, line in enumerate(meta.read_text().splitlines()):
                s, e = offsets[i], offsets[i + 1]
                self.examples.append({**json.loads(line), "response": tensors["tokens"][s:e],
                                      "topk_ids": tensors["topk_ids"][s:e],
                                      "topk_logprobs": tensors["topk_logprobs"][s:e]})

    def __len__(self) -> int:
        return len(self.examples)
