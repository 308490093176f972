"""A GPU burst: a short window on one GPU, reached one bash command at a time, turned into meta-training.

The window (../shared/NOTES.md, "When a GPU is available"): one H200 for about 15 minutes through a `run`
tool that executes one bash command of at most 2,000 characters in a copy of this working tree, carrying at
most 64 MiB per call (the tree included), with nothing downloadable there (its Python has torch,
transformers, safetensors and tqdm but not pydantic, faker or ../shared/data); at most 8 files of 16 MiB
(64 MiB together) come back from `$OUT`, and what a call wrote survives only while the next call follows
within about 30 s.

    python -m d2l_memory.training.burst prepare --out runs/burst     # here: bundle, parts, the commands
    # each printed command in order through `run` (carry as printed), one right after the other
    python -m d2l_memory.training.burst collect --out runs/burst DIR...   # DIR: each call's files_at
    python -m d2l_memory.training.burst dry-run --out runs/burst-dry  # the same sequence on this CPU

`prepare` writes into `--out` one tar holding the base model in bf16 (with the manifest `models.py` checks),
the training config, the training and held-out samples as text (drawn here, where their generators and data
are), the hypernetwork to start from when it is not in the working tree, and pydantic's wheels for the GPU's
Python; the tar is split into parts that fit a call beside the working tree, each with its sha256. The copy
commands put each part into a fixed folder there (`$D2L_BURST_DIR`, default /tmp/d2l-burst) and verify it;
the training command joins and verifies the bundle, computes the teacher targets there (`build_shard`, in
parallel workers), times a few steps, sizes the cosine schedule to the time left, trains with a hard
deadline (run again, it resumes exactly from `last/`), and writes the checkpoint's first pieces to `$OUT`;
the fetch commands bring the rest (the optimizer state, for an exact resume here). `collect` checks each
piece and file against the sha256s recorded there and rebuilds the run directory.

Only this module's `gpu`, `teacher` and `export` commands run on the GPU machine; they import the training
loop, the teacher and the models, never faker, lancedb or the data generators (the dry run proves it).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from d2l_memory.home import sha256_file
from d2l_memory.models import DEFAULT_MODEL, MANIFEST, REGISTRY, LoadedModel, cache_slug, home, load_model

MiB = 1 << 20
CALL_BYTES = 64 * MiB  # what travels with one call: the working tree and the carried paths
COMMAND_CHARS, CARRY_PATHS, CALL_SECONDS = 2000, 8, 600
RETURN_FILES, RETURN_FILE_BYTES, RETURN_BYTES = 8, 16 * MiB, 64 * MiB  # what comes back from $OUT
PIECE_BYTES = 15 * MiB  # four pieces and the manifest fit one return
TREE_MARGIN = 4 * MiB  # the working tree may grow a little between `prepare` and the burst
REPO = Path(__file__).resolve().parents[2]
GPU_DIR = "${D2L_BURST_DIR:-/tmp/d2l-burst}"
PIECES = "pieces.json"
WHEELS = ("pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions")
THERE = ("torch", "transformers", "safetensors", "tqdm")  # what the GPU side needs of the image
# Throughput settings for a GPU, and `mean` composition (the GPU image has neither LanceDB nor MiniLM to score
# memories by relevance); `--set` overrides them. Other hyperparameters stay TrainConfig's.
GPU_DEFAULTS = ("batch_size=32", "pass_tokens=65536", "eval_every=100", "eval_examples=48", "checkpoint_minutes=3",
                "threads=4", "composition=mean")


class BurstConfig(BaseModel):
    """What `prepare` was asked for (saved as `burst.json` beside the parts and inside the bundle)."""

    model_config = ConfigDict(extra="forbid")

    base_model: str = DEFAULT_MODEL
    device: str = Field("cuda", description="where the GPU side runs ('cpu' in the dry run)")
    samples: int = Field(40000, ge=1, description="training samples drawn here; the GPU computes their teacher")
    eval_samples: int = Field(200, ge=1, description="held-out samples (held-out phrasings, attributes, values)")
    shard_size: int = Field(400, ge=1)
    mix: dict[str, float] | None = Field(None, description="source proportions of the training samples "
                                         "(default: prepare.DEFAULT_MIX)")
    control_frac: float = 0.2
    seed: int = 100
    init_from: Path | None = Field(None, description="hypernetwork to continue (default: the one shipped for "
                                   "the base model, if any)")
    fresh: bool = Field(False, description="start a new hypernetwork shaped for the base model (for_model)")
    init_sha256: str | None = Field(None, description="set by prepare: the starting weights' sha256, checked there "
                                    "(the working tree's checkpoint may change before the burst)")
    overrides: list[str] = Field(default_factory=list, description="TrainConfig key=value, as train --set")
    minutes: float = Field(7.0, gt=0, description="the training command's whole budget on the GPU")
    data_share: float = Field(0.25, gt=0, lt=1, description="of `minutes` at most for starting teacher shards")
    reserve_s: float = Field(40.0, ge=0, description="kept for the final evaluation, checkpoint and export")
    workers: int = Field(8, ge=1, description="teacher processes sharing the GPU (each one is launch-bound)")
    calibrate_steps: int = Field(20, ge=1, description="steps timed before the schedule is sized")
    max_steps: int | None = Field(None, ge=1, description="cap on the sized schedule (the dry run's tiny run)")
    wheels: bool = Field(True, description="bring pydantic's wheels (the GPU image has no pydantic)")
    gpu_python: str = "3.12"


class Part(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    bytes: int
    sha256: str


class Step(BaseModel):
    """One call of the `run` tool."""

    model_config = ConfigDict(extra="forbid")

    title: str
    command: str
    carry: list[str] = Field(default_factory=list)
    timeout_s: int
    optional: bool = False


class Plan(BaseModel):
    """`plan.json`: the bundle's parts and the calls that ship it, train, and bring the checkpoint back."""

    model_config = ConfigDict(extra="forbid")

    config: BurstConfig
    bundle_sha256: str
    parts: list[Part]
    tree_bytes: int
    steps: list[Step]

    @property
    def run_id(self) -> str:
        """The GPU-side folder of this bundle: a new bundle never resumes an older bundle's run."""
        return self.bundle_sha256[:12]


# -- sizes and pieces (both sides) ------------------------------------------------------------------------
def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def split(path: Path, dest: Path, piece_bytes: int, prefix: str | None = None) -> list[Part]:
    """Cut `path` into `dest/<prefix>000, 001, ...` (prefix: `<name>.`) of at most `piece_bytes` each (one
    piece for an empty file)."""
    pieces: list[Part] = []
    with open(path, "rb") as fh:
        while True:
            data = fh.read(piece_bytes)
            if pieces and not data:
                break
            name = f"{prefix or path.name + '.'}{len(pieces):03d}"
            (dest / name).write_bytes(data)
            pieces.append(Part(name=name, bytes=len(data), sha256=_sha256_bytes(data)))
            if len(data) < piece_bytes:
                break
    return pieces


def pack_calls(pieces: Sequence[Part], manifest_bytes: int = MiB) -> list[list[str]]:
    """Group pieces, in order, into returns that respect the limits: a manifest plus at most
    `RETURN_FILES - 1` pieces, `RETURN_BYTES` together."""
    calls: list[list[str]] = [[]]
    used = manifest_bytes
    for piece in pieces:
        if piece.bytes > RETURN_FILE_BYTES:
            raise ValueError(f"{piece.name} is {piece.bytes} bytes, over the {RETURN_FILE_BYTES} of a returned file")
        if calls[-1] and (len(calls[-1]) + 1 >= RETURN_FILES or used + piece.bytes > RETURN_BYTES):
            calls.append([])
            used = manifest_bytes
        calls[-1].append(piece.name)
        used += piece.bytes
    return calls


def tree_files(repo: Path) -> list[Path]:
    """What travels with every call: tracked and untracked-but-not-ignored files, and `shared/` if the
    checkout holds one."""
    listed = subprocess.run(["git", "-C", str(repo), "ls-files", "-co", "--exclude-standard", "-z"],
                            check=True, capture_output=True).stdout.decode().split("\0")
    files = [repo / name for name in listed if name and (repo / name).is_file()]
    shared = repo / "shared"
    if shared.is_dir():
        files += [p for p in shared.rglob("*") if p.is_file()]
    return sorted(set(files))


def _bytes(paths: Sequence[Path]) -> int:
    total = 0
    for path in paths:
        total += sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
    return total


# -- this machine: prepare -----------------------------------------------------------------------------
def _relative_ignored(repo: Path, path: Path) -> str:
    """`path` relative to the repository, which must hold it in an ignored folder (carried paths are)."""
    try:
        rel = path.resolve().relative_to(repo.resolve())
    except ValueError:
        raise ValueError(f"{path} must be inside the repository {repo}: carried paths are relative to it") from None
    if subprocess.run(["git", "-C", str(repo), "check-ignore", "-q", str(rel)]).returncode != 0:
        raise ValueError(f"{rel} is not git-ignored: it would travel with every call; put it under runs/")
    return rel.as_posix()


def _in_tree(repo: Path, path: Path) -> str | None:
    """`path` relative to the repository if it travels with every call anyway (inside it, not ignored)."""
    try:
        rel = path.resolve().relative_to(repo.resolve()).as_posix()
    except ValueError:
        return None
    ignored = subprocess.run(["git", "-C", str(repo), "check-ignore", "-q", rel]).returncode == 0
    return None if ignored else rel


def _wheels(cache: Path, python: str) -> list[Path]:
    """pydantic and its own dependencies for the GPU's Python, at the versions installed here."""
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in WHEELS]
    platforms = [arg for n in (17, 24, 27, 28, 31, 34, 35) for arg in ("--platform", f"manylinux_2_{n}_x86_64")]
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
               python, "--implementation", "cp", "--platform", "manylinux2014_x86_64", *platforms, "-d", str(cache),
               *pins]
    if subprocess.run(command).returncode != 0:
        raise RuntimeError(f"pip could not download {' '.join(pins)} for Python {python}: with no index here, "
                           "fill that folder by hand, or pass --no-wheels if the GPU has pydantic 2")
    wanted = {re.sub(r"[-.]", "_", name) for name in WHEELS}
    return sorted(p for p in cache.glob("*.whl") if p.name.split("-")[0].lower() in wanted
                  and p.name.split("-")[1] in {v.split("==")[1] for v in pins})


def _shard_specs(samples: list, split_name: str, seed: int, shard_size: int, control_frac: float) -> list[dict]:
    # The shards `prepare.prepare` would write; the teacher runs there.
    from d2l_memory.training.prepare import shard_plan

    return [{"name": name, "samples": [s.model_dump() for s in group], "control": control}
            for name, group, control in shard_plan(samples, split_name, seed, shard_size, control_frac)]


def _write_specs(path: Path, specs: list[dict]) -> None:
    with gzip.open(path, "wt") as fh:
        fh.writelines(json.dumps(spec) + "\n" for spec in specs)


def _save_bf16(loaded: LoadedModel, dest: Path) -> None:
    """The base model in bf16 with the manifest `models.resolve` verifies (and its source's sha256, so a
    machine that has the source accepts the copy instead of converting again)."""
    loaded.model.save_pretrained(dest, safe_serialization=True)
    loaded.tokenizer.save_pretrained(dest)
    source = Path(loaded.model.name_or_path) / MANIFEST
    source_sha = json.loads(source.read_text()).get("source_sha256") if source.is_file() else None
    files = {p.name: sha256_file(p) for p in sorted(dest.iterdir()) if p.is_file()}
    (dest / MANIFEST).write_text(json.dumps({"source": loaded.model_id, "source_sha256": source_sha,
                                             "dtype": "bfloat16", "files": files}, indent=1))


def _estimate_calls(train_json: dict) -> int:
    """How many returns the checkpoint needs: the hypernetwork (fp32) and AdamW's two moments, in pieces."""
    from d2l_memory.hypernet import HyperLoRA, HypernetConfig

    with torch.device("meta"):
        n = sum(p.numel() for p in HyperLoRA(HypernetConfig.model_validate(train_json["hypernet"])).parameters())
    sizes = {"meta.tar": 4 * MiB, "hypernet.safetensors": 4 * n + MiB, "optimizer.safetensors": 8 * n + MiB}
    pieces = [Part(name=f"{name}.{i:03d}", bytes=min(PIECE_BYTES, size - i * PIECE_BYTES), sha256="")
              for name, size in sizes.items() for i in range(-(-size // PIECE_BYTES))]
    return len(pack_calls(pieces))


def prepare(out: Path, config: BurstConfig, repo: Path = REPO) -> Plan:
    """Write the bundle's parts and `plan.json` into `out` (inside `repo`, git-ignored) and return the plan.

    Raises:
        ValueError: `out` is not an ignored folder of `repo`; the working tree leaves less than 8 MiB per call;
            `hypernet.*` overrides beside a starting checkpoint (its shape is fixed).
    """
    from d2l_memory.d2l import CONFIG, shipped_checkpoint
    from d2l_memory.hypernet import HypernetConfig
    from d2l_memory.training.prepare import DEFAULT_MIX, draw, token_counter
    from d2l_memory.training.train import load_config

    rel_out = _relative_ignored(repo, out)
    tree = _bytes(tree_files(repo))
    part_bytes = min(60 * MiB, CALL_BYTES - tree - TREE_MARGIN)
    if part_bytes < 8 * MiB:
        raise ValueError(f"the working tree is {tree / MiB:.1f} MiB: too little of a call's 64 MiB is left for parts")
    for stale in ("parts", "bundle"):
        shutil.rmtree(out / stale, ignore_errors=True)
    bundle = out / "bundle"
    (bundle / "model").mkdir(parents=True)
    shipped = shipped_checkpoint(config.base_model)
    init = None if config.fresh else config.init_from or (shipped if (shipped / CONFIG).is_file() else None)
    if init is not None and any(o.startswith("hypernet.") for o in config.overrides):
        raise ValueError(f"training continues {init}, whose hypernetwork shape is fixed: drop the hypernet.* "
                         "overrides, or start a new hypernetwork (--fresh)")

    loaded = load_model(config.base_model, dtype=torch.bfloat16)
    _save_bf16(loaded, bundle / "model")
    with tempfile.TemporaryDirectory() as empty:  # TrainConfig's defaults, the GPU's, then the user's overrides
        defaults = [*GPU_DEFAULTS, "stage2_step=0"] if init is not None else list(GPU_DEFAULTS)
        train_config = load_config(Path(empty) / "train.json", [*defaults, *config.overrides])
    # The starting checkpoint's shape, or the one read from the model; either way checked against the model here.
    given = train_config.hypernet.model_dump(include=train_config.hypernet.model_fields_set) if init is None else \
        HypernetConfig.model_validate_json((init / CONFIG).read_text()).model_dump()
    hypernet = HypernetConfig.for_model(loaded, **given)
    init_from = None
    if init is not None:
        init_from = _in_tree(repo, init)  # in the working tree, it travels with every call anyway
        if init_from is None:
            shutil.copytree(init, bundle / "init")
            init_from = "bundle/init"
    # Paths are relative: the GPU side places data, eval data and the run under its own folder.
    train_json = train_config.model_copy(update={
        "hypernet": hypernet, "device": config.device, "data": Path("data"), "eval_data": Path("eval-data"),
        "out": Path("run"), "init_from": init_from and Path(init_from)}).model_dump(mode="json")
    (bundle / "train.json").write_text(json.dumps(train_json, indent=1))
    init_sha = None if init is None else sha256_file(init / "hypernet.safetensors")
    (bundle / "burst.json").write_text(config.model_copy(update={"init_from": init, "init_sha256": init_sha})
                                       .model_dump_json(indent=1))

    count = token_counter(loaded.tokenizer)
    mix = config.mix or DEFAULT_MIX
    train_samples = draw(config.samples, config.seed, mix, "train", count)
    eval_samples = draw(config.eval_samples, config.seed + 1, mix, "eval", count)
    _write_specs(bundle / "train-shards.jsonl.gz",
                 _shard_specs(train_samples, "train", config.seed, config.shard_size, config.control_frac))
    _write_specs(bundle / "eval-shards.jsonl.gz",
                 _shard_specs(eval_samples, "eval", config.seed + 1, config.shard_size, config.control_frac))
    if config.wheels:
        (bundle / "wheels").mkdir()
        for wheel in _wheels(out / "wheels", config.gpu_python):
            shutil.copy2(wheel, bundle / "wheels" / wheel.name)

    archive = out / "bundle.tar"
    with tarfile.open(archive, "w") as tar:
        for path in sorted(bundle.rglob("*")):
            tar.add(path, arcname=path.relative_to(bundle).as_posix(), recursive=False)
    (out / "parts").mkdir()
    parts = split(archive, out / "parts", part_bytes, prefix="part-")  # the join takes them in name order
    plan = Plan(config=config, bundle_sha256=sha256_file(archive), parts=parts, tree_bytes=tree, steps=[])
    archive.unlink()
    shutil.rmtree(bundle)
    plan.steps = _steps(plan, rel_out, _estimate_calls(train_json))
    (out / "plan.json").write_text(plan.model_dump_json(indent=1))
    return plan


# -- the commands -----------------------------------------------------------------------------------------
def _env(plan: Plan) -> str:
    b = f'B="{GPU_DIR}/{plan.run_id}"'
    return (f'set -eu; {b}; export PYTHONPATH="$B/site${{PYTHONPATH:+:$PYTHONPATH}}" D2L_MEMORY_HOME="$B/home" '
            "HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TQDM_DISABLE=1 TOKENIZERS_PARALLELISM=false")


def _steps(plan: Plan, rel_out: str, n_calls: int) -> list[Step]:
    c, n = plan.config, len(plan.parts)
    steps = []
    for i, part in enumerate(plan.parts):
        check = ""
        if i == 0:  # fail before shipping hundreds of MiB to a machine that cannot train
            probe = (f"import importlib.metadata as m, torch; print(*(p + ' ' + m.version(p) for p in "
                     f"{json.dumps(THERE)}), 'cuda', torch.cuda.is_available())").replace("'", '"')
            need = '; assert torch.cuda.is_available(), "no GPU"' if c.device.startswith("cuda") else ""
            check = f"python3 -c '{probe}{need}'; nvidia-smi -L 2>/dev/null || true; "
        steps.append(Step(
            title=f"copy part {i + 1} of {n}" + (" (and check the machine)" if i == 0 else ""),
            command=(f'{_env(plan)}; {check}mkdir -p "$B/parts"; cp {rel_out}/parts/{part.name} "$B/parts/"; '
                     f'cd "$B/parts"; echo "{part.sha256}  {part.name}" | sha256sum -c --quiet - && '
                     f'echo "{part.name} verified: $(ls | wc -l) of {n} parts there"'),
            carry=[f"{rel_out}/parts/{part.name}"], timeout_s=120))
    seconds = round(c.minutes * 60)
    join = (f'if [ ! -f "$B/bundle/.ok" ]; then have=$(ls "$B/parts" | wc -l); '
            f'[ "$have" = {n} ] || {{ echo "$have of {n} parts in $B/parts: run the copy commands again"; exit 3; }}; '
            f'cat "$B"/parts/part-* > "$B/bundle.tar"; echo "{plan.bundle_sha256}  $B/bundle.tar" | sha256sum -c '
            '--quiet -; mkdir -p "$B/bundle"; tar -xf "$B/bundle.tar" -C "$B/bundle"; rm -f "$B/bundle.tar"; '
            'touch "$B/bundle/.ok"; echo "bundle joined and verified"; fi')
    wheels = ('if [ ! -d "$B/site" ] && ls "$B"/bundle/wheels/*.whl >/dev/null 2>&1; then python3 -m pip install '
              '-q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$B/site" '
              '"$B"/bundle/wheels/*.whl; fi')
    steps.append(Step(
        title=f"join, verify, make the teacher targets, train for at most {c.minutes:g} min, bring the weights back",
        command=(f"{_env(plan)}; {join}; {wheels}; timeout -k 20 {seconds + 30} python3 -m d2l_memory.training.burst "
                 f'gpu --dir "$B" --seconds {seconds} --out "$OUT"'),
        timeout_s=min(CALL_SECONDS, seconds + 60)))
    for k in range(1, n_calls):
        steps.append(Step(title=f"bring back the optimizer state, piece set {k + 1} of {n_calls} (for an exact resume)",
                          command=f'{_env(plan)}; python3 -m d2l_memory.training.burst export --dir "$B" --call {k} '
                                  '--out "$OUT"',
                          timeout_s=120, optional=True))
    for step in steps:
        if len(step.command) > COMMAND_CHARS:
            raise ValueError(f"'{step.title}' is {len(step.command)} characters, over the {COMMAND_CHARS} of a call")
    return steps


def describe(plan: Plan) -> str:
    """The printed sequence: one block per call, ready for the `run` tool."""
    c = plan.config
    total = sum(p.bytes for p in plan.parts)
    lines = [f"GPU burst for {c.base_model}: bundle {total / MiB:.0f} MiB in {len(plan.parts)} parts (beside a "
             f"{plan.tree_bytes / MiB:.1f} MiB working tree per call), {c.samples} training samples, "
             f"{c.minutes:g} min of training command, {len(plan.steps)} calls.",
             "Run them in order, each as soon as the last returns (the machine and its files go back after ~30 s "
             "idle). Then: python -m d2l_memory.training.burst collect --out <out> <files_at of each call>", ""]
    for i, step in enumerate(plan.steps, 1):
        lines += [f"# call {i}/{len(plan.steps)}: {step.title}{' (optional)' if step.optional else ''}",
                  f"carry: {json.dumps(step.carry)}  timeout_s: {step.timeout_s}", step.command, ""]
    return "\n".join(lines)


# -- the GPU machine ---------------------------------------------------------------------------------------
def _install_model(bundle: Path, name: str) -> None:
    """Move the shipped model to where `models.resolve` finds a verified copy."""
    target = home() / "models" / cache_slug(name)
    if (bundle / "model").is_dir():
        shutil.rmtree(target, ignore_errors=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        (bundle / "model").rename(target)


def _on(device: str) -> None:
    if device != "cpu":  # the teacher and the loop build tensors with plain torch.tensor calls
        torch.set_default_device(device)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True  # launch-bound at this size: TF32 adds no kernels


def teacher(directory: Path, worker: int, workers: int, until: float) -> None:
    """Teacher targets for this worker's share of the shards (held-out ones first); shards that exist are kept,
    and none is started after `until` (a Unix time)."""
    from d2l_memory.training.data import Sample
    from d2l_memory.training.teacher import build_shard

    bundle = directory / "bundle"
    device = json.loads((bundle / "train.json").read_text())["device"]
    burst = BurstConfig.model_validate_json((bundle / "burst.json").read_text())
    torch.set_num_threads(1)
    _on(device)
    model = load_model(burst.base_model)
    model.model.to(device)
    for index, (path, spec) in enumerate(_shard_jobs(directory)):
        if index % workers != worker or path.with_suffix(".jsonl").exists():
            continue
        if time.time() > until and path.parent.name == "data":
            break
        counts = build_shard(model, [Sample(**s) for s in spec["samples"]], path, control=spec["control"])
        print(f"worker {worker}: {spec['name']} {counts}", flush=True)


def _shard_jobs(directory: Path) -> list[tuple[Path, dict]]:
    """Each shard to write, held-out ones first: (its path without suffix, its samples and control questions)."""
    jobs = []
    for where, specs in (("eval-data", "eval-shards.jsonl.gz"), ("data", "train-shards.jsonl.gz")):
        with gzip.open(directory / "bundle" / specs, "rt") as fh:
            jobs += [(directory / where / spec["name"], spec) for spec in map(json.loads, fh)]
    return jobs


def _teacher_data(directory: Path, workers: int, until: float) -> None:
    if all(path.with_suffix(".jsonl").exists() for path, _ in _shard_jobs(directory)):
        return  # run again: every shard is there
    if workers == 1:
        teacher(directory, 0, 1, until)
        return
    procs = [subprocess.Popen([sys.executable, "-m", "d2l_memory.training.burst", "teacher", "--dir", str(directory),
                               "--worker", str(i), "--workers", str(workers), "--until", str(until)])
             for i in range(workers)]
    try:
        for proc in procs:  # a worker finishes the shard it has started; past that it is stopped
            proc.wait(timeout=max(1.0, until + 60 - time.time()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait()
    if any(proc.returncode not in (0, -signal.SIGTERM) for proc in procs):
        raise RuntimeError(f"teacher workers exited with {[p.returncode for p in procs]}")


def _seconds_per_step(metrics: Path) -> float:
    """Wall seconds per training step, from steps without an evaluation."""
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    plain = [r for r in records if "eval_loss" not in r] or records
    first, last = plain[len(plain) // 2], plain[-1]
    if last["step"] > first["step"]:
        return (last["elapsed"] - first["elapsed"]) / (last["step"] - first["step"])
    return last["elapsed"] / last["step"]


def gpu(directory: Path, seconds: float, out: Path) -> None:
    """The training command's work: teacher targets, a timed start, training to a deadline, the first export."""
    from d2l_memory.training.train import TrainConfig, train

    start = time.time()
    bundle = directory / "bundle"
    burst = BurstConfig.model_validate_json((bundle / "burst.json").read_text())
    config = TrainConfig.model_validate_json((bundle / "train.json").read_text())
    rebase = {key: directory / getattr(config, key) for key in ("data", "eval_data", "out")}
    if config.init_from is not None and config.init_from.parts[0] == "bundle":
        rebase["init_from"] = directory / config.init_from
    config = config.model_copy(update=rebase)
    if config.init_from is not None and sha256_file(config.init_from / "hypernet.safetensors") != burst.init_sha256:
        raise ValueError(f"{config.init_from} is not the checkpoint prepare bundled for: prepare again")
    _install_model(bundle, burst.base_model)
    _on(config.device)
    report: dict = {"device": torch.cuda.get_device_name() if config.device.startswith("cuda") else config.device,
                    "torch": torch.__version__}
    _teacher_data(directory, burst.workers, start + burst.data_share * seconds)
    report["teacher_s"] = round(time.time() - start, 1)
    report["examples"] = sum(len(p.read_text().splitlines()) for p in config.data.glob("*.jsonl"))
    deadline = start + seconds - burst.reserve_s
    schedule = config.out / "burst-schedule.json"
    if schedule.exists():  # run again: resume the sized schedule
        total = json.loads(schedule.read_text())["total_steps"]
    else:
        shutil.rmtree(config.out, ignore_errors=True)
        train(config.model_copy(update={"stop_at_step": burst.calibrate_steps, "total_steps": 10**9}))
        per_step = _seconds_per_step(config.out / "metrics.jsonl")
        total = burst.calibrate_steps + max(1, int(0.9 * (deadline - time.time()) / per_step))
        total = min(total, burst.max_steps) if burst.max_steps is not None else total
        report.update(seconds_per_step=round(per_step, 4), total_steps=total)
        schedule.write_text(json.dumps({"total_steps": total, "seconds_per_step": per_step}))
    train(config.model_copy(update={"total_steps": total,
                                    "time_budget_minutes": max(0.05, (deadline - time.time()) / 60)}))
    report["wall_s"] = round(time.time() - start, 1)
    burst_file = config.out / "burst.json"
    previous = json.loads(burst_file.read_text()) if burst_file.exists() else {}
    burst_file.write_text(json.dumps({**previous, **report}, indent=1))
    print(json.dumps(report), flush=True)
    export(directory, 0, out)


def _export_pieces(run: Path, dest: Path) -> dict:
    """Cut the run's checkpoint into pieces in `dest` and return the manifest (the calls included)."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    meta = dest / "meta.tar"
    with tarfile.open(meta, "w") as tar:
        for name in ("train.json", "metrics.jsonl", "burst.json", "last/config.json", "last/train_state.json"):
            if (run / name).is_file():
                tar.add(run / name, arcname=name)
    files, pieces = [], []
    for path in (meta, run / "last" / "hypernet.safetensors", run / "last" / "optimizer.safetensors"):
        parts = split(path, dest, PIECE_BYTES)
        files.append({"name": path.name, "bytes": path.stat().st_size, "sha256": sha256_file(path),
                      "pieces": [p.model_dump() for p in parts]})
        pieces += parts
    meta.unlink()  # its pieces are what travels
    return {"checkpoint": sha256_file(run / "last" / "train_state.json"), "files": files, "calls": pack_calls(pieces)}


def export(directory: Path, call: int, out: Path) -> None:
    """Write return `call` of the run's latest checkpoint (its pieces and the manifest) into `out`."""
    run, dest = directory / "run", directory / "export"
    state = run / "last" / "train_state.json"
    if not state.is_file():
        raise FileNotFoundError(f"no checkpoint in {run / 'last'}: the training command has not saved one")
    manifest_path = dest / PIECES
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
    if manifest is None or manifest["checkpoint"] != sha256_file(state):
        manifest = _export_pieces(run, dest)
        manifest_path.write_text(json.dumps(manifest))
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(manifest_path, out / PIECES)
    calls = manifest["calls"]
    names = calls[call] if call < len(calls) else []
    for name in names:
        shutil.copy2(dest / name, out / name)
    after = f"; next: export --call {call + 1}" if call + 1 < len(calls) else "; the checkpoint is complete"
    print(f"return {call + 1} of {len(calls)}: {len(names)} pieces{after}", flush=True)


# -- this machine: collect ---------------------------------------------------------------------------------
def collect(out: Path, sources: Sequence[Path]) -> Path:
    """Rebuild the run directory `out/result` from the returned pieces in `sources`, verifying each piece, each
    file, and (when the optimizer came back) the checkpoint's own record of its files.

    `result/last` then holds `config.json` + `hypernet.safetensors` (what `DocToLoRA.from_pretrained` and
    `init_from` take), and with the optimizer state and `train_state.json` a whole checkpoint that training
    resumes exactly.

    Raises:
        ValueError: no manifest, manifests of two different checkpoints, or a piece or file that does not
            match its sha256.
    """
    manifests = {p.read_text(): p for source in sources for p in [source / PIECES] if p.is_file()}
    if not manifests:
        raise ValueError(f"no {PIECES} in {[str(s) for s in sources]}: give the files_at folder of each call")
    parsed = [json.loads(text) for text in manifests]
    if len({m["checkpoint"] for m in parsed}) > 1:
        raise ValueError("these returns hold pieces of different checkpoints (a training command ran between "
                         "them): fetch every return again after the last training command")
    manifest = parsed[0]
    found = {p.name: p for source in sources for p in source.iterdir() if p.name != PIECES}
    result = out / "result"
    shutil.rmtree(result, ignore_errors=True)
    (result / "last").mkdir(parents=True)
    missing: list[str] = []
    with tempfile.TemporaryDirectory(dir=out) as scratch:
        for entry in manifest["files"]:
            absent = [p["name"] for p in entry["pieces"] if p["name"] not in found]
            if absent:
                missing.append(entry["name"])
                continue
            joined = Path(scratch) / entry["name"]
            with open(joined, "wb") as fh:
                for piece in entry["pieces"]:
                    data = found[piece["name"]].read_bytes()
                    if _sha256_bytes(data) != piece["sha256"]:
                        raise ValueError(f"{found[piece['name']]} does not match its sha256: fetch that return again")
                    fh.write(data)
            if sha256_file(joined) != entry["sha256"]:
                raise ValueError(f"{entry['name']} joined from its pieces does not match its sha256")
            if entry["name"] == "meta.tar":
                with tarfile.open(joined) as tar:
                    tar.extractall(result, filter="data")
            else:
                shutil.move(joined, result / "last" / entry["name"])
    if "meta.tar" in missing or "hypernet.safetensors" in missing:
        raise ValueError(f"the returns lack pieces of {missing}: run the training command's export again "
                         "(python -m d2l_memory.training.burst export --call 0)")
    state = result / "last" / "train_state.json"
    if "optimizer.safetensors" in missing:  # weights only: keep the record aside, or training would resume from it
        state.rename(result / "train_state.json")
        print("optimizer state not returned: result/last is a hypernetwork checkpoint, not a resumable one")
    else:
        recorded = json.loads(state.read_text()).get("files", {})
        for name, digest in recorded.items():
            if sha256_file(result / "last" / name) != digest:
                raise ValueError(f"result/last/{name} does not match the checkpoint's own record")
    return result


# -- the dry run -------------------------------------------------------------------------------------------
class LimitError(RuntimeError):
    """A call broke one of the `run` tool's limits."""


class FakeRun:
    """The `run` tool's contract on this CPU, for the dry run.

    Each call copies the working tree (tracked and untracked-not-ignored files, `shared/`) and the carried
    paths into a fresh tree, at most 64 MiB in all, runs the command with bash there under `timeout_s`, with
    an empty `$OUT`, and brings back at most 8 files of at most 16 MiB (64 MiB together, at most two folders
    deep, plain names). Anything past a limit raises `LimitError` (the real tool would drop it silently).
    The "machine" (`$D2L_BURST_DIR`) persists between calls, as the GPU's does while it stays up. Modules the
    GPU image lacks (faker, lancedb, gguf, the model packages) are shadowed by modules that refuse import.
    """

    BLOCKED = ("faker", "lancedb", "gguf", "vllm",
               *(source.module for entry in REGISTRY.values() for source in (entry, *entry.parts)))

    def __init__(self, repo: Path, root: Path) -> None:
        self.repo, self.root = repo, root.resolve()  # the command runs elsewhere: paths handed to it are absolute
        self.machine = self.root / "machine"
        self.blocked = self.root / "blocked"
        self.calls = 0
        self.machine.mkdir(parents=True, exist_ok=True)
        self.blocked.mkdir(parents=True, exist_ok=True)
        for module in self.BLOCKED:
            (self.blocked / f"{module}.py").write_text(f"raise ImportError('{module} is not on the GPU machine')\n")

    def __call__(self, command: str, carry: Sequence[str] = (), timeout_s: int = CALL_SECONDS
                 ) -> tuple[int, str, Path]:
        """Run one call; returns (exit status, the output's last 12,000 characters, the folder of returned files)."""
        if len(command) > COMMAND_CHARS or len(carry) > CARRY_PATHS or not 1 <= timeout_s <= CALL_SECONDS:
            raise LimitError(f"a call takes a command of <= {COMMAND_CHARS} characters (this one: {len(command)}), "
                             f"<= {CARRY_PATHS} carried paths ({len(carry)}) and 1..{CALL_SECONDS} s ({timeout_s})")
        self.calls += 1
        tree, outdir = self.root / "tree", self.root / "out"
        returned = self.root / "returned" / f"call-{self.calls:02d}"
        for fresh in (tree, outdir):
            shutil.rmtree(fresh, ignore_errors=True)
            fresh.mkdir(parents=True)
        sources = tree_files(self.repo) + [self.repo / c for c in carry]
        size = _bytes(sources)
        if size > CALL_BYTES:
            raise LimitError(f"the working tree and carried paths are {size / MiB:.1f} MiB, over {CALL_BYTES // MiB}")
        for source in sources:
            target = tree / source.relative_to(self.repo)
            target.parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if source.is_dir() else shutil.copy2)(source, target)
        env = {**os.environ, "OUT": str(outdir), "D2L_BURST_DIR": str(self.machine), "HF_HUB_OFFLINE": "1",
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               "PYTHONPATH": str(self.blocked), "D2L_MEMORY_DATA": str(self.root / "no-shared-data-there")}
        proc = subprocess.Popen(["bash", "-c", command], cwd=tree, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=timeout_s)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            rc = 124
        files = [p for p in outdir.rglob("*") if p.is_file()]
        bad = [p for p in files if len(p.relative_to(outdir).parts) > 3 or p.stat().st_size > RETURN_FILE_BYTES
               or not all(re.fullmatch(r"[A-Za-z0-9._-]+", part) for part in p.relative_to(outdir).parts)]
        if len(files) > RETURN_FILES or bad or _bytes(files) > RETURN_BYTES:
            raise LimitError(f"$OUT holds {len(files)} files, {_bytes(files) / MiB:.1f} MiB; out of bounds: {bad}")
        shutil.copytree(outdir, returned)
        return rc, output.decode(errors="replace")[-12000:], returned


def dry_run(out: Path, config: BurstConfig, repo: Path = REPO) -> Path:
    """`prepare`, every call of the plan through `FakeRun`, then `collect`: the whole burst on this CPU.

    Raises:
        RuntimeError: a call exited non-zero (its output is in the message).
        LimitError: a call broke a transfer limit.
    """
    plan = prepare(out, config, repo)
    print(describe(plan), flush=True)
    fake = FakeRun(repo, Path(tempfile.mkdtemp(prefix="fake-gpu-", dir=out)))
    returned = []
    try:
        for i, step in enumerate(plan.steps, 1):
            rc, output, files = fake(step.command, step.carry, step.timeout_s)
            print(f"--- call {i}/{len(plan.steps)} ({step.title}): rc {rc}\n{output[-3000:]}", flush=True)
            if rc != 0:
                raise RuntimeError(f"call {i} ({step.title}) exited {rc}:\n{output}")
            returned.append(files)
        return collect(out, returned)
    finally:
        shutil.rmtree(fake.root, ignore_errors=True)


# One evaluation (at the last of 4 steps) on 3 held-out examples, 1 answered greedily.
DRY_RUN_TRAIN = ("batch_size=2", "eval_every=4", "eval_examples=3", "recall_examples=1", "pass_tokens=2048",
                 "threads=1", "warmup_steps=2", "checkpoint_minutes=60")


def dry_run_config(base_model: str = DEFAULT_MODEL) -> BurstConfig:
    """The dry run's sizes: a tiny hypernetwork, a few dozen samples, a few steps, the CPU."""
    tiny = ["hypernet.layers=[8,9]", "hypernet.latent_dim=32", "hypernet.n_latents=4", "hypernet.n_blocks=1",
            "hypernet.n_heads=2", *DRY_RUN_TRAIN]
    generated = {"conversation": 0.5, "note": 0.2, "tool": 0.2, "needles": 0.1}  # no SQuAD pools to parse
    return BurstConfig(base_model=base_model, device="cpu", samples=8, eval_samples=6, shard_size=8, mix=generated,
                       minutes=3, data_share=0.5, reserve_s=5, workers=1, calibrate_steps=2, max_steps=4,
                       wheels=False, fresh=True, overrides=tiny)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("prepare", "dry-run"):
        p = sub.add_parser(name, help="bundle and print the calls" if name == "prepare" else
                           "the whole sequence on this CPU (tiny sizes unless given)")
        p.add_argument("--out", type=Path, required=True, help="an ignored folder of the repository (runs/...)")
        p.add_argument("--base-model", default=DEFAULT_MODEL)
        p.add_argument("--init-from", type=Path, help="hypernetwork checkpoint to continue (default: the shipped one)")
        p.add_argument("--fresh", action="store_true", help="start a new hypernetwork shaped for the base model")
        p.add_argument("--samples", type=int)
        p.add_argument("--minutes", type=float, help="the training command's whole budget (default 7)")
        p.add_argument("--workers", type=int)
        p.add_argument("--no-wheels", action="store_true", help="the GPU's Python already has pydantic 2")
        p.add_argument("--set", nargs="*", default=[], help="TrainConfig overrides, as train --set")
    collect_p = sub.add_parser("collect", help="verify and join what the calls brought back")
    collect_p.add_argument("--out", type=Path, required=True)
    collect_p.add_argument("sources", type=Path, nargs="+", help="the files_at folder of each call")
    for name in ("gpu", "teacher", "export"):  # the GPU side, started by the printed commands
        p = sub.add_parser(name)
        p.add_argument("--dir", type=Path, required=True)
        p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out")))
        p.add_argument("--seconds", type=float, default=420.0)
        p.add_argument("--call", type=int, default=0)
        p.add_argument("--worker", type=int, default=0)
        p.add_argument("--workers", type=int, default=1)
        p.add_argument("--until", type=float, default=float("inf"))
    args = parser.parse_args()
    if args.command in ("prepare", "dry-run"):
        config = dry_run_config(args.base_model) if args.command == "dry-run" else BurstConfig(
            base_model=args.base_model)
        given = {"samples": args.samples, "minutes": args.minutes, "workers": args.workers}
        config = config.model_copy(update={k: v for k, v in given.items() if v is not None})
        config = config.model_copy(update={"init_from": args.init_from, "fresh": config.fresh or args.fresh,
                                           "wheels": config.wheels and not args.no_wheels,
                                           "overrides": [*config.overrides, *args.set]})
        if args.command == "prepare":
            print(describe(prepare(args.out, config)))
        else:
            print(f"collected: {dry_run(args.out, config)}")
    elif args.command == "collect":
        print(f"collected: {collect(args.out, args.sources)}")
    elif args.command == "gpu":
        gpu(args.dir, args.seconds, args.out)
    elif args.command == "teacher":
        teacher(args.dir, args.worker, args.workers, args.until)
    else:
        export(args.dir, args.call, args.out)


if __name__ == "__main__":
    main()
