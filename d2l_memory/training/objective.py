"""Context-distillation loss of a batch: student = base model + generated LoRA, no context.

Per response token t with teacher top-k `(ids, logprobs)`:

    loss_t = - sum_k p_teacher(k) * log q_student(k)     (teacher probs not renormalised, paper §2.1)

averaged over the response tokens of each example (tokens of the told value weighted `value_weight`
times, default 1), then over examples (one question per context here, so this is the paper's
per-context average), plus `l1 * mean(|A|) + mean(|B|)` over the
generated factors, plus `slot_diversity * slot_overlap(A)` (below). With `use_gold_ce` the teacher is
replaced by plain cross-entropy on the stored response tokens (the paper's choice for needle data).
Logits are computed only at response positions: the 49k-way head would otherwise dominate the step on
CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from d2l_memory.functional import applied
from d2l_memory.models import LoadedModel
from d2l_memory.training.teacher import prompt_ids


@dataclass
class StudentBatch:
    """Right-padded student inputs and where each example's response positions are."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    rows: torch.Tensor  # [P] batch row of each response position
    cols: torch.Tensor  # [P] position whose output predicts the response token
    example: torch.Tensor  # [P] example index (for per-example averaging)
    topk_ids: torch.Tensor  # [P, k]
    topk_logprobs: torch.Tensor  # [P, k]
    targets: torch.Tensor  # [P] the response tokens themselves
    weights: torch.Tensor  # [P] each position's weight in its example's mean


def token_spans(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> list[tuple[int, int]]:
    """Character span of each token in `tokenizer.decode(ids)`."""
    spans, end = [], 0
    for i in range(len(ids)):
        new_end = len(tokenizer.decode(ids[: i + 1]))
        spans.append((end, new_end))
        end = new_end
    return spans


def value_positions(tokenizer: PreTrainedTokenizerBase, response: Sequence[int], value: str) -> list[int]:
    """Indices of the response tokens that spell `value` (its first occurrence, else its first in another
    case); [] if absent."""
    if not value:
        return []
    text = tokenizer.decode(response)
    start = text.find(value)
    if start < 0 and len(text.lower()) == len(text):  # lowering keeps character positions
        start = text.lower().find(value.lower())
    if start < 0:
        return []
    return [i for i, (s, e) in enumerate(token_spans(tokenizer, response)) if s < start + len(value) and e > start]


def student_batch(base: LoadedModel, examples: Sequence[dict], value_weight: float = 1.0) -> StudentBatch:
    """Build the student's inputs (the question, with the example's `student_context` when it has one,
    then the teacher's response) for `examples`. With `value_weight` other than 1, the response tokens
    that spell the example's `answer` weigh that many times the others: the told value is one or two
    tokens of a reply whose form makes up the rest of the loss."""
    seqs, rows, cols, owner, weights = [], [], [], [], []
    for i, ex in enumerate(examples):
        prompt = prompt_ids(base, ex["question"], ex.get("student_context"))
        response = ex["response"].tolist()
        seqs.append(prompt + response)
        positions = range(len(prompt) - 1, len(prompt) - 1 + len(response))
        rows += [i] * len(response)
        cols += list(positions)
        owner += [i] * len(response)
        weight = [1.0] * len(response)
        if value_weight != 1.0 and not ex.get("control") and ex.get("answer"):
            for j in value_positions(base.tokenizer, response, ex["answer"]):
                weight[j] = value_weight
        weights += weight
    width = max(len(s) for s in seqs)
    pad = base.tokenizer.pad_token_id or 0
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return StudentBatch(
        input_ids=ids, attention_mask=mask, rows=torch.tensor(rows), cols=torch.tensor(cols),
        example=torch.tensor(owner), topk_ids=torch.cat([ex["topk_ids"] for ex in examples]).long(),
        topk_logprobs=torch.cat([ex["topk_logprobs"] for ex in examples]).float(),
        targets=torch.cat([ex["response"] for ex in examples]).long(), weights=torch.tensor(weights),
    )


def per_example_loss(base: LoadedModel, batch: StudentBatch, factors: dict, scale: float,
                     use_gold_ce: bool = False) -> torch.Tensor:
    """`[B]` distillation (or CE) loss of each example with the given per-row LoRA factors."""
    with applied(base.model, factors, scale):
        hidden = base.model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                  use_cache=False).last_hidden_state
    logprobs = base.model.lm_head(hidden[batch.rows, batch.cols]).float().log_softmax(-1)
    if use_gold_ce:
        token_loss = -logprobs.gather(-1, batch.targets[:, None]).squeeze(-1)
    else:
        token_loss = -(batch.topk_logprobs.exp() * logprobs.gather(-1, batch.topk_ids)).sum(-1)
    n = int(batch.example.max()) + 1
    totals = torch.zeros(n).index_add(0, batch.example, token_loss * batch.weights)
    counts = torch.zeros(n).index_add(0, batch.example, batch.weights)
    return totals / counts


def l1_penalty(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean absolute value of the generated factors (the paper's L1 on the generated LoRA)."""
    return a.abs().mean() + b.abs().mean()


def slot_overlap(a: torch.Tensor) -> torch.Tensor:
    """How much one chunk's rank slots write the same key, in [0, 1]: for `a [K, L, r, d_in]`,

        overlap = mean over chunks k, layers l and slot pairs i != j of cos(a[k, l, i], a[k, l, j])^2

    0 when every slot of a layer writes its own direction, 1 when all write one. The fast-weight path's
    slots collapse onto a few tokens of a chunk (docs/training.md); each token of each told value needs
    its own key-value pair, so training can push this down (`TrainConfig.slot_diversity`).
    """
    rank = a.shape[-2]
    if rank < 2:
        return a.new_zeros(())
    unit = torch.nn.functional.normalize(a.float(), dim=-1)
    cos2 = (unit @ unit.transpose(-1, -2)).pow(2)  # [K, L, r, r], diagonal 1
    return (cos2.sum((-1, -2)) - rank).mean() / (rank * (rank - 1))
