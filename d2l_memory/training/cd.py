"""Per-document context distillation (CD): the gradient baseline that Doc-to-LoRA replaces.

For one document, a fresh LoRA (same rank, target modules, layers and scale as the hypernetwork's) is
trained with Adam so that the base model *without* the document answers a set of probe questions the
way the base model *with* the document in its prompt does (the same top-k teacher-weighted
log-likelihood as meta-training, `objective.per_example_loss`). This is what one would do per document
without a hypernetwork; it costs a teacher generation plus `steps` forward/backward passes, which is
what the evaluation and the benchmarks time against one hypernetwork forward pass.

The probes are generic (what the text says, its facts, its sentences), never the evaluation's questions
unless a caller passes them explicitly as `queries`: a user absorbing a document does not know them.
Documents longer than `piece_tokens` are distilled piece by piece (the teacher sees one piece at a time,
as it must within its window), all pieces into the one adapter.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

import torch

from d2l_memory.chunking import validate_text
from d2l_memory.d2l import DocToLoRA
from d2l_memory.lora import LoRA
from d2l_memory.training.objective import per_example_loss, student_batch
from d2l_memory.training.teacher import greedy, prompt_ids, topk_on

GENERIC_PROBES = (
    "What does the text say?",
    "List every fact stated in the text.",
    "Summarize the text in one sentence.",
    "Repeat the most important detail of the text.",
)


def probes(text: str, n_sentence_probes: int = 6, seed: int = 0) -> list[str]:
    """Generic questions plus one 'what does it say about ...' question per sampled sentence."""
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if len(s.split()) >= 3]
    picked = random.Random(seed).sample(sentences, min(n_sentence_probes, len(sentences)))
    about = [f"What does the text say about {' '.join(s.split()[:4]).rstrip(',;:')}?" for s in picked]
    return [*GENERIC_PROBES, *about]


def _pieces(d2l: DocToLoRA, text: str, piece_tokens: int) -> list[str]:
    ids = d2l.base.tokenizer(text, add_special_tokens=False)["input_ids"]
    return [d2l.base.tokenizer.decode(ids[i : i + piece_tokens]) for i in range(0, len(ids), piece_tokens)]


def teacher_examples(d2l: DocToLoRA, document: str, queries: Sequence[str] | None = None, *,
                     piece_tokens: int = 1024, max_new_tokens: int = 48, k: int = 16, seed: int = 0) -> list[dict]:
    """The teacher's greedy answers (with the document piece in its prompt) and their top-k log-probs."""
    base = d2l.base
    examples = []
    for i, piece in enumerate(_pieces(d2l, document, piece_tokens)):
        questions = list(queries) if queries is not None else probes(piece, seed=seed + i)
        prompts = [prompt_ids(base, q, piece) for q in questions]
        with base.lock:
            responses = greedy(base, prompts, max_new_tokens)
            for q, prompt, response in zip(questions, prompts, responses, strict=True):
                ids, logprobs = topk_on(base, prompt, response, k)
                examples.append({"question": q, "response": torch.tensor(response), "topk_ids": ids,
                                 "topk_logprobs": logprobs})
    return examples


def context_distill(d2l: DocToLoRA, document: str, *, steps: int = 20, lr: float = 1e-3, batch_size: int = 8,
                    queries: Sequence[str] | None = None, seed: int = 0) -> LoRA:
    """Train a LoRA on `document` by context distillation (`steps` Adam steps) and return it.

    The adapter has the hypernetwork's rank, modules and scale, no bias slot, and `hypernet=""`
    (it was not made by a hypernetwork).

    Raises:
        TypeError / ValueError: `document` is not a non-empty str (the same validation as absorb).
    """
    validate_text(document, "document")
    examples = teacher_examples(d2l, document, queries, seed=seed)
    cfg, base = d2l.config, d2l.base
    gen = torch.Generator().manual_seed(seed)
    factors = {
        name: ((torch.randn(cfg.rank, cfg.d_in, generator=gen) / cfg.d_in**0.5).requires_grad_(),
               torch.zeros(cfg.d_out, cfg.rank, requires_grad=True))
        for name in cfg.module_names()
    }
    opt = torch.optim.Adam([t for pair in factors.values() for t in pair], lr=lr)
    order = random.Random(seed)
    with base.lock:
        for _ in range(steps):
            batch = student_batch(base, order.sample(examples, min(batch_size, len(examples))))
            loss = per_example_loss(base, batch, factors, cfg.scale).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    weights = {name: (a.detach().clone(), b.detach().clone()) for name, (a, b) in factors.items()}
    return LoRA(weights, scale=cfg.scale, base_model=base.model_id, hypernet="", n_chunks=1)
