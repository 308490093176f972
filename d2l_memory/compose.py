"""Compose the adapters of the memories selected for a query into one adapter, and cache it on disk.

vLLM applies one LoRA per request, so the k memories recalled for a query become one adapter:

    delta_W = sum_i w_i * delta_W_i

computed exactly by stacking ranks (`LoRA.concat`) while `sum_i r_i` fits the rank budget; beyond it,
the stack is re-compressed to the budget with `LoRA.truncate` (truncated SVD) and the relative error
(Frobenius norm of the dropped singular values over that of all of them) is reported. The result is
zero-padded to the next rank vLLM accepts.

`ComposedCache` keeps composed adapters as PEFT directories under `home()/composed`, named
`d2l-<32 hex>` after a hash of their `Recipe` (sorted member ids and weights, base model,
hypernetwork checksum, rank budget). Names are derived, never user paths: anything but `[a-z0-9-]` is
refused, so a name can never point outside the cache. Each entry keeps its recipe, even after LRU
eviction of its weights, so a vLLM resolver can rebuild it from the store, and `erase(memory_ids)`
can drop every entry a forgotten memory is part of.

Forgetting reaches every entry, whatever happens in between: `get_or_compose` checks on every hit that
the recipe's members are still stored (one `id IN (...)` query) and checks again after each write, so a
forget that races a composition never leaves the forgotten memory inside a new entry; `sweep` (run when a
`D2LMemory` opens and by `d2l-memory optimize`) drops the entries of memories whose erase callbacks never
ran (a kill -9 between the row delete and the callbacks) and temporary directories left by killed
writers. Each entry records the sha256 of its files, checked on every hit: a corrupted entry is rebuilt,
never served.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import posixpath
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator

from d2l_memory.errors import MemoryNotFoundError, call_all
from d2l_memory.home import home, sha256_file
from d2l_memory.kinds import WEIGHTINGS, Weighting
from d2l_memory.lora import CONFIG_FILE, WEIGHTS_FILE, LoRA

log = logging.getLogger(__name__)

DEFAULT_WEIGHTING: Weighting = "relevance"
RELEVANCE_TEMPERATURE = 0.1  # `member_weights`' default for `relevance`, over MiniLM cosines
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
DEFAULT_RANK_BUDGET = 64
DEFAULT_MAX_BYTES = 2 << 30
RECIPE_FILE = "d2l_recipe.json"
CHECKED_FILES = (WEIGHTS_FILE, CONFIG_FILE)  # what vLLM and the engines read: hashed at write, checked on hits
TEMP_PREFIX = ".d2l-"  # entries are written in `.<name>-<random>` directories first, then renamed into place
ORPHAN_AGE_S = 3600.0  # a temporary directory this old belongs to no live writer (a write takes seconds)
_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,127}")
NamesCallback = Callable[[list[str]], None]


def check_name(name: str) -> str:
    """Return `name` if it is a safe adapter name (`[a-z0-9-]`, at most 128 characters).

    Raises:
        ValueError: anything else, e.g. a name containing `/` or `..`.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"adapter name {name!r} is not allowed: use only [a-z0-9-], at most 128 characters")
    return name


def vllm_rank(rank: int) -> int:
    """The smallest rank vLLM accepts (`VLLM_RANKS`) that holds `rank`.

    Raises:
        ValueError: a rank below 1 or above 512.
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    for allowed in VLLM_RANKS:
        if rank <= allowed:
            return allowed
    raise ValueError(f"rank {rank} exceeds vLLM's largest LoRA rank {VLLM_RANKS[-1]}")


def member_weights(composition: str, scores: Sequence[float], temperature: float = RELEVANCE_TEMPERATURE
                   ) -> list[float]:
    """The weights of k recalled memories whose recall scores are `scores`, one definition for serving and
    meta-training: `sum` gives 1 each (the paper's plain concatenation), `mean` 1/k each (k memories move the
    model as far as one), and `relevance` `w_i = softmax(scores / temperature)_i`, rounded to two decimals:
    the weights sum to about 1, as with `mean`, while the best-matching memory keeps most of that move
    (`sum` and `mean` read only how many scores there are).

    Rounding lets queries that score the same memories alike share one cached composition; a member whose weight
    rounds to 0 is given 0 and should be left out (`compose` keeps it at no effect but its rank).

    Raises:
        ValueError: an unknown composition, no members, or a temperature that is not positive.
    """
    if not scores:
        raise ValueError("a composition needs at least one member, got 0")
    if composition == "sum":
        return [1.0] * len(scores)
    if composition == "mean":
        return [1.0 / len(scores)] * len(scores)
    if composition != "relevance":
        raise ValueError(f"unknown composition {composition!r}; expected one of {WEIGHTINGS}")
    if not temperature > 0:
        raise ValueError(f"the relevance temperature must be positive, got {temperature}")
    logits = [s / temperature for s in scores]
    top = max(logits)
    exp = [math.exp(x - top) for x in logits]
    return [round(e / sum(exp), 2) for e in exp]


@dataclass(frozen=True)
class Composition:
    """A composed adapter: `lora` is padded to `lora.rank == vllm_rank(rank)`.

    Attributes:
        lora: the composed adapter, zero-padded to a rank vLLM accepts.
        rank: its rank before padding (the sum of the inputs' ranks, or the budget when truncated).
        rel_error: relative Frobenius error of the truncation, 0.0 when the concatenation was exact.
        truncated: whether the stacked rank exceeded the budget and was re-compressed.
    """

    lora: LoRA
    rank: int
    rel_error: float
    truncated: bool = False


def compose(
    adapters: Sequence[LoRA], weights: Sequence[float] | None = None, rank_budget: int = DEFAULT_RANK_BUDGET
) -> Composition:
    """Compose adapters into one: `delta = sum_i weights[i] * delta_i`, exact while ranks fit the budget.

    Args:
        adapters: the members' adapters, all for one base model.
        weights: one weight per adapter (default 1.0 each).
        rank_budget: the largest rank of the result before padding (at most 512).

    Raises:
        ValueError: no adapters, a weight count that differs, mixed base models, or a budget outside 1..512.
    """
    vllm_rank(rank_budget)
    stacked = LoRA.concat(adapters, weights)
    if stacked.rank <= rank_budget:
        return Composition(lora=stacked.pad(vllm_rank(stacked.rank)), rank=stacked.rank, rel_error=0.0)
    truncated, error = stacked.truncate(rank_budget)
    return Composition(lora=truncated.pad(vllm_rank(rank_budget)), rank=rank_budget, rel_error=error,
                       truncated=True)


class AdapterSource(Protocol):
    """Where member adapters come from: `store.MemoryStore` is one, or anything holding adapters by id.

    All of a recipe's members are asked for in one call (one blob fetch from the store). `base_model` and
    `hypernet` are what the adapters must have been made for (None skips that check). `existing` says which
    of the ids are still stored, in one query: what every cache hit is checked against.
    """

    def get_adapters(self, memory_ids: Sequence[str], *, base_model: str | None,
                     hypernet: str | None) -> dict[str, LoRA]: ...

    def existing(self, memory_ids: Sequence[str]) -> set[str]: ...


class Recipe(BaseModel):
    """What a composed adapter is made of; its hash is the adapter's name."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    members: tuple[tuple[str, float], ...] = Field(min_length=1)
    base_model: str
    hypernet: str = ""
    rank_budget: int = DEFAULT_RANK_BUDGET

    @field_validator("members")
    @classmethod
    def _sorted_unique(cls, members: tuple[tuple[str, float], ...]) -> tuple[tuple[str, float], ...]:
        ids = [m for m, _ in members]
        if len(set(ids)) != len(ids):
            raise ValueError("a memory appears twice in one composition")
        return tuple(sorted((str(m), float(w)) for m, w in members))

    @field_validator("rank_budget")
    @classmethod
    def _budget(cls, budget: int) -> int:
        vllm_rank(budget)
        return budget

    @property
    def memory_ids(self) -> list[str]:
        return [m for m, _ in self.members]

    @property
    def name(self) -> str:
        digest = hashlib.sha256(self.model_dump_json().encode()).hexdigest()
        return f"d2l-{digest[:32]}"


@dataclass
class Composed:
    """A composed adapter as the engines take it: a safe name, its PEFT directory, and the LoRA.

    The LoRA is read from `path` on first access, so a cache hit served by vLLM never loads it here.
    """

    name: str
    path: Path
    rank: int
    rel_error: float
    recipe: Recipe | None = None

    @cached_property
    def lora(self) -> LoRA:
        return LoRA.load_peft(self.path)


def store_location(store: str | Path) -> str:
    """One spelling per store: a local path resolved, a URI with its scheme lowercased and its path
    normalised (`s3://b/p`, `s3://b/p/`, `S3://b//p` and `s3://b/x/../p` are one store)."""
    text = str(store)
    scheme, sep, rest = text.partition("://")
    if not sep:
        return str(Path(store).expanduser().resolve())
    path = posixpath.normpath(rest).strip("/") if rest.strip("/") else ""
    return f"{scheme.lower()}://{path}"


def cache_root_for(store: str | Path) -> Path:
    """The composed cache of one store: `home()/composed/<hash of store_location(store)>`.

    Every spelling of a store maps to one root, so `forget` reaches all of the store's composed
    adapters, and `d2l-memory serve --store` serves the very directory `D2LMemory` writes to.
    """
    return home() / "composed" / hashlib.sha256(store_location(store).encode()).hexdigest()[:16]


class ComposedCache:
    """Composed adapters as PEFT directories under `root`, least recently used evicted past `max_bytes`.

    Entries are written into a temporary directory and renamed into place, so a reader (vLLM, another
    process) sees no entry or a whole one. Use is tracked by the entry directory's mtime, so several
    processes sharing a root share one LRU order. Eviction deletes an entry's weights but keeps its
    recipe (a few hundred bytes), so the name stays resolvable: `get_or_compose` rebuilds it.

    Args:
        root: cache directory (default `home()/composed`).
        max_bytes: size cap over all entries' weights; the entry just written is never evicted.
    """

    def __init__(self, root: str | Path | None = None, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.root = Path(root) if root is not None else home() / "composed"
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = int(max_bytes)
        self._lock = threading.Lock()
        self._erase_callbacks: list[NamesCallback] = []

    def on_erase(self, callback: NamesCallback) -> NamesCallback:
        """Register `callback(names)`, called with the names of the entries removed because a member was
        forgotten (by `erase`, `sweep`, or a hit that found a member gone), e.g. so that engines unload
        them. Returns the callback."""
        self._erase_callbacks.append(callback)
        return callback

    def path(self, name: str) -> Path:
        """The directory an entry named `name` lives in (whether or not it exists).

        Raises:
            ValueError: an unsafe name.
        """
        return self.root / check_name(name)

    def get(self, name: str) -> Composed | None:
        """The entry named `name` if its weights are on disk and match their recorded sha256, marked as
        just used; else None. Weights that do not match (a corrupted or truncated file, or an entry written
        without checksums) are dropped as eviction drops them, so `get_or_compose` writes them again.

        Raises:
            ValueError: an unsafe name.
        """
        entry = self.path(name)
        meta = _read_meta(entry)
        if meta is None or not (entry / WEIGHTS_FILE).is_file():
            return None
        if not _intact(entry, meta):
            log.warning("composed adapter %s does not match its recorded sha256: dropping its weights", name)
            _drop_weights(entry)
            return None
        try:
            os.utime(entry)
        except FileNotFoundError:  # erased by another process since the read
            return None
        return Composed(name=name, path=entry, rank=int(meta["rank"]), rel_error=float(meta["rel_error"]),
                        recipe=Recipe.model_validate(meta["recipe"]) if meta.get("recipe") else None)

    def recipe(self, name: str) -> Recipe | None:
        """The recipe recorded under `name` (kept after eviction, dropped by `erase`), or None.

        Raises:
            ValueError: an unsafe name.
        """
        meta = _read_meta(self.path(name))
        return Recipe.model_validate(meta["recipe"]) if meta and meta.get("recipe") else None

    def get_or_compose(self, recipe: Recipe, source: AdapterSource) -> Composed:
        """The composed adapter of `recipe`: an intact entry whose members `source` still holds, else one
        composed from `source` and written.

        Raises:
            MemoryNotFoundError: a member is no longer in `source` (forgotten, perhaps while this call
                composed); every entry holding it has been erased first.
            AdapterError: a member adapter is non-finite or made for another base model or hypernetwork.
        """
        hit = self.get(recipe.name)
        if hit is not None:
            self._check_members(recipe, source)
            return hit
        pins = {"base_model": recipe.base_model, "hypernet": recipe.hypernet or None}
        found = source.get_adapters(recipe.memory_ids, **pins)
        adapters = [found[memory_id] for memory_id in recipe.memory_ids]
        for adapter in adapters:  # whatever the source checked, nothing foreign is ever composed
            adapter.validate(**pins)
        entry = self._write(recipe.name, compose(adapters, [w for _, w in recipe.members], recipe.rank_budget),
                            recipe)
        # A forget whose rows went after the read above, but whose erase scanned the cache before this entry
        # was renamed into place, missed it; its rows are gone by now, so this check catches it. A forget
        # whose rows go after this check erases the entry itself: it is visible to that scan.
        self._check_members(recipe, source)
        return entry

    def export(self, lora: LoRA) -> Composed:
        """A plain adapter as an entry named after its content, for engines that load adapter files.

        Such entries have no recipe: `erase` cannot find them by memory id; only eviction or `clear`
        removes them. Compose memories through `get_or_compose` so that forgetting reaches them.
        """
        name = f"d2l-x{lora.content_hash()[:31]}"
        hit = self.get(name)
        if hit is not None:
            return hit
        return self._write(name, Composition(lora=lora.pad(vllm_rank(lora.rank)), rank=lora.rank,
                                             rel_error=0.0), None)

    def erase(self, memory_ids: Iterable[str]) -> list[str]:
        """Delete every entry (weights and recipe) with any of `memory_ids` among its members, and tell the
        `on_erase` callbacks.

        Returns:
            the names deleted.
        """
        doomed = set(memory_ids)
        removed = []
        with self._lock:
            for entry, members in self._members().items():
                if members & doomed:
                    shutil.rmtree(entry, ignore_errors=True)
                    removed.append(entry.name)
        self._notify(removed)
        return removed

    def sweep(self, source: AdapterSource) -> list[str]:
        """Remove what forgetting may have left: entries with a member `source` no longer holds (its erase
        callbacks never ran, e.g. the process was killed between the row delete and them), and temporary
        directories older than `ORPHAN_AGE_S` (their writer was killed mid-write).

        Returns:
            the names of the entries removed (the `on_erase` callbacks are told).
        """
        members = set().union(*self._members().values())
        removed = self.erase(members - source.existing(sorted(members))) if members else []
        cutoff = time.time() - ORPHAN_AGE_S
        for path in self.root.iterdir():
            try:
                orphan = path.name.startswith(TEMP_PREFIX) and path.is_dir() and path.stat().st_mtime < cutoff
            except FileNotFoundError:  # renamed into place or removed meanwhile
                continue
            if orphan:
                shutil.rmtree(path, ignore_errors=True)
        return removed

    def clear(self) -> None:
        """Delete every entry."""
        with self._lock:
            for entry in self._entries():
                shutil.rmtree(entry, ignore_errors=True)

    def size_bytes(self) -> int:
        """Bytes of weights on disk over all entries."""
        return sum(_weights_bytes(entry) for entry in self._entries())

    def names(self) -> list[str]:
        """Names of the entries whose weights are on disk, least recently used first."""
        return [entry.name for entry in self._lru() if (entry / WEIGHTS_FILE).is_file()]

    # -- internals -----------------------------------------------------------------------------
    def _entries(self) -> list[Path]:
        # Only directories this cache wrote: another cache may be nested under the same root.
        return [p for p in self.root.iterdir() if _NAME.fullmatch(p.name) and (p / RECIPE_FILE).is_file()]

    def _members(self) -> dict[Path, set[str]]:
        """The member ids of every entry that has a recipe."""
        found = {}
        for entry in self._entries():
            recipe = (_read_meta(entry) or {}).get("recipe") or {}
            found[entry] = {m for m, _ in recipe.get("members", [])}
        return found

    def _check_members(self, recipe: Recipe, source: AdapterSource) -> None:
        gone = set(recipe.memory_ids) - source.existing(recipe.memory_ids)
        if gone:
            self.erase(gone)
            raise MemoryNotFoundError(f"memories {', '.join(sorted(gone))} of composed adapter {recipe.name} are "
                                      "no longer stored (forgotten); every adapter composed from them is erased")

    def _notify(self, names: list[str]) -> None:
        call_all(self._erase_callbacks, names)

    def _lru(self) -> list[Path]:
        stamped = []
        for entry in self._entries():
            try:
                stamped.append((entry.stat().st_mtime_ns, entry))
            except FileNotFoundError:
                continue
        return [entry for _, entry in sorted(stamped)]

    def _write(self, name: str, composition: Composition, recipe: Recipe | None) -> Composed:
        final = self.path(name)
        # every name starts with `d2l-`, so this directory starts with TEMP_PREFIX and `sweep` finds it
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=self.root))
        try:
            composition.lora.save_peft(tmp)
            meta = {"rank": composition.rank, "rel_error": composition.rel_error, "created": time.time(),
                    "recipe": recipe.model_dump(mode="json") if recipe else None,
                    "sha256": {file: sha256_file(tmp / file) for file in CHECKED_FILES}}
            (tmp / RECIPE_FILE).write_text(json.dumps(meta))
            if final.exists() and not (final / WEIGHTS_FILE).is_file():
                shutil.rmtree(final, ignore_errors=True)  # an evicted entry's recipe: replaced whole
            try:
                tmp.rename(final)  # atomic: readers see no entry or a whole one
            except OSError:
                if not (final / WEIGHTS_FILE).is_file():  # not a concurrent writer of this entry
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        os.utime(final)
        self._evict(keep=final)
        entry = Composed(name=name, path=final, rank=composition.rank, rel_error=composition.rel_error,
                         recipe=recipe)
        entry.lora = composition.lora  # already in memory: spare the engine a read
        return entry

    def _evict(self, keep: Path) -> None:
        with self._lock:
            entries = self._lru()
            sizes = {entry: _weights_bytes(entry) for entry in entries}
            total = sum(sizes.values())
            for entry in entries:
                if total <= self.max_bytes:
                    break
                if entry != keep and sizes[entry]:
                    _drop_weights(entry)
                    total -= sizes[entry]


def _read_meta(entry: Path) -> dict | None:
    try:
        return json.loads((entry / RECIPE_FILE).read_text())
    except (OSError, ValueError):
        return None


def _intact(entry: Path, meta: dict) -> bool:
    recorded = meta.get("sha256")
    if not isinstance(recorded, dict) or set(recorded) != set(CHECKED_FILES):
        return False
    try:
        return all(sha256_file(entry / file) == recorded[file] for file in CHECKED_FILES)
    except OSError:  # erased meanwhile
        return False


def _drop_weights(entry: Path) -> None:
    for name in CHECKED_FILES:
        (entry / name).unlink(missing_ok=True)


def _weights_bytes(entry: Path) -> int:
    try:
        return (entry / WEIGHTS_FILE).stat().st_size
    except FileNotFoundError:
        return 0
