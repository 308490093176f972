"""Meta-training pipeline: teacher shards, the objective, exact resume, and data-parallel launch."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from d2l_memory.compose import member_weights
from d2l_memory.d2l import DocToLoRA
from d2l_memory.encoder import ContextFeatures
from d2l_memory.hypernet import HyperLoRA, HypernetConfig
from d2l_memory.lora import LoRA
from d2l_memory.scoring import token_f1
from d2l_memory.training import conversations, recital
from d2l_memory.training.data import (
    FAIRYTALE_TRAIN_FILE,
    FRIENDS_TRAIN_FILE,
    TRAIN_FILES,
    control_questions,
    detokenize,
    fact_sample,
    fairytale_samples,
    friends_samples,
    shared_data,
    squad_samples,
)
from d2l_memory.training.evaluate import QA_SETS, held_out_questions
from d2l_memory.training.objective import key_alignment_loss, module_inputs, slot_overlap
from d2l_memory.training.plot import plot
from d2l_memory.training.prepare import DEFAULT_MIX, build_mix, control_prompts, draw
from d2l_memory.training.teacher import ShardSet, build_shard
from d2l_memory.training.train import TrainConfig, batch_factors, memories_for, train
from d2l_memory.transcripts import segment_turns, transcript_turns

TINY = {"layers": [10, 12], "latent_dim": 64, "n_heads": 2, "chunk_tokens": 64}


@pytest.fixture(scope="module")
def shard_dir(base, tmp_path_factory):
    directory = tmp_path_factory.mktemp("shards")
    samples = [fact_sample(random.Random(i)) for i in range(10)]
    counts = build_shard(base, samples, directory / "shard-0", control=["What is the capital of Peru?"])
    assert counts["kept"] >= 6 and counts["control"] == 1
    return directory


def test_shards_hold_teacher_topk_for_each_response_token(base, shard_dir):
    examples = ShardSet(shard_dir).examples
    real = [e for e in examples if not e["control"]]
    first = real[0]
    assert first["topk_ids"].shape == (len(first["response"]), 16)
    assert first["response"][-1].item() == base.tokenizer.eos_token_id
    # The teacher (with the context) puts most mass on the reference answer's tokens.
    hit = first["topk_ids"][:, 0] == first["response"]
    assert hit.float().mean() > 0.5
    assert any(e["control"] and e["context"] == "" for e in examples)


def test_a_control_answer_cut_by_the_budget_is_kept_as_far_as_it_goes(base, tmp_path):
    counts = build_shard(base, [], tmp_path / "controls", control=["Tell me a long story about dragons."],
                         max_new_tokens=4)
    (example,) = ShardSet(tmp_path).examples
    assert counts["control"] == 1 and example["control"] and len(example["response"]) == 4
    assert base.tokenizer.eos_token_id not in example["response"].tolist()


def test_mix_never_reads_benchmarks():
    mix = build_mix(200, 3, {"facts": 0.3, "needle": 0.2, "squad": 0.3, "fairytale": 0.2})
    sources = {s.source for s in mix}
    # No passage of the evaluation's QA sets is in any pool training draws from.
    held_out = {s.context for path, read in QA_SETS.values() for s in read(shared_data() / path)}
    pools = [s.context for path in TRAIN_FILES for s in squad_samples(shared_data() / path)]
    pools += [s.context for s in fairytale_samples(shared_data() / FAIRYTALE_TRAIN_FILE)]
    pools += [s.context for s in friends_samples(shared_data() / FRIENDS_TRAIN_FILE)]
    assert held_out and pools and not held_out & set(pools)
    assert sources <= {"facts", "needle", "fairytale", "squad:new_wiki_v1.0", "squad:reddit_v1.0",
                       "squad:amazon_reviews_v1.0", "squad:saipriya_train-v1.1_sample"}
    assert token_f1("the Eiffel tower", "Eiffel Tower!") == 1.0 and token_f1("no", "yes") == 0.0


def test_friends_scenes_are_chats_as_absorb_messages_writes_them(base):
    count = lambda text: len(base.tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    samples = list(friends_samples(shared_data() / FRIENDS_TRAIN_FILE, count))
    assert len(samples) > 1000 and {s.source.split(":")[0] for s in samples} == {"friends"}
    for s in samples:
        assert s.answer in s.context and s.context in s.memories and len(s.memories) <= 3
        # absorb_messages' segment budget, counted per turn (a longer single turn is a memory of its own)
        assert all(sum(map(count, m.splitlines())) <= 256 or "\n" not in m for m in s.memories)
        assert all(": " in line for line in s.context.splitlines())  # one `Speaker: text` line per turn
    assert any(line.startswith("Ross Geller: ") for s in samples for line in s.context.splitlines())
    assert detokenize("I do n't know , we 're gon na see ( laughs ) .") == "I don't know, we're gonna see (laughs)."
    # The test file is held out: none of its scenes is a training sample's.
    test = json.loads((shared_data() / "friendsqa" / "friendsqa_tst.json").read_text())["data"]
    assert test and not {scene["title"] for scene in test} & {s.source.split(":", 1)[1] for s in samples}
    # Named speakers keep their capitals, as absorb_messages now writes them.
    assert transcript_turns([("Ross Geller", "hi"), ("user", "yo")]) == ["Ross Geller: hi", "User: yo"]


def _config(shard_dir, out, **kw) -> TrainConfig:
    fields = {"data": shard_dir, "eval_data": shard_dir, "out": out, "hypernet": TINY, "batch_size": 3,
              "total_steps": 4, "warmup_steps": 1, "eval_every": 4, "eval_examples": 4, "checkpoint_minutes": 0,
              "stage2_step": 2, "max_chunks": 3}
    return TrainConfig(**{**fields, **kw})


def test_resume_is_exact(shard_dir, tmp_path):
    train(_config(shard_dir, tmp_path / "straight"))
    train(_config(shard_dir, tmp_path / "resumed", stop_at_step=2))
    state = json.loads((tmp_path / "resumed" / "last" / "train_state.json").read_text())
    assert state["step"] == 2
    train(_config(shard_dir, tmp_path / "resumed"))
    a = load_file(tmp_path / "straight" / "last" / "hypernet.safetensors")
    b = load_file(tmp_path / "resumed" / "last" / "hypernet.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    metrics = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    # A new run can start from those weights (how training continues on another machine).
    train(_config(shard_dir, tmp_path / "continued", init_from=tmp_path / "straight" / "last", total_steps=1))
    c = load_file(tmp_path / "continued" / "last" / "hypernet.safetensors")
    # One step from `a` moves the B scalers less than the four steps that took them from zero to `a`.
    assert 0 < (c["scaler_b"] - a["scaler_b"]).abs().max() < a["scaler_b"].abs().max()
    # ... and may add fast-only slots to them, which start silent (zero B scalers) and then learn.
    train(_config(shard_dir, tmp_path / "grown", init_from=tmp_path / "straight" / "last", total_steps=1,
                  hypernet={**TINY, "fast_slots": 2, "fast_map_rank": 4}, key_alignment=1.0))
    grown = load_file(tmp_path / "grown" / "last" / "hypernet.safetensors")
    assert grown["fast_scaler_b"].abs().max() > 0 and grown["fast_key_up"].abs().max() > 0
    record = json.loads((tmp_path / "grown" / "metrics.jsonl").read_text())
    assert record["fast_scaler_b"] > 0 and record["key_align"] > 0 and 0 <= record["key_acc"] <= 1
    with pytest.raises(ValueError, match="may only add fast_slots"):
        train(_config(shard_dir, tmp_path / "other", init_from=tmp_path / "straight" / "last",
                      hypernet={**TINY, "rank": 2}))
    assert "usage_gap" in metrics[-1] and metrics[-1]["scaler_b"] > 0  # the B scalers left zero: it learns
    assert metrics[-1]["eval_loss_chunked"] > 0 and 0 <= metrics[-1]["eval_recall"] <= 1
    assert metrics[-1].get("eval_value_nll", 1.0) > 0 and 0 <= metrics[-1].get("eval_value_first_top1", 0) <= 1
    assert 0 < metrics[-1]["slot_overlap"] < 1  # logged at every step, trained or not
    assert plot(tmp_path / "straight").stat().st_size > 10_000  # the curves of a run, chunked loss included


def test_slot_overlap_is_zero_for_distinct_keys_one_for_a_shared_key_and_training_lowers_it():
    eye = torch.eye(4, 16).reshape(1, 1, 4, 16)
    assert slot_overlap(eye).item() == pytest.approx(0.0, abs=1e-6)
    assert slot_overlap(torch.ones(2, 3, 4, 16)).item() == pytest.approx(1.0)
    # On a real hypernetwork (random chunk features), the term's gradient spreads the fast-weight slots.
    torch.manual_seed(0)
    config = HypernetConfig(layers=[0, 1], latent_dim=64, n_latents=4, n_blocks=1)
    net = HyperLoRA(config)
    n = 24
    feats = ContextFeatures(hidden=torch.randn(2, 1, n, config.hidden_size), mask=torch.ones(2, n, dtype=torch.bool),
                            keys=torch.randn(2, 2, n, config.d_in), next_embed=torch.randn(2, n, config.hidden_size))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    before = slot_overlap(net(feats)[0]).item()
    for _ in range(30):
        opt.zero_grad()
        slot_overlap(net(feats)[0]).backward()
        opt.step()
    assert slot_overlap(net(feats)[0]).item() < 0.5 * before


def test_key_alignment_pulls_the_answer_input_onto_a_key_of_its_own_adapter(base):
    # The queries are what the real model feeds its down-projections where a reply spells a value.
    names = [f"model.layers.{i}.mlp.down_proj" for i in (10, 12)]
    ids = base.tokenizer(["Your partner is Vít.", "You work as a glassblower."], return_tensors="pt",
                         padding=True)
    rows, cols = torch.tensor([0, 0, 1]), torch.tensor([2, 3, 4])
    with torch.no_grad(), module_inputs(base.model, names, rows, cols) as seen:
        base.model(**ids)
    queries = torch.stack([seen[n] for n in names], dim=1)  # [3, 2, d_in]
    assert queries.shape == (3, 2, 1536) and not queries.requires_grad
    assert all(not m._forward_pre_hooks for m in base.model.modules())  # the hooks leave with the block
    owner = torch.tensor([0, 0, 1])
    # Rows whose adapters hold their own queries as keys match perfectly; swapped rows never do.
    own = torch.stack([queries[:2].transpose(0, 1), queries[[2, 2]].transpose(0, 1)])  # [2, L, 2, d_in]
    loss, accuracy = key_alignment_loss(own, queries, owner, 0.05)
    assert accuracy.item() == 1.0 and loss.item() < math.log(2)
    assert key_alignment_loss(own.flip(0), queries, owner, 0.05)[1].item() == 0.0
    assert key_alignment_loss(own[:1], queries, owner[:0], 0.05)[0].item() == 0.0  # nothing to contrast
    # Its gradient turns random keys towards their own row's queries.
    keys = torch.randn(2, 2, 4, 1536, requires_grad=True)
    opt = torch.optim.Adam([keys], lr=0.05)
    before = key_alignment_loss(keys, queries, owner, 0.05)[0].item()
    for _ in range(20):
        opt.zero_grad()
        key_alignment_loss(keys, queries, owner, 0.05)[0].backward()
        opt.step()
    after, accuracy = key_alignment_loss(keys, queries, owner, 0.05)
    assert after.item() < 0.5 * before and accuracy.item() == 1.0


def test_stage_two_never_cuts_a_context_below_the_chunk_floor(base):
    d2l = DocToLoRA.untrained(HypernetConfig(**TINY), base)
    context = "Alice said her favourite colour is teal, and that she adopted a grey cat named Pixel in May."
    n_tokens = len(base.tokenizer(context, add_special_tokens=False)["input_ids"])
    assert 10 < n_tokens < 50
    rank = d2l.config.rank
    widths = {}
    for floor in (1, 10, 25, 100):
        factors, _, _ = batch_factors(d2l, [[context]], [8], floor)
        a, b = next(iter(factors.values()))
        widths[floor] = a.shape[1] // rank - 1  # chunk slots, less the bias slot
        assert b.shape[2] == a.shape[1]
    assert widths[1] > widths[10] > widths[25] == widths[100] == 1 and widths[10] <= n_tokens // 10


def test_sigterm_stops_after_the_step_with_a_checkpoint(shard_dir, tmp_path):
    (tmp_path / "train.json").write_text(_config(shard_dir, tmp_path / "run", total_steps=10_000, eval_examples=0,
                                                 checkpoint_minutes=60).model_dump_json())
    metrics = tmp_path / "run" / "metrics.jsonl"
    command = [sys.executable, "-m", "d2l_memory.training.train", "--config", str(tmp_path / "train.json")]
    proc = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not (metrics.exists() and metrics.read_text().strip()) and proc.poll() is None:
            assert time.time() < deadline, "no training step within 5 minutes"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    state = json.loads((tmp_path / "run" / "last" / "train_state.json").read_text())
    assert state["step"] == steps[-1] < 10_000 and f"stopped at step {steps[-1]}" in stdout


def test_data_parallel_launch_with_torchrun(shard_dir, tmp_path):
    config = _config(shard_dir, tmp_path / "ddp", eval_examples=0).model_dump_json()
    (tmp_path / "train.json").write_text(config)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
                    "d2l_memory.training.train", "--config", str(tmp_path / "train.json"), "--set", "total_steps=2"],
                   check=True, env=env, capture_output=True, timeout=600)
    metrics = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["samples"] == 2 * 3 * 2  # steps x batch x ranks


def test_context_distillation_fits_the_teacher_without_the_document(base):
    # The CD baseline: a few Adam steps must lower the student's distillation loss on the teacher's answers.
    from d2l_memory.d2l import DocToLoRA
    from d2l_memory.training.cd import context_distill, teacher_examples
    from d2l_memory.training.objective import per_example_loss, student_batch

    d2l = DocToLoRA.from_pretrained(base=base)
    doc = "My name is Oskar Lindqvist. My favourite fruit is the quince. I keep three ferrets called Pim, Pam and Pom."
    examples = teacher_examples(d2l, doc, ["What is my favourite fruit?", "What are my ferrets called?"])
    batch = student_batch(base, examples)
    lora = context_distill(d2l, doc, steps=6, lr=3e-3, queries=[e["question"] for e in examples])
    assert lora.rank == d2l.config.rank and set(lora.modules) == set(d2l.config.module_names())
    assert lora.hypernet == "" and lora.base_model == base.model_id
    factors = {name: lora.weights[name] for name in lora.modules}
    with torch.no_grad():
        before = per_example_loss(base, batch, {}, 1.0).mean().item()
        after = per_example_loss(base, batch, factors, lora.scale).mean().item()
    assert after < before - 0.1
    with pytest.raises(ValueError):
        context_distill(d2l, "   ", steps=1)


def test_training_draws_no_held_out_phrasing_attribute_value_or_persona_line(base):
    count = lambda text: len(base.tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    mix = {"conversation": 0.5, "note": 0.2, "tool": 0.15, "needles": 0.15}
    train_set = build_mix(400, 11, mix, split="train", count_tokens=count)
    assert conversations.leaks(train_set) == []
    # The check can fail: the evaluation's draws hold exactly what training must not.
    eval_set = build_mix(100, 11, mix, split="eval", count_tokens=count)
    problems = " ".join(conversations.leaks(eval_set))
    assert "held-out phrasing" in problems and "eval-only value" in problems and "MSC test line" in problems
    new = [conversations.conversation_sample(random.Random(i), "eval", count, held_out_attributes=True)
           for i in range(20)]
    assert any(t.split(".")[0] in conversations.HELD_OUT_ATTRIBUTES for s in new for t in s.templates)


def test_open_attributes_reach_training_data_only():
    train = [conversations.dialogue(random.Random(i)) for i in range(40)]
    told = [t for d in train for t in d.templates if ".ask." in t]
    assert sum(t.startswith("open:") for t in told) >= 10  # about half of the asked facts
    # Every evaluation draw keeps the hand-written attributes: the in-template group (training phrasings,
    # eval values), held-out phrasings, held-out attributes, and the composed notes' profiles.
    evals = [conversations.dialogue(random.Random(i), split, held_out, values="eval")
             for i in range(40) for split, held_out in (("train", False), ("eval", False), ("eval", True))]
    assert not any(t.startswith("open:") for d in evals for t in d.templates)
    _, facts = conversations._profile(random.Random(0), "eval", 8, held_out_attributes=False)
    assert not any(f.attribute.key.startswith("open:") for f in facts)
    held_out_words = {*conversations.HELD_OUT_ATTRIBUTES, "registration"}
    assert not any(w in a.key for a in conversations.OPEN_ATTRIBUTES for w in held_out_words)


def test_values_come_from_open_pools_split_by_hash():
    rng = random.Random(0)
    for kind in ("name", "city", "job", "company", "food", "code", "phrase"):
        values = {conversations.draw_value(kind, rng, "train") for _ in range(300)}
        assert len(values) > 100, kind  # not a short list to pick from
        assert not any(conversations.is_eval_value(v) for v in values)
        assert all(conversations.is_eval_value(conversations.draw_value(kind, rng, "eval")) for _ in range(20))


def test_a_seed_draws_the_same_data_in_every_process():
    # String hashing differs per process; a set's order leaking into a draw (Faker's it_IT cities did) would
    # make training data and the evaluation's users change from run to run.
    script = ("import hashlib, json; from d2l_memory.training.prepare import DEFAULT_MIX, draw; "
              "s = draw(300, 4, DEFAULT_MIX, 'train', None, (150, 3000)) + draw(60, 1, DEFAULT_MIX, 'eval', None, "
              "(150, 3000)); print(hashlib.sha1(json.dumps([[x.context, x.question, x.answer, x.memories] "
              "for x in s]).encode()).hexdigest())")
    digests = {subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": seed}).stdout.strip() for seed in ("1", "2")}
    assert len(digests) == 1


def test_conversation_memories_are_the_segments_absorb_messages_writes(base):
    count = lambda text: len(base.tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    for seed in range(30):
        d = conversations.dialogue(random.Random(seed))
        expected = [seg for turns in d.sessions
                    for seg in segment_turns(transcript_turns(turns, d.roles), count, d.segment_tokens)]
        sample = conversations.conversation_sample(random.Random(seed), count_tokens=count)
        assert set(sample.memories) <= set(expected) and sample.context
        assert sample.answer in sample.context and sample.answer in sample.response
        assert all(m in sample.memories for m in sample.context.split("\n\n"))
        if d.roles == ("user",):
            assert all(line.startswith("User: ") for m in expected for line in m.splitlines())


def test_control_questions_borrow_a_whole_memory_even_from_conversation_examples():
    # A conversation example keeps its memories, not a context: a control question that borrowed its
    # empty context crashed a run at step 466.
    conversation = {"control": False, "context": "", "memories": ["User: I keep bees.", "User: Hi."]}
    note = {"control": False, "context": "Ada keeps bees.", "memories": None}
    control = {"control": True, "context": ""}
    rows = memories_for([control] * 20 + [conversation, note], random.Random(0), [conversation, note])
    assert all(rows) and all(text.strip() for row in rows for text in row)
    assert rows[-2:] == [conversation["memories"], [note["context"]]]


def test_recitals_ask_for_verbatim_pieces_of_real_text_and_the_teacher_says_most_of_them(base, tmp_path):
    count = lambda text: len(base.tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    samples = build_mix(300, 5, {"recital": 1.0}, count_tokens=count)
    kinds = {s.source for s in samples}
    assert {f"{way}:{kind}" for way in ("recite", "continue") for kind in ("dialogue", "passage")} <= kinds
    assert "recite:persona" in kinds and "continue:essay" in kinds
    for s in samples:
        assert s.answer in s.context and s.answer not in s.question and s.response is None
        if s.source.startswith("recite"):
            assert s.answer == s.context and count(s.context) <= recital.RECITE_TOKENS
        else:
            assert count(s.answer) <= recital.NEXT_TOKENS and s.answer != s.context
    # Real MSC turns and personas of the training file only; nothing the evaluation holds out.
    assert conversations.leaks(samples) == []
    test_personas = {p for line in (shared_data() / "msc_multi_session_chat" / "msc_dialogue_session_3_test.jsonl")
                     .read_text().splitlines() for p in json.loads(line)["personas"][0]}
    trained_personas = {p for personas, _ in recital.msc_episodes() for p in personas}
    unseen = {p for p in test_personas - trained_personas if len(p) > 40}  # short ones ("I have a dog.") recur
    assert trained_personas and unseen and not any(p in s.context for s in samples for p in unseen)
    # The teacher, with the memory in context, would say the piece back (gold mode keeps what it would say).
    counts = build_shard(base, samples[:12], tmp_path / "recital")
    assert counts["kept"] >= 8, counts


def test_hybrid_samples_show_the_student_the_snippet_hybrid_mode_shows(base):
    # `hybrid` mode puts the best memory in the prompt and composes the adapters too; trained only without
    # the text, the adapter made the model say the memory line back there instead of answering.
    from d2l_memory.training.objective import student_batch

    count = lambda text: len(base.tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    samples = build_mix(60, 4, {"conversation": 1.0, "hybrid": 1.0}, count_tokens=count)
    hybrid = [s for s in samples if s.source.startswith("hybrid:")]
    plain = [s for s in samples if not s.source.startswith("hybrid:")]
    assert hybrid and plain and all(s.student_context is None for s in plain)
    for s in hybrid:
        assert s.student_context in s.memories and s.student_context in s.context and s.answer in s.student_context
    assert conversations.leaks(samples) == []
    assert not any(s.source.startswith("hybrid:") for s in draw(40, 4, DEFAULT_MIX, "eval", count))
    example = {**hybrid[0].model_dump(), "response": torch.tensor([1, 2]), "topk_ids": torch.zeros(2, 4),
               "topk_logprobs": torch.zeros(2, 4)}
    batch = student_batch(base, [example, {**example, "student_context": None}])
    with_text, alone = (base.tokenizer.decode(row[mask.bool()]) for row, mask in
                        zip(batch.input_ids, batch.attention_mask, strict=True))
    snippet = hybrid[0].student_context.splitlines()[-1]
    assert snippet in with_text and snippet not in alone and hybrid[0].question in alone


def test_control_prompts_are_many_and_never_what_interference_asks():
    # 22 training controls held interference at 0.94 of base for one run and let it fall to 0.71 in the
    # next: the student learnt to leave those few questions alone, not unrelated questions in general.
    trained, asked = control_prompts("train"), control_prompts("eval")
    assert len(set(trained)) > 1000 and all(q == q.strip() and q for q in trained)
    assert not set(trained) & set(asked)
    assert asked == [q for q, _ in control_questions("eval")]
    # Nor the held-out questions whose answers interference compares with and without an adapter.
    compared = held_out_questions()
    assert len(compared) >= 100 and not set(trained) & set(compared)


def test_training_composes_memories_exactly_as_serving_does(base):
    d2l = DocToLoRA.untrained(HypernetConfig(**TINY), base)
    with torch.no_grad():  # an untrained network emits exact zeros; give it something to compose
        for p in d2l.hypernet.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    memories = ["User: I live in Joroinen.\nAssistant: Noted.", "User: My dog is called Valero.",
                "User: I drive a Skoda Octavia. " * 30]
    d2l.hypernet.eval()
    with torch.no_grad():
        factors, _, _ = batch_factors(d2l, [memories, memories[:1]], [1, 1], composition="mean")
        served = LoRA.concat([d2l.internalize(m) for m in memories], member_weights("mean", [0.0] * 3))
        alone = d2l.internalize(memories[0])
    for name, (a, b) in factors.items():
        trained = d2l.config.scale * (b[0].double() @ a[0].double())
        assert torch.allclose(trained, served.delta(name), atol=1e-5)
        assert torch.allclose(d2l.config.scale * (b[1].double() @ a[1].double()), alone.delta(name), atol=1e-5)


def test_training_weighs_memories_by_relevance_exactly_as_serving_does(tmp_path):
    # The shipped hypernetwork through both paths: a user's memories recalled and composed by
    # `D2LMemory.prepare` (gate off, so all three are recalled) against `batch_factors` for the same texts.
    from d2l_memory import D2LMemory

    memories = ["User: I moved to Joroinen last spring.\nAssistant: How do you like it?",
                "User: My dog is called Valero.", "User: I drive a Skoda Octavia to work."]
    question = "Where do I live now?"
    with D2LMemory(tmp_path / "store", relevance_threshold=-1.0, personal_relevance_threshold=-1.0) as mem:
        for text in memories:
            mem.absorb(text, "u", kind="chat")
        _, served = mem.prepare(question, "u", mode="adapter")
        d2l = mem.d2l
        with torch.no_grad():
            factors, _, _ = batch_factors(d2l, [memories], [1], composition="relevance", questions=[question])
    weights = sorted(w for _, w in served.recipe.members)
    assert len(weights) == 3 and weights[-1] > 0.5  # the memory about where the user lives leads
    for name, (a, b) in factors.items():
        trained = d2l.config.scale * (b[0].double() @ a[0].double())
        assert torch.allclose(trained, served.lora.delta(name), atol=1e-4)
    with pytest.raises(ValueError, match="give one"):
        batch_factors(d2l, [memories], [1], composition="relevance")


def test_overrides_reach_nested_sections_and_unknown_keys_are_refused(tmp_path):
    from d2l_memory.training.train import load_config

    config = load_config(tmp_path / "train.json", ["hypernet.rank=16", "lr=0.001", "out=runs/x"])
    assert config.hypernet.rank == 16 and config.lr == 0.001 and str(config.out) == "runs/x"
    for bad in (["lrr=0.1"], ["hypernet.rnak=16"], ["lr"]):
        with pytest.raises(ValueError):
            load_config(tmp_path / "train.json", bad)


def test_conversation_eval_scores_every_mode_through_the_public_api():
    # One held-out user through the shipped checkpoint: accuracy and the echo share of each mode, as rates.
    from d2l_memory.training.evaluate import MODES, conversation_eval

    items: dict[str, list[float]] = {}
    report = conversation_eval(None, 1, groups=("held_out",), items=items)
    assert set(report) == {f"{key}_{mode}" for key in ("held_out", "echo") for mode in MODES}
    assert all(0.0 <= v <= 1.0 for v in report.values())
    assert report["held_out_none"] == 0.0 == report["echo_none"]  # nothing told reaches the base model alone
    assert items == {f"conversations.{k}": [v] for k, v in report.items()}  # one user: one score per rate


def test_composed_eval_weighs_by_relevance_and_one_memory_is_weighted_alike():
    from d2l_memory.training.evaluate import composed_eval

    d2l = DocToLoRA.from_pretrained(None)
    runs = {c: {} for c in ("mean", "relevance")}
    reports = {c: composed_eval(d2l, 2, ks=(1, 2), composition=c, items=runs[c]) for c in runs}
    assert set(reports["mean"]) == set(reports["relevance"]) == {"adapter_k1", "icl_k1", "adapter_k2", "icl_k2", "none"}
    for key in ("composed.adapter_k1", "composed.icl_k2", "composed.none"):  # only the weights of k > 1 differ
        assert runs["mean"][key] == runs["relevance"][key]
    with pytest.raises(ValueError, match="unknown composition"):
        composed_eval(d2l, 1, ks=(2,), composition="max")


def test_compare_pairs_the_same_questions_and_refuses_other_draws(tmp_path):
    from d2l_memory.training.compare import compare, load_items

    base = {"facts.adapter": [1, 1, 0, 0], "interference.adapter": [1, 0, 1, 0],
            **{f"conversations.{g}_adapter": [0, 0] for g in ("in_template", "held_out", "new_attributes")}}
    cand = {"facts.adapter": [1, 1, 1, 1], "interference.adapter": [0, 1, 0, 1],
            **{f"conversations.{g}_adapter": [1, 1] for g in ("in_template", "held_out", "new_attributes")}}
    rows = {r.key: r for r in compare(base, cand)}
    facts, swapped, pooled = rows["facts.adapter"], rows["interference.adapter"], rows["conversations.adapter"]
    assert (facts.diff, facts.n) == (0.5, 4) and facts.se == pytest.approx((1 / 3) ** 0.5 / 2)
    assert facts.verdict(2.0) == "~" and facts.verdict(1.0) == "better"
    assert swapped.diff == 0 and swapped.verdict(2.0) == "~"  # same rate, different questions: no change
    assert pooled.n == 6 and pooled.se == 0 and pooled.verdict(2.0) == "better"  # every question gained
    echo = compare({"conversations.echo_hybrid": [0, 0]}, {"conversations.echo_hybrid": [1, 1]})[0]
    assert echo.verdict(2.0) == "worse"  # saying the memory back more often is not progress
    with pytest.raises(ValueError, match="same --n"):
        compare(base, {"facts.adapter": [1, 1]})
    (tmp_path / "old.json").write_text(json.dumps({"facts": {"adapter": 0.5}}))
    with pytest.raises(ValueError, match="no per-question scores"):
        load_items(tmp_path / "old.json")


def test_compare_pairs_benchmark_records_and_refuses_other_questions(tmp_path):
    from d2l_memory.training.compare import load_items

    def run(name: str, scores: list[float], questions: list[str], composition: str = "relevance") -> Path:
        records = [{"conversation": "conv-26", "category": 5 if q.startswith("adv") else 1, "question": q,
                    "system": system, "score": s} for system in ("adapter", "rag")
                   for q, s in zip(questions, scores, strict=True)]
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"benchmark": "locomo", "composition": composition, "records": records}))
        return path

    base, base_q, weighting = load_items(run("base", [0.5, 0.0, 1.0], ["q1", "q2", "adv1"]))
    assert weighting == "relevance"
    assert base == {"locomo.adapter": [0.5, 0.0], "locomo.rag": [0.5, 0.0],
                    "locomo.adapter.adversarial": [1.0], "locomo.rag.adversarial": [1.0]}
    assert base_q == ["conv-26|q1", "conv-26|q2", "conv-26|adv1"]  # each question once, not once per system
    other = run("other", [0.5, 0.0, 1.0], ["q1", "q3", "adv1"])
    done = subprocess.run([sys.executable, "-m", "d2l_memory.training.compare", str(tmp_path / "base.json"),
                           str(other)], capture_output=True, text=True)
    assert done.returncode == 2 and "different questions" in done.stderr
    mean = run("mean", [0.5, 0.0, 1.0], ["q1", "q2", "adv1"], composition="mean")
    done = subprocess.run([sys.executable, "-m", "d2l_memory.training.compare", str(tmp_path / "base.json"),
                           str(mean)], capture_output=True, text=True)
    assert done.returncode == 2 and "compose memories differently" in done.stderr
    (tmp_path / "needle.json").write_text(json.dumps({"benchmark": "needle", "records": []}))
    with pytest.raises(ValueError, match="no per-question pairing"):
        load_items(tmp_path / "needle.json")


def test_long_needles_span_many_chunks_and_bad_bounds_are_refused(base, tmp_path):
    count = lambda text: len(base.tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    needles = draw(6, 5, {"needles": 1.0}, "train", count, needle_chars=(8000, 9000))
    assert all(count(s.context) > 3 * HypernetConfig().chunk_tokens for s in needles)  # several chunks each
    assert all(s.answer in s.context for s in needles)
    out = tmp_path / "data"
    done = subprocess.run([sys.executable, "-m", "d2l_memory.training.prepare", "--out", str(out),
                           "--needle-chars", "9000", "150"], capture_output=True, text=True)
    assert done.returncode == 2 and "MIN <= MAX" in done.stderr and not out.exists()


def test_value_weight_weighs_the_told_value_in_the_reply(base):
    # The told value is one or two tokens of a reply whose form makes up the rest of the loss.
    from d2l_memory.training.objective import (
        per_example_loss,
        response_logprobs,
        response_loss,
        student_batch,
        value_positions,
        value_scores,
    )

    tok = base.tokenizer
    response = tok("Your partner is Vítězslav, as you told me.", add_special_tokens=False)["input_ids"]
    spelled = value_positions(tok, response, "Vítězslav")
    assert spelled and tok.decode([response[i] for i in spelled]).strip() == "Vítězslav"
    assert value_positions(tok, response, "your PARTNER") == value_positions(tok, response, "Your partner")
    assert value_positions(tok, response, "Oslo") == []
    k = 4
    example = {"question": "Who is my partner?", "answer": "Vítězslav", "control": False,
               "response": torch.tensor(response), "topk_ids": torch.tensor(response)[:, None] + torch.arange(k),
               "topk_logprobs": torch.full((len(response), k), -math.log(k))}
    plain, weighted = student_batch(base, [example]), student_batch(base, [example], value_weight=3.0)
    assert plain.weights.tolist() == [1.0] * len(response)
    assert weighted.weights.tolist() == [3.0 if i in spelled else 1.0 for i in range(len(response))]
    assert student_batch(base, [{**example, "control": True}], value_weight=3.0).weights.tolist() == [1.0] * len(
        response)  # a control question has no told value
    with torch.no_grad():
        flat, focused = (per_example_loss(base, b, {}, 1.0).item() for b in (plain, weighted))
        logprobs = response_logprobs(base, plain, {}, 1.0)
    assert flat != focused
    assert response_loss(plain, logprobs).item() == pytest.approx(flat)
    # The told value's tokens alone: their mean negative log-likelihood, none for a control question.
    spelled_nll = -logprobs[spelled, torch.tensor(response)[spelled]].mean().item()
    scores = value_scores(plain, logprobs)
    assert scores["value_nll"] == pytest.approx(spelled_nll) and spelled_nll > 0
    assert scores["value_first_top1"] == float(logprobs[spelled[0]].argmax() == response[spelled[0]])
    assert value_scores(student_batch(base, [{**example, "control": True}]), logprobs) == {}
    # Scored by cross-entropy on the reference there, the told value's tokens no longer follow the teacher.
    mixed = response_loss(plain, logprobs, value_ce=True).item()
    teacher = -(plain.topk_logprobs.exp() * logprobs.gather(-1, plain.topk_ids)).sum(-1)
    gold = -logprobs.gather(-1, plain.targets[:, None]).squeeze(-1)
    assert mixed == pytest.approx(torch.where(plain.values, gold, teacher).mean().item()) and mixed != flat
