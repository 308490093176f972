"""Context-distillation loss of a batch: student = base model + generated LoRA, no context.

Per response token t with teacher top-k `(ids, logprobs)`:

    loss_t = - sum_k p_teacher(k) * log q_student(k)     (teacher probs not renormalised, paper §2.1)

averaged over the response tokens of each example (tokens of the told value weighted `value_weight`
times, default 1), then over examples (one question per context here, so this is the paper's
per-context average), plus `l1 * mean(|A|) + mean(|B|)` over the generated factors, plus
`slot_diversity * slot_overlap(A)` and `key_alignment * key_alignment_loss` (below). With `use_gold_ce`
the teacher is replaced by plain cross-entropy on the stored response tokens (the paper's choice for
needle data); with `value_ce`, only on the tokens that spell the told value. Logits are computed only
at response positions: the 49k-way head would otherwise dominate the step on CPU.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
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
    values: torch.Tensor  # [P] bool: the response token spells the told value (`answer`)


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
    seqs, rows, cols, owner, weights, values = [], [], [], [], [], []
    for i, ex in enumerate(examples):
        prompt = prompt_ids(base, ex["question"], ex.get("student_context"))
        response = ex["response"].tolist()
        seqs.append(prompt + response)
        positions = range(len(prompt) - 1, len(prompt) - 1 + len(response))
        rows += [i] * len(response)
        cols += list(positions)
        owner += [i] * len(response)
        told = [False] * len(response)
        if not ex.get("control") and ex.get("answer"):
            for j in value_positions(base.tokenizer, response, ex["answer"]):
                told[j] = True
        weights += [value_weight if t else 1.0 for t in told]
        values += told
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
        values=torch.tensor(values, dtype=torch.bool),
    )


def response_logprobs(base: LoadedModel, batch: StudentBatch, factors: dict, scale: float) -> torch.Tensor:
    """`[P, V]` the student's log-probabilities at each response position, with the given per-row LoRA
    factors."""
    with applied(base.model, factors, scale):
        hidden = base.model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                  use_cache=False).last_hidden_state
    return base.model.lm_head(hidden[batch.rows, batch.cols]).float().log_softmax(-1)


def response_loss(batch: StudentBatch, logprobs: torch.Tensor, use_gold_ce: bool = False,
                  value_ce: bool = False) -> torch.Tensor:
    """`[B]` distillation (or CE) loss of each example from its `response_logprobs`. With `value_ce`, the
    tokens that spell the told value are scored by cross-entropy on the response token and the rest against
    the teacher: the response is the reference sentence, and where its wording leaves the teacher's ("is
    now", "is a") the teacher's top-k at the value's first token is mostly frame words (docs/training.md,
    "The teacher at the told value")."""
    gold = -logprobs.gather(-1, batch.targets[:, None]).squeeze(-1)
    if use_gold_ce:
        token_loss = gold
    else:
        token_loss = -(batch.topk_logprobs.exp() * logprobs.gather(-1, batch.topk_ids)).sum(-1)
        if value_ce:
            token_loss = torch.where(batch.values, gold, token_loss)
    n = int(batch.example.max()) + 1
    totals = torch.zeros(n).index_add(0, batch.example, token_loss * batch.weights)
    counts = torch.zeros(n).index_add(0, batch.example, batch.weights)
    return totals / counts


def per_example_loss(base: LoadedModel, batch: StudentBatch, factors: dict, scale: float,
                     use_gold_ce: bool = False, value_ce: bool = False) -> torch.Tensor:
    """`[B]` `response_loss` of each example with the given per-row LoRA factors."""
    return response_loss(batch, response_logprobs(base, batch, factors, scale), use_gold_ce, value_ce)


def value_scores(batch: StudentBatch, logprobs: torch.Tensor) -> dict[str, float]:
    """How well the student says the told values after the reference's lead-in, from `response_logprobs`:
    `value_nll`, the mean `-log q_student(token)` over the tokens that spell them, and `value_first_top1`,
    the share of examples whose value's first token is the student's top-1 ({} when no example spells a
    value). Greedy recall of held-out values stays at zero long after the whole-reply loss falls, and the
    first token is where it fails (docs/training.md, "The teacher at the told value")."""
    if not bool(batch.values.any()):
        return {}
    gold = logprobs.gather(-1, batch.targets[:, None]).squeeze(-1)
    top1 = logprobs.argmax(-1) == batch.targets
    position = torch.arange(len(batch.targets))
    first = [int(position[(batch.example == i) & batch.values][0]) for i in batch.example[batch.values].unique()]
    return {"value_nll": -gold[batch.values].mean().item(), "value_first_top1": top1[first].float().mean().item()}


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


@contextmanager
def module_inputs(model: torch.nn.Module, names: Sequence[str], rows: torch.Tensor,
                  cols: torch.Tensor) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, the next forward records the input of each module in `names` at positions
    `(rows, cols)`, detached: `{name: [P, d_in]}` (what a generated key must match to fire there)."""
    modules = dict(model.named_modules())
    seen: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for name in names:
            def hook(_m: torch.nn.Module, inputs: tuple[torch.Tensor, ...], name: str = name) -> None:
                seen[name] = inputs[0][rows, cols].detach()
            handles.append(modules[name].register_forward_pre_hook(hook))
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def key_alignment_loss(a: torch.Tensor, queries: torch.Tensor, owner: torch.Tensor,
                       temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Contrastive pull of each told-value position's module input onto a key of its own row's adapter.

    A key-value pair of delta_W fires at a position only where the module input there points along its
    key, and the fast-weight path copies keys from the document, which point elsewhere than the module
    input at the answer (docs/training.md, "Where the fast-weight keys point"). The distillation loss
    reaches those keys only through the few positions where they already fire; this term asks for the
    match directly. For `a [B, L, R, d_in]` (each batch row's memory slots, bias slot excluded),
    `queries [P, L, d_in]` (the module input at each position whose output predicts a told value token)
    and `owner [P]` (the batch row each belongs to):

        s[p, l, j] = max_r cos(queries[p, l], a[j, l, r])
        loss = mean over p, l of cross_entropy(s[p, l, :] / temperature, owner[p])

    so some slot of the row's own adapter must match better than any slot of the batch's other adapters.

    Returns:
        `(loss, accuracy)`: accuracy is the fraction of (p, l) whose best-matching row is its own.
    """
    n_rows, n_layers = a.shape[0], a.shape[1]
    if queries.shape[0] == 0 or n_rows < 2:
        zero = a.new_zeros(())
        return zero, zero
    q = F.normalize(queries.float(), dim=-1)
    k = F.normalize(a.float(), dim=-1)
    scores = torch.einsum("pld,jlrd->pljr", q, k).amax(-1) / temperature  # [P, L, B]
    target = owner[:, None].expand(-1, n_layers)
    loss = F.cross_entropy(scores.reshape(-1, n_rows), target.reshape(-1))
    accuracy = (scores.argmax(-1) == target).float().mean()
    return loss, accuracy
