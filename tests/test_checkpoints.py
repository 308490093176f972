"""Training checkpoints survive a kill at any point of their swap: the next run resumes from the newest whole
checkpoint (never from step 0), and leftovers of a killed swap never make a later save fail."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_run import TinyRun

from d2l_memory.training.train import STATE_FILE, load_checkpoint, save_checkpoint

REPO = Path(__file__).resolve().parents[1]

KILLED_SAVE = '''
import os, shutil, signal, sys
from pathlib import Path
from d2l_memory.training import train
from tiny_run import TinyRun

directory, kill_at = Path(sys.argv[1]), int(sys.argv[2])
tiny = TinyRun().at_step(1)
train.save_checkpoint(directory, tiny, tiny.opt, tiny.sched, {"step": 1})
tiny.at_step(2)
calls = 0


def dying(real):
    """`real`, except that its call number `kill_at` (counted over every file operation here) is a kill -9."""
    def call(*args, **kwargs):
        global calls
        calls += 1
        if calls == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    return call


os.replace, os.rename, shutil.rmtree, Path.rename = (dying(f) for f in (os.replace, os.rename, shutil.rmtree,
                                                                        Path.rename))
train.save_checkpoint(directory, tiny, tiny.opt, tiny.sched, {"step": 2})
print("calls", calls)
'''


def _saved_step(directory: Path) -> int:
    tiny = TinyRun()
    step = load_checkpoint(directory, tiny, tiny.opt, tiny.sched)["step"]
    assert {float(v) for v in tiny.hypernet.state_dict()["weight"].flatten()} == {float(step)}
    return step


def _killed_at(directory: Path, kill_at: int) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    return subprocess.run([sys.executable, "-c", KILLED_SAVE, str(directory), str(kill_at)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # a Python process per kill point
def test_a_kill_at_any_point_of_the_swap_resumes_from_a_whole_checkpoint(tmp_path) -> None:
    survived = _killed_at(tmp_path / "count" / "last", 10**6)
    assert survived.returncode == 0, survived.stderr[-2000:]
    n_calls = int(survived.stdout.split()[-1])
    assert n_calls >= 2  # at least the two moves of a swap
    steps = []
    for kill_at in range(1, n_calls + 1):
        last = tmp_path / str(kill_at) / "last"
        child = _killed_at(last, kill_at)
        assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
        # what the next run checks before it resumes (train.train); without it, it would start from step 0
        assert (last / STATE_FILE).is_file(), f"a kill at file operation {kill_at} leaves no checkpoint to resume"
        steps.append(_saved_step(last))
        tiny = TinyRun().at_step(3)
        save_checkpoint(last, tiny, tiny.opt, tiny.sched, {"step": 3})  # and the run saves on
        assert _saved_step(last) == 3 and sorted(p.name for p in last.parent.iterdir()) == ["last"]
    assert steps == sorted(steps) and set(steps) == {1, 2}  # the old checkpoint until the new one is whole


def test_leftovers_of_an_older_swap_never_make_a_save_fail(tmp_path) -> None:
    tiny = TinyRun().at_step(1)
    last, old = tmp_path / "last", tmp_path / "last.old"
    save_checkpoint(last, tiny, tiny.opt, tiny.sched, {"step": 1})
    old.mkdir()
    (old / "hypernet.safetensors").write_bytes(b"half deleted")  # a kill while the old copy was being removed
    tiny.at_step(2)
    save_checkpoint(last, tiny, tiny.opt, tiny.sched, {"step": 2})
    assert _saved_step(last) == 2 and not old.exists()
    # A kill between an older release's two renames left the checkpoint in last.old and no `last`: this run
    # started afresh, and its first save refuses to destroy that checkpoint, saying how to resume it.
    last.rename(old)
    with pytest.raises(RuntimeError, match=r"rename \S*last\.old to \S*last "):
        save_checkpoint(last, tiny, tiny.opt, tiny.sched, {"step": 1})
    assert _saved_step(old) == 2


def test_a_corrupted_checkpoint_is_refused(tmp_path) -> None:
    tiny = TinyRun().at_step(1)
    save_checkpoint(tmp_path / "last", tiny, tiny.opt, tiny.sched, {"step": 1})
    weights = tmp_path / "last" / "optimizer.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + bytes(b ^ 0xFF for b in weights.read_bytes()[-8:]))
    with pytest.raises(ValueError, match=r"optimizer\.safetensors does not match"):
        load_checkpoint(tmp_path / "last", tiny, tiny.opt, tiny.sched)
