"""The GPU burst (`training/burst.py`): the whole sequence on this CPU through a stand-in for the `run` tool
that enforces its limits, the stand-in itself, and the checksummed return of a checkpoint in pieces."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from d2l_memory.d2l import DocToLoRA, shipped_checkpoint
from d2l_memory.home import sha256_file
from d2l_memory.hypernet import HypernetConfig
from d2l_memory.training import burst
from d2l_memory.training.burst import (
    CALL_BYTES,
    COMMAND_CHARS,
    DRY_RUN_TRAIN,
    FakeRun,
    LimitError,
    MiB,
    Plan,
    collect,
    dry_run,
    dry_run_config,
    export,
)

TINY = {"layers": [8, 9], "latent_dim": 32, "n_latents": 4, "n_blocks": 1, "n_heads": 2}


@pytest.fixture
def repo_scratch():
    """A folder under the repository's ignored runs/ (carried paths are relative to the repository)."""
    runs = burst.REPO / "runs"
    runs.mkdir(exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=".burst-test-", dir=runs))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.slow
def test_dry_run_ships_the_model_in_parts_trains_and_brings_back_a_verified_checkpoint(base, tmp_path, repo_scratch):
    # A starting hypernetwork outside the working tree travels in the bundle.
    start = DocToLoRA.untrained(HypernetConfig.for_model(base, **TINY), base, seed=3)
    start.save(tmp_path / "start", dtype=torch.float32)
    config = dry_run_config().model_copy(update={"fresh": False, "init_from": tmp_path / "start",
                                                 "overrides": list(DRY_RUN_TRAIN)})
    result = dry_run(repo_scratch, config)

    plan = Plan.model_validate_json((repo_scratch / "plan.json").read_text())
    assert len(plan.parts) > 1  # the bf16 base model (~260 MB) cannot travel in one call
    assert all(plan.tree_bytes + part.bytes <= CALL_BYTES for part in plan.parts)
    assert all(len(step.command) <= COMMAND_CHARS for step in plan.steps)
    records = [json.loads(line) for line in (result / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 4 and "usage_gap" in records[-1]
    state = json.loads((result / "last" / "train_state.json").read_text())
    assert state["step"] == 4  # a whole checkpoint: training resumes from it exactly
    trained = DocToLoRA.from_pretrained(result / "last", base=base)
    assert trained.config == start.config
    assert trained.checksum != start.checksum  # it trained from the bundled start
    report = json.loads((result / "burst.json").read_text())
    assert report["total_steps"] == 4 and report["examples"] > 0


def test_fake_run_enforces_the_tools_limits(tmp_path, repo_scratch):
    fake = FakeRun(burst.REPO, tmp_path / "fake")
    rc, output, files = fake('echo hi; printf x > "$OUT/a.txt"; test -f pyproject.toml', timeout_s=30)
    assert rc == 0 and "hi" in output and (files / "a.txt").read_text() == "x"  # runs in a copy of the tree
    rc, output, _ = fake("python3 -c 'import faker'", timeout_s=60)
    assert rc != 0 and "not on the GPU machine" in output
    assert fake("sleep 5", timeout_s=1)[0] == 124
    with pytest.raises(LimitError, match="characters"):
        fake("echo " + "x" * COMMAND_CHARS)
    with pytest.raises(LimitError, match="9 files"):
        fake('for i in $(seq 9); do touch "$OUT/f$i"; done')
    with pytest.raises(LimitError, match="out of bounds"):
        fake('head -c 17M /dev/zero > "$OUT/big"')
    with pytest.raises(LimitError, match="out of bounds"):
        fake('mkdir -p "$OUT/a/b/c" && touch "$OUT/a/b/c/deep"')
    big = repo_scratch / "big"  # sparse: counts at its full size, costs nothing
    with open(big, "wb") as fh:
        fh.truncate(CALL_BYTES)
    with pytest.raises(LimitError, match="MiB"):
        fake("true", carry=[big.relative_to(burst.REPO).as_posix()])


def _fake_checkpoint(run: Path) -> None:
    (run / "last").mkdir(parents=True)
    (run / "last" / "config.json").write_text("{}")
    (run / "last" / "hypernet.safetensors").write_bytes(os.urandom(20 * MiB))
    (run / "last" / "optimizer.safetensors").write_bytes(os.urandom(45 * MiB))
    files = {n: sha256_file(run / "last" / n) for n in ("config.json", "hypernet.safetensors", "optimizer.safetensors")}
    (run / "last" / "train_state.json").write_text(json.dumps({"step": 7, "files": files}))
    (run / "train.json").write_text("{}")
    (run / "metrics.jsonl").write_text('{"step": 7}\n')


def test_a_checkpoint_comes_back_in_verified_pieces_within_the_limits(tmp_path):
    machine = tmp_path / "machine"
    _fake_checkpoint(machine / "run")
    returns = []
    for call in range(3):
        returns.append(tmp_path / f"return-{call}")
        export(machine, call, returns[-1])
        files = list(returns[-1].iterdir())
        assert len(files) <= 8 and all(f.stat().st_size <= 16 * MiB for f in files)
        assert sum(f.stat().st_size for f in files) <= 64 * MiB
    manifest = json.loads((returns[0] / burst.PIECES).read_text())
    assert len(manifest["calls"]) == 2  # 20 MiB of weights + 45 MiB of optimizer: two returns
    local = tmp_path / "local"
    local.mkdir()

    weights_only = collect(local, returns[:1])  # the weights come first: usable before the optimizer arrives
    assert (weights_only / "last" / "hypernet.safetensors").read_bytes() == \
        (machine / "run" / "last" / "hypernet.safetensors").read_bytes()
    assert not (weights_only / "last" / "train_state.json").exists()  # not a resumable checkpoint yet

    whole = collect(local, returns)
    for name in ("hypernet.safetensors", "optimizer.safetensors", "train_state.json", "config.json"):
        assert sha256_file(whole / "last" / name) == sha256_file(machine / "run" / "last" / name)
    assert (whole / "metrics.jsonl").read_text() == '{"step": 7}\n'

    piece = next(p for p in returns[1].iterdir() if p.name.startswith("optimizer"))
    piece.write_bytes(b"\0" + piece.read_bytes()[1:])
    with pytest.raises(ValueError, match="sha256"):
        collect(local, returns)


def test_the_default_plan_fits_the_window():
    # The shipped hypernetwork (17.7 M parameters): weights in the training call, the optimizer in three more.
    shipped = json.loads((shipped_checkpoint("smollm2-135m-instruct") / "config.json").read_text())
    calls = burst._estimate_calls({"hypernet": shipped})
    assert calls == 4
    parts = [burst.Part(name=f"part-{i:03d}", bytes=30 * MiB, sha256="0" * 64) for i in range(12)]
    plan = Plan(config=burst.BurstConfig(), bundle_sha256="0" * 64, parts=parts, tree_bytes=29 * MiB, steps=[])
    steps = burst._steps(plan, "runs/burst", calls)
    assert len(steps) == 12 + 1 + 3 and all(len(s.command) <= COMMAND_CHARS for s in steps)
    assert all(s.timeout_s <= burst.CALL_SECONDS for s in steps)
    assert 'assert torch.cuda.is_available(), "no GPU"' in steps[0].command
