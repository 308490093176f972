"""Meta-training recipe: a plain loop you read top to bottom (no trainer framework).

    python -m d2l_memory.training.train --config runs/<name>/train.json          # one process
    torchrun --nproc_per_node 2 -m d2l_memory.training.train --config ...       # data-parallel

Each step: sample examples -> cut each context into 1 (stage 1) or 1..max_chunks (stage 2) chunks ->
hypernetwork factors per chunk (frozen encoder) -> concatenate per example along the rank + bias slot
-> student loss against the cached teacher top-k -> AdamW (warmup + cosine), gradient accumulation.
Every `checkpoint_minutes` the run saves hypernetwork, optimizer, scheduler, RNG states and data
position as safetensors + JSON (no pickle), and `--config` of an existing run resumes it exactly.
SIGTERM or Ctrl-C stops the run after the current step with a checkpoint (a second Ctrl-C at once).
The held-out *document-usage gap* (loss with a shuffled document's LoRA minus loss with the matching
one) is logged with every evaluation: while it is ~0 the hypernetwork learns a prior, not memory.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import random
import shutil
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from d2l_memory.chunking import chunk_document
from d2l_memory.compose import DEFAULT_WEIGHTING, member_weights
from d2l_memory.d2l import DocToLoRA
from d2l_memory.embedder import Embedder
from d2l_memory.functional import applied
from d2l_memory.home import sha256_file
from d2l_memory.hypernet import HypernetConfig
from d2l_memory.kinds import Weighting
from d2l_memory.models import load_model
from d2l_memory.scoring import contains
from d2l_memory.training.objective import (
    key_alignment_loss,
    l1_penalty,
    module_inputs,
    per_example_loss,
    response_logprobs,
    response_loss,
    slot_overlap,
    student_batch,
    value_scores,
)
from d2l_memory.training.teacher import ShardSet, greedy, prompt_ids


class TrainConfig(BaseModel):
    """A training run, saved as `train.json` in its directory (configs are data)."""

    model_config = ConfigDict(extra="forbid")

    data: Path = Path("runs/data")
    eval_data: Path = Path("runs/eval-data")
    out: Path = Path("runs/d2l")
    hypernet: HypernetConfig = Field(default_factory=HypernetConfig)
    init_from: Path | None = Field(None, description="start a new run from these hypernetwork weights "
                                   "(e.g. the shipped checkpoint), of the same config or one without the "
                                   "fast-only slots or maps this run adds; ignored when the run resumes")
    lr: float = 5e-4
    scaler_lr: float = 5e-3
    value_weight: float = Field(1.0, ge=1.0, description="weight of the response tokens that spell the told "
                                "value in each example's loss (the held-out loss stays unweighted)")
    fast_map_lr: float = Field(3e-3, gt=0, description="rate of the fast-weight maps' up-projections "
                               "(`hypernet.fast_map_rank`): they start at zero and must grow to the keys' size")
    weight_decay: float = 0.01
    warmup_steps: int = 50
    total_steps: int = 4000
    batch_size: int = 8
    grad_accum: int = 1
    l1: float = 0.1
    slot_diversity: float = Field(0.0, ge=0.0, description="weight of `objective.slot_overlap` on the "
                                  "generated A factors (0: logged, not trained)")
    key_alignment: float = Field(0.0, ge=0.0, description="weight of `objective.key_alignment_loss`: the "
                                 "module input where the reply spells the told value must match a key of its "
                                 "own adapter better than the batch's other adapters' keys (0: logged, not trained)")
    key_temperature: float = Field(0.05, gt=0, description="temperature of `key_alignment_loss` (cosines)")
    stage2_step: int = 2000
    max_chunks: int = 8
    min_chunk_tokens: int = Field(25, description="stage 2 cuts no context into chunks shorter than this")
    composition: Weighting = Field(DEFAULT_WEIGHTING, description="how an example's memories combine: train "
                                   "what `MemoryConfig.composition` serves (`relevance`: weighted by each "
                                   "memory's recall score for the example's question)")
    gold_ce: bool = False
    value_ce: bool = Field(False, description="score the response tokens that spell the told value by "
                           "cross-entropy on the reference instead of the teacher's top-k (the held-out "
                           "loss stays the teacher's)")
    eval_every: int = 50
    eval_examples: int = 32
    recall_examples: int = Field(12, description="held-out examples answered greedily at each evaluation: "
                                 "exact recall of values never trained on moves later than the loss does")
    checkpoint_minutes: float = 5.0
    stop_at_step: int | None = Field(None, description="end this invocation (with a checkpoint) at this step")
    time_budget_minutes: float | None = Field(None, description="end this invocation after this long")
    threads: int = 1
    device: str = Field("cpu", description="where the base model and hypernetwork run ('cuda' on a GPU)")
    pass_tokens: int = Field(2048, ge=1, description="padded tokens per encoder pass (DocToLoRA.pass_tokens); "
                             "a huge value encodes a batch's chunks in one padded pass, as before micro-batching")
    seed: int = 0


def on_device(examples: list[dict], device: str) -> list[dict]:
    """`examples` with their teacher tensors on `device` (`ShardSet` reads them onto the CPU)."""
    if device == "cpu":
        return examples
    return [{k: v.to(device) if torch.is_tensor(v) else v for k, v in ex.items()} for ex in examples]


def memories_for(examples: list[dict], rng: random.Random, pool: list[dict]) -> list[list[str]]:
    """What each example's student adapter composes: its `memories` (the relevant ones and the same
    user's distractors), else its context alone; control questions borrow an unrelated example's."""
    def own(ex: dict) -> list[str]:
        return ex.get("memories") or [ex["context"]]  # a conversation example's context is empty
    return [own(rng.choice(pool)) if ex["control"] else own(ex) for ex in examples]


@functools.cache
def _embedder() -> Embedder:
    return Embedder()


def text_weights(composition: str, texts: Sequence[str], question: str | None) -> list[float]:
    """The weights `D2LMemory.prepare` gives memories of these texts recalled for `question`
    (`compose.member_weights`; for `relevance` of their recall scores, `store.relevance_scores`).

    Raises:
        ValueError: `relevance` over several texts without a question, or what `member_weights` raises.
    """
    if composition != "relevance" or len(texts) == 1:
        return member_weights(composition, [0.0] * len(texts))  # only relevance reads scores, and one text gets 1
    if question is None:
        raise ValueError("composition 'relevance' weighs memories by their score for a question: give one")
    # Imported here: the store needs LanceDB, which a GPU burst's image lacks (it trains with `mean`).
    from d2l_memory.store.store import relevance_scores

    return member_weights(composition, relevance_scores(_embedder(), question, texts))


def batch_factors(d2l: DocToLoRA, rows: list[list[str]], n_chunks: list[int], min_chunk_tokens: int = 1,
                  composition: str = DEFAULT_WEIGHTING, questions: Sequence[str] | None = None
                  ) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Per-row factors `{module: (A [B, R, d_in], B [B, d_out, R])}` for `rows`, with gradients.

    Row i composes the memories `rows[i]` the way `D2LMemory.prepare` composes recalled ones (weighted by
    `text_weights(composition, rows[i], questions[i])`, the bias slot once) through the
    assembly serving uses (`DocToLoRA.assemble`). A row of one memory is cut into `n_chunks[i]` equal
    chunks (fewer where a chunk would hold less than `min_chunk_tokens` tokens), as stage 2 trains long
    documents; several memories keep the chunks `internalize` would give each.
    """
    tok, c = d2l.base.tokenizer, d2l.config
    flat: list[list[int]] = []
    groups: list[list[tuple[int, float]]] = []
    for i, (texts, k) in enumerate(zip(rows, n_chunks, strict=True)):
        weights = text_weights(composition, texts, None if questions is None else questions[i])
        group = []
        for text, weight in zip(texts, weights, strict=True):
            size = c.chunk_tokens
            if len(texts) == 1:
                n_tokens = len(tok(text, add_special_tokens=False)["input_ids"])
                # A few-token fragment carries no fact a question could recall (a 20-token fact chat cut 8 ways).
                k = max(1, min(k, n_tokens // min_chunk_tokens))
                size = max(1, min(c.chunk_tokens, math.ceil(n_tokens / k)))
            for chunk in chunk_document(tok, text, size, d2l.max_positions):
                group.append((len(flat), weight))
                flat.append(chunk)
        groups.append(group)
    a, b = d2l.chunk_factors(flat)  # [K_total, L, r, d_in], [K_total, L, d_out, r]
    a_all, b_all = d2l.assemble(a, b, groups)  # [B, L, R, d_in], [B, L, d_out, R]
    factors = {name: (a_all[:, j], b_all[:, j]) for j, name in enumerate(c.module_names())}
    return factors, a, b


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch: a shuffle that depends only on (seed, epoch), so resume is exact."""
    order = list(range(n))
    random.Random(seed + epoch).shuffle(order)
    return order


def lr_lambda(config: TrainConfig):
    def f(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.total_steps - config.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def make_optimizer(d2l: DocToLoRA, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW; no decay on scalers, norms, biases and latents; scalers and the fast-weight maps'
    up-projections at their own (higher) rates."""
    decay, no_decay, scalers, maps = [], [], [], []
    for name, p in d2l.hypernet.named_parameters():
        if name.startswith(("scaler_", "fast_scaler_")) or name == "value_gain":
            scalers.append(p)
        elif name in ("fast_key_up", "fast_value_up"):
            maps.append(p)
        elif p.dim() < 2 or "norm" in name or name in ("latents", "slot_queries", "fast_queries", "layer_embed"):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": config.weight_decay, "lr": config.lr},
              {"params": no_decay, "weight_decay": 0.0, "lr": config.lr},
              {"params": scalers, "weight_decay": 0.0, "lr": config.scaler_lr}]
    if maps:  # only then: checkpoints of networks without maps keep their three groups
        groups.append({"params": maps, "weight_decay": 0.0, "lr": config.fast_map_lr})
    return torch.optim.AdamW(groups)


STATE_FILE = "train_state.json"  # a checkpoint's record, written last: where it is whole, the checkpoint is


def save_checkpoint(directory: Path, d2l: DocToLoRA, opt: torch.optim.Optimizer,
                    sched: torch.optim.lr_scheduler.LambdaLR, state: dict) -> None:
    """Write everything needed to resume exactly, so that a kill at any moment leaves one whole checkpoint.

    The checkpoint is written whole into `<name>.tmp`, `train_state.json` last and atomically (it records
    the sha256 of the other files, so where it exists the rest is complete). Then its files replace those of
    `directory` one at a time, `train_state.json` last (`_install`); a first checkpoint is renamed into place
    whole. So `directory/train_state.json` exists from the first checkpoint on (the run resumes whenever it
    does): a kill while `.tmp` is written leaves the previous checkpoint as it was, and a kill during the
    replacements leaves `.tmp/train_state.json`, from which `load_checkpoint` finishes them.

    Raises:
        RuntimeError: `directory` is missing while `<name>.tmp` or `<name>.old` holds a whole checkpoint (an
            older release's swap was killed between its renames): this run did not resume from it, and
            saving would destroy it. The message says how to resume from it.
    """
    tmp, old = (directory.with_name(directory.name + suffix) for suffix in (".tmp", ".old"))
    if not directory.exists():
        for stranded in (tmp, old):
            if (stranded / STATE_FILE).is_file():
                raise RuntimeError(f"{directory} is missing but {stranded} holds a whole checkpoint, which this run "
                                   f"did not resume from: rename {stranded} to {directory} and start the run "
                                   f"again to resume it, or delete {stranded} to keep this run")
    elif (tmp / STATE_FILE).is_file():
        _install(tmp, directory)  # a swap a kill interrupted, if nothing loaded the checkpoint since
    for leftover in (tmp, old):  # a half-written checkpoint, or an older release's swap leftover
        shutil.rmtree(leftover, ignore_errors=True)
    tmp.mkdir(parents=True)
    d2l.save(tmp, dtype=torch.float32)
    opt_state = opt.state_dict()
    tensors = {}
    for pid, slots in opt_state["state"].items():
        for key, value in slots.items():
            tensors[f"{pid}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    tensors["torch_rng"] = torch.get_rng_state()
    save_file(tensors, tmp / "optimizer.safetensors")
    files = sorted(p.name for p in tmp.iterdir())
    for name in files:  # on disk before the record that vouches for them
        with open(tmp / name, "rb") as fh:
            os.fsync(fh.fileno())
    meta = {"param_groups": opt_state["param_groups"], "scheduler": sched.state_dict(),
            "python_rng": list(map(lambda x: list(x) if isinstance(x, tuple) else x, random.getstate())),
            **state, "files": {name: sha256_file(tmp / name) for name in files}}
    record = tmp / (STATE_FILE + ".part")
    with open(record, "w") as fh:
        fh.write(json.dumps(meta, default=str))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(record, tmp / STATE_FILE)
    if directory.exists():
        _install(tmp, directory)
    else:
        tmp.rename(directory)


def _install(tmp: Path, directory: Path) -> None:
    """Move a whole checkpoint's files from `tmp` over those of `directory`, `train_state.json` last, then drop
    `tmp`. Run again after a kill part way, it moves what is left."""
    for name in sorted(p.name for p in tmp.iterdir() if p.name != STATE_FILE):
        os.replace(tmp / name, directory / name)
    os.replace(tmp / STATE_FILE, directory / STATE_FILE)
    shutil.rmtree(tmp, ignore_errors=True)


def load_checkpoint(directory: Path, d2l: DocToLoRA, opt: torch.optim.Optimizer,
                    sched: torch.optim.lr_scheduler.LambdaLR) -> dict:
    """Restore what `save_checkpoint` wrote, after finishing a swap that a kill interrupted (the newest whole
    checkpoint wins: `<name>.tmp`'s when it has its `train_state.json`).

    Raises:
        ValueError: a file that does not match the sha256 its `train_state.json` records (a corrupted
            checkpoint is refused, never resumed from).
    """
    tmp = directory.with_name(directory.name + ".tmp")
    if (tmp / STATE_FILE).is_file():
        if directory.exists():
            _install(tmp, directory)
        else:
            tmp.rename(directory)
    meta = json.loads((directory / STATE_FILE).read_text())
    for name, digest in meta.pop("files", {}).items():  # checkpoints of older releases record none
        if sha256_file(directory / name) != digest:
            raise ValueError(f"{directory / name} does not match the sha256 in {STATE_FILE}: the checkpoint is "
                             "corrupt")
    state = load_file(directory / "hypernet.safetensors")
    d2l.hypernet.load_state_dict(state)
    tensors = load_file(directory / "optimizer.safetensors")
    slots: dict[int, dict] = {}
    for key, value in tensors.items():
        if key == "torch_rng":
            continue
        pid, name = key.split(".", 1)
        slots.setdefault(int(pid), {})[name] = value
    opt.load_state_dict({"state": slots, "param_groups": meta.pop("param_groups")})
    sched.load_state_dict(meta.pop("scheduler"))
    torch.set_rng_state(tensors["torch_rng"])
    version, internal, gauss = meta.pop("python_rng")
    random.setstate((version, tuple(internal), gauss))
    return meta


@torch.no_grad()
def usage_gap(d2l: DocToLoRA, examples: list[dict], config: TrainConfig) -> dict[str, float]:
    """Held-out loss with each example's own document (whole, and cut into `max_chunks` chunks), with the
    next example's document, and with none; the same three for the told values' tokens alone
    (`eval_value_nll*`, nats per token, and `eval_value_first_top1*`); greedy recall of the told values
    (`eval_recall`)."""
    d2l.hypernet.eval()
    real = [ex for ex in examples if not ex["control"]]
    batch = student_batch(d2l.base, real)
    rows = [ex.get("memories") or [ex["context"]] for ex in real]
    questions = [ex["question"] for ex in real]
    own, _, _ = batch_factors(d2l, rows, [1] * len(real), composition=config.composition, questions=questions)
    other, _, _ = batch_factors(d2l, rows[1:] + rows[:1], [1] * len(real), composition=config.composition,
                                questions=questions)
    metrics = {}
    for name, factors, scale in (("", own, d2l.config.scale), ("_shuffled", other, d2l.config.scale),
                                 ("_no_lora", {}, 1.0)):
        logprobs = response_logprobs(d2l.base, batch, factors, scale)
        metrics[f"eval_loss{name}"] = response_loss(batch, logprobs, config.gold_ce).mean().item()
        metrics.update({f"eval_{key}{name}": v for key, v in value_scores(batch, logprobs).items()})
        del logprobs
    # Stage 2's question: does the own document still help when cut into chunks whose adapters are summed?
    chunked, _, _ = batch_factors(d2l, [[ex["context"]] for ex in real], [config.max_chunks] * len(real),
                                  config.min_chunk_tokens)
    loss_chunked = per_example_loss(d2l.base, batch, chunked, d2l.config.scale, config.gold_ce).mean().item()
    metrics.update(eval_loss_chunked=loss_chunked, usage_gap=metrics["eval_loss_shuffled"] - metrics["eval_loss"])
    asked = [ex for ex in real if ex.get("answer")][: config.recall_examples]
    if asked:
        factors, _, _ = batch_factors(d2l, [ex.get("memories") or [ex["context"]] for ex in asked], [1] * len(asked),
                                      composition=config.composition, questions=[ex["question"] for ex in asked])
        prompts = [prompt_ids(d2l.base, ex["question"], None) for ex in asked]
        with applied(d2l.base.model, factors, d2l.config.scale):
            replies = d2l.base.tokenizer.batch_decode(greedy(d2l.base, prompts, 24), skip_special_tokens=True)
        hits = [contains(reply, ex["answer"]) for reply, ex in zip(replies, asked, strict=True)]
        metrics["eval_recall"] = sum(hits) / len(hits)
    d2l.hypernet.train()
    return metrics


def train(config: TrainConfig) -> None:
    """Run (or resume) a training run described by `config`."""
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    torch.set_num_threads(config.threads)
    if config.device != "cpu":  # the loop builds its batches with plain torch.tensor calls: make them there
        torch.set_default_device(config.device)
    torch.manual_seed(config.seed + rank)
    random.seed(config.seed + rank)
    config.out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        (config.out / "train.json").write_text(config.model_dump_json(indent=1))

    base = load_model(config.hypernet.base_model)
    base.model.to(config.device)
    # A new run on another base model gives only hypernet.base_model: the rest of its shape is read from the model
    # (and what a config does give is checked against it).
    given = config.hypernet.model_dump(include=config.hypernet.model_fields_set)
    config.hypernet = HypernetConfig.for_model(base, **given)
    if rank == 0:
        (config.out / "train.json").write_text(config.model_dump_json(indent=1))
    d2l = DocToLoRA.untrained(config.hypernet, base, seed=config.seed)
    d2l.pass_tokens = config.pass_tokens
    if config.init_from is not None:
        start = DocToLoRA.from_pretrained(config.init_from, base=base)
        growable = {k: getattr(config.hypernet, k) for k in ("fast_slots", "fast_map_rank")}
        grown = [k for k, v in growable.items() if getattr(start.config, k) == 0 < v]
        if start.config.model_copy(update=growable) != config.hypernet or \
                any(getattr(start.config, k) not in (0, v) for k, v in growable.items()):
            raise ValueError(f"{config.init_from} has another hypernetwork config than this run (a run may only "
                             "add fast_slots or fast_map_rank to weights that have none)")
        # Added slots and maps keep their initialisation (zero B scalers, zero up-projections), which leaves
        # the adapters unchanged.
        d2l.hypernet.load_state_dict(start.hypernet.state_dict(), strict=not grown)
    d2l.hypernet.train()
    opt = make_optimizer(d2l, config)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(config))
    shards = ShardSet(config.data)
    held_out = [ex for ex in ShardSet(config.eval_data).examples if not ex["control"]][: config.eval_examples] \
        if config.eval_data.exists() else []
    held_out = on_device(held_out, config.device)
    step, position, epoch, started = 0, 0, 0, time.time()
    last = config.out / "last"
    if (last / "train_state.json").exists():
        meta = load_checkpoint(last, d2l, opt, sched)
        step, position, epoch = meta["step"], meta["position"], meta["epoch"]
        started -= meta.get("elapsed", 0.0)
        shards = ShardSet(config.data, meta["shards"])  # the epoch's exact data, for an exact resume
    data = on_device(shards.examples, config.device)
    pool = [ex for ex in data if not ex["control"]]
    order = epoch_order(len(data), config.seed, epoch)
    log = (config.out / "metrics.jsonl").open("a") if rank == 0 else None  # closed at the end of train()
    last_save = invocation_start = time.time()

    def checkpoint() -> None:
        save_checkpoint(last, d2l, opt, sched, {"step": step, "position": position, "epoch": epoch,
                                                "elapsed": time.time() - started, "shards": shards.names})

    with stop_requests() as stop:
        bar = tqdm(total=config.total_steps, initial=step, desc="meta-train", disable=rank != 0)
        while step < config.total_steps:
            if config.stop_at_step is not None and step >= config.stop_at_step:
                break
            budget_s = None if config.time_budget_minutes is None else config.time_budget_minutes * 60
            if budget_s is not None and time.time() - invocation_start > budget_s:
                if rank == 0:
                    checkpoint()
                break
            opt.zero_grad(set_to_none=True)
            metrics = {"loss": 0.0, "l1": 0.0, "slot_overlap": 0.0, "key_align": 0.0, "key_acc": 0.0}
            for _ in range(config.grad_accum):
                if position + config.batch_size * world > len(order):
                    # New epoch: pick up shards written since (data preparation may run alongside).
                    epoch, position, shards = epoch + 1, 0, ShardSet(config.data)
                    data = on_device(shards.examples, config.device)
                    pool = [ex for ex in data if not ex["control"]]
                    order = epoch_order(len(data), config.seed, epoch)
                idx = order[position + rank * config.batch_size : position + (rank + 1) * config.batch_size]
                position += config.batch_size * world
                examples = [data[i] for i in idx]
                rng = random.Random(config.seed * 1_000_003 + step * 101 + rank)
                stage2 = step >= config.stage2_step
                n_chunks = [rng.randint(1, config.max_chunks) if stage2 else 1 for _ in examples]
                factors, a, b = batch_factors(d2l, memories_for(examples, rng, pool), n_chunks,
                                              config.min_chunk_tokens, config.composition,
                                              [ex["question"] for ex in examples])
                batch = student_batch(base, examples, config.value_weight)
                names = d2l.config.module_names()
                with module_inputs(base.model, names, batch.rows[batch.values], batch.cols[batch.values]) as seen:
                    kd = per_example_loss(base, batch, factors, d2l.config.scale, config.gold_ce,
                                          value_ce=config.value_ce).mean()
                reg = l1_penalty(a, b)
                overlap = slot_overlap(a)
                memory_rank = factors[names[0]][0].shape[1] - d2l.bias_rows
                keys = torch.stack([factors[n][0][:, :memory_rank] for n in names], dim=1)  # [B, L, R, d_in]
                queries = torch.stack([seen[n] for n in names], dim=1)  # [P, L, d_in]
                align, accuracy = key_alignment_loss(keys, queries, batch.example[batch.values],
                                                     config.key_temperature)
                loss = (kd + config.l1 * reg + config.slot_diversity * overlap
                        + config.key_alignment * align) / config.grad_accum
                loss.backward()
                metrics["loss"] += kd.item() / config.grad_accum
                metrics["l1"] += reg.item() / config.grad_accum
                metrics["slot_overlap"] += overlap.item() / config.grad_accum
                metrics["key_align"] += align.item() / config.grad_accum
                metrics["key_acc"] += accuracy.item() / config.grad_accum
            if distributed:  # data parallel: every rank steps with the mean gradient (what DDP computes)
                for p in d2l.hypernet.parameters():
                    dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)  # AVG is not available on gloo (CPU)
                    p.grad /= world
            torch.nn.utils.clip_grad_norm_(d2l.hypernet.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}")
            record = {"step": step, "epoch": epoch, "lr": sched.get_last_lr()[0], "elapsed": time.time() - started,
                      "samples": step * config.batch_size * config.grad_accum * world, **metrics,
                      "scaler_b": d2l.hypernet.scaler_b.abs().mean().item()}
            if d2l.config.fast_slots:  # how far the fast-only slots have opened (they start at zero)
                record["fast_scaler_b"] = d2l.hypernet.fast_scaler_b.abs().mean().item()
            if held_out and rank == 0 and (step % config.eval_every == 0 or step == config.total_steps):
                record.update(usage_gap(d2l, held_out, config))
                bar.write(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()}))
            if log:
                log.write(json.dumps(record) + "\n")
                log.flush()
            stopping = stop.is_set()
            if distributed:  # every rank must leave at the same step, or the others wait in all_reduce forever
                flag = torch.tensor([float(stopping)])
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                stopping = bool(flag.item())
            ending = step in (config.total_steps, config.stop_at_step) or stopping
            if rank == 0 and (time.time() - last_save > config.checkpoint_minutes * 60 or ending):
                checkpoint()
                last_save = time.time()
            if stopping:
                bar.write(f"stopped at step {step} on request; resume with the same --config")
                break
        bar.close()
    if log:
        log.close()
    if distributed:
        dist.destroy_process_group()


@contextmanager
def stop_requests() -> Iterator[threading.Event]:
    """An event that SIGTERM or Ctrl-C sets, so that training stops after the current step with a checkpoint
    (a second Ctrl-C interrupts at once). Signals can only be caught on the main thread; elsewhere the
    event is never set by them."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handle(signum: int, frame: FrameType | None) -> None:
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.set()

    previous = {signum: signal.signal(signum, handle) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def load_config(path: Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """`path` (a train.json; defaults where it does not exist) with `key=value` overrides applied.

    Keys may be dotted into nested sections (`hypernet.rank=16`); values are JSON (`lr=0.001`,
    `'hypernet.layers=[8,9]'`), and anything that is not JSON is taken as a string (`out=runs/x`).

    Raises:
        ValueError: an override without `=`, or a resulting config that does not validate (unknown keys
            included).
    """
    raw = json.loads(path.read_text()) if path.exists() else {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not key=value")
        target = raw
        *parents, leaf = key.split(".")
        for p in parents:
            target = target.setdefault(p, {})
        try:
            target[leaf] = json.loads(value)
        except ValueError:
            target[leaf] = value
    return TrainConfig.model_validate(raw)


def main() -> None:
    parser = argparse.ArgumentParser(description="Meta-train a Doc-to-LoRA hypernetwork.")
    parser.add_argument("--config", type=Path, required=True, help="train.json (created with defaults if missing)")
    parser.add_argument("--set", nargs="*", default=[], help="overrides: key=value, e.g. lr=0.001 hypernet.rank=16")
    args = parser.parse_args()
    train(load_config(args.config, args.set))


if __name__ == "__main__":
    main()
