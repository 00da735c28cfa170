"""Identify a checkpoint: resolve a ModelConfig, open its files, and get exactly one family claim.

The one path from files to a loaded pipeline (``diffstudio run``, training, ``from_pretrained``)::

    with identified(runtime, configs[:1]) as found:        # each checkpoint identified once
        spec = pipeline_for(runtime, found[0][1])           # which pipeline serves it: one answer for everyone
        pipe = spec.factory().from_pretrained(model_configs=configs, runtime=runtime)

Inside the block, ``BasePipeline.load_component`` gets the checkpoint and claim already found for a config
(:func:`identify` hands them over instead of opening the files again) and closes the checkpoint once its module
is built; checkpoints nobody took are closed when the block ends.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from diffstudio.config import ModelConfig
from diffstudio.errors import (
    AmbiguousCheckpointError,
    NoPipelineError,
    PickleRefusedError,
    StrictLoadError,
    UnknownCheckpointError,
)
from diffstudio.loading.checkpoint import Checkpoint
from diffstudio.loading.pickle_policy import is_pickle_path
from diffstudio.loading.sources import WEIGHT_SUFFIXES, ShardIndexError
from diffstudio.resolve import resolve_files
from diffstudio.runtime import Runtime
from diffstudio.types import LoadRequest, ModelClaim, PipelineSpec

#: Checkpoints identified by an :func:`identified` block and not yet taken: ``(runtime, {id(config): entry})``.
_PENDING: ContextVar[tuple[Runtime, dict[int, tuple[ModelConfig, Checkpoint, ModelClaim]]] | None] = ContextVar(
    "diffstudio_identified", default=None
)


def open_checkpoint(runtime: Runtime, config: ModelConfig) -> Checkpoint:
    """Resolve ``config`` offline and open the weight files it names (headers only; no claim asked).

    In a folder, the ``.safetensors`` files are the checkpoint (other weight files only when there are none). A
    ``*.safetensors.index.json`` beside them is read and checked against them (every shard present, every tensor
    where the index says), even when a complete single file sits in the same folder: a broken or stale index is
    an error rather than silently ignored.

    Raises:
        ModelNotFoundError: the files cannot be found.
        ShardIndexError: a shard index in the folder is unreadable, names missing shards, or disagrees with them.
    """
    embedded = {m.model_id: m.root for m in runtime.hooks.embedded_models()}
    resolved = resolve_files(config, embedded=embedded)
    files = list(resolved.files)
    indexes: list[Path] = []
    if len(files) > 1:  # a folder: config.json, tokenizer files, README ... sit beside the weights
        weights = [f for f in files if f.suffix.lower() in WEIGHT_SUFFIXES]
        safetensors = [f for f in weights if f.suffix.lower() == ".safetensors"]
        indexes = [f for f in files if f.name.endswith(".safetensors.index.json")] if safetensors else []
        files = safetensors or weights or files
    pickles = [f for f in files if is_pickle_path(f)]
    if pickles:
        raise PickleRefusedError(pickle_refusal(runtime, pickles[0]))
    try:
        return Checkpoint.open([*files, *indexes])
    except ShardIndexError as exc:
        if not indexes:
            raise
        listed = ", ".join(f.name for f in files[:4]) + (" ..." if len(files) > 4 else "")
        raise ShardIndexError(
            f"{exc} The folder also holds {listed}: if that is the complete model, delete the stale index "
            f"({', '.join(i.name for i in indexes)}) or pass the weight file itself."
        ) from None


def pickle_refusal(runtime: Runtime, path: Path) -> str:
    """Why a pickle given to ``from_pretrained`` / ``run`` / ``train`` / ``inspect`` is refused, and what loads it.

    These paths take no ``allow_pickle`` (the opt-in belongs to explicit loaders), so the message names the
    conversion commands instead: core's ``diffstudio convert`` and every installed plugin's ``*-convert`` command
    with its help line (e.g. diffstudio-nexus-gen's, for decoder files that hold two components).
    """
    commands = [c for c in runtime.hooks.commands() if c.name.endswith("-convert")]
    plugins = "; ".join(f"`diffstudio {c.name}` ({c.help})" for c in commands)
    return (
        f"Refusing to load the pickle-based checkpoint {path}: unpickling a file can run arbitrary code, and "
        "from_pretrained (like `diffstudio run`, `train` and `inspect`) never unpickles and takes no allow_pickle. "
        f"If you trust the file, convert it once: `diffstudio convert {path} {path.with_suffix('.safetensors')}`"
        + (f", or with a plugin's own converter: {plugins}" if plugins else "")
        + "; then pass the .safetensors file."
    )


def identify(runtime: Runtime, config: ModelConfig) -> tuple[Checkpoint, ModelClaim]:
    """Resolve ``config`` offline and ask every family to claim its checkpoint.

    Returns:
        The checkpoint view and the single claim.

    Raises:
        ModelNotFoundError: the files cannot be found (the message lists every path tried).
        UnknownCheckpointError: no family claimed it (names the file, its telling keys, the families asked).
        AmbiguousCheckpointError: two or more plugins claimed it (names them).
    """
    pending = _PENDING.get()
    if pending is not None and pending[0] is runtime:
        entry = pending[1].get(id(config))
        if entry is not None and entry[0] is config:
            del pending[1][id(config)]  # the caller owns (and closes) it now
            return entry[1], entry[2]
    checkpoint = open_checkpoint(runtime, config)
    claims = runtime.hooks.load_model(checkpoint, config)
    if not claims:
        raise UnknownCheckpointError(checkpoint.source, checkpoint.telling_keys(), runtime.hooks.families_asked())
    if len(claims) > 1:
        raise AmbiguousCheckpointError(checkpoint.source, [c.describe() for c in claims])
    return checkpoint, naming_source(claims[0])


#: ``ModelConfig`` fields that say where weights live, not which files they are (:meth:`Identified.with_memory`).
MEMORY_FIELDS = frozenset(
    f"{stage}_{kind}" for stage in ("offload", "onload", "preparing", "computation") for kind in ("device", "dtype")
)


@dataclasses.dataclass
class Identified:
    """A config identified by :func:`identified`: its open checkpoint and the one claim on it."""

    config: ModelConfig
    checkpoint: Checkpoint
    claim: ModelClaim
    _pending: dict[int, tuple[ModelConfig, Checkpoint, ModelClaim]] = dataclasses.field(repr=False)

    def with_memory(self, **fields: Any) -> ModelConfig:
        """The config with other memory fields, still identified: loading it in the block takes this checkpoint.

        Memory fields (:data:`MEMORY_FIELDS`) say where weights rest and compute, not which files they are, so
        the claim stays valid.

        Raises:
            ValueError: A field that is not a memory field (a programming error).
        """
        unknown = sorted(set(fields) - MEMORY_FIELDS)
        if unknown:
            raise ValueError(f"with_memory() takes memory fields only; got {unknown}")
        changed = dataclasses.replace(self.config, **fields)
        entry = self._pending.pop(id(self.config), None)
        if entry is not None:
            self._pending[id(changed)] = (changed, entry[1], entry[2])
        self.config = changed
        return changed


@contextmanager
def identified(runtime: Runtime, configs: Sequence[ModelConfig]) -> Iterator[list[Identified]]:
    """Identify ``configs`` once each, for the loads inside the block to reuse.

    :func:`identify` called inside the block with the same runtime and the same config object (or the one
    :meth:`Identified.with_memory` returned) gives the checkpoint and claim found here, and the caller then owns
    the checkpoint; the checkpoints nobody took are closed when the block ends, also on errors.

    Yields:
        One :class:`Identified` per config, in order.

    Raises:
        ModelNotFoundError, UnknownCheckpointError, AmbiguousCheckpointError: As :func:`identify`.
    """
    pending: dict[int, tuple[ModelConfig, Checkpoint, ModelClaim]] = {}
    token = _PENDING.set((runtime, pending))
    try:
        results = []
        for config in configs:
            checkpoint, claim = identify(runtime, config)
            pending[id(config)] = (config, checkpoint, claim)
            results.append(Identified(config, checkpoint, claim, pending))
        yield results
    finally:
        _PENDING.reset(token)
        for _, checkpoint, _ in pending.values():
            checkpoint.close()


def pipeline_for(runtime: Runtime, claim: ModelClaim | None = None, *, name: str | None = None) -> PipelineSpec:
    """Which installed pipeline serves a model: the one asked for by ``name``, else the claim's family's.

    The one answer for ``diffstudio run``, training and ``from_pretrained``'s wrong-family message: the first
    registered pipeline (by name) whose ``family`` is the claim's.

    Raises:
        NoPipelineError: No installed pipeline runs the claim's family.
        UnknownNameError: ``name`` is not a registered pipeline.
        ValueError: Neither ``claim`` nor ``name`` given (a programming error).
    """
    pipelines = runtime.hooks.pipelines()
    if name is not None:
        return pipelines.get(name)
    if claim is None:
        raise ValueError("pipeline_for() needs a claim or a pipeline name")
    for spec in pipelines:  # by name: the same answer on every machine
        if spec.family == claim.family:
            return spec
    raise NoPipelineError(
        f"no installed pipeline runs {claim.family!r} models ({claim.describe()}); install the plugin of the "
        f"{claim.family} family (see `diffstudio plugins`)"
    )


def naming_source(claim: ModelClaim) -> ModelClaim:
    """The claim with a loader whose strict-load errors name the checkpoint (plugins need not pass ``source=``)."""
    load = claim.load

    def load_naming_source(checkpoint: Checkpoint, request: LoadRequest) -> Any:
        try:
            return load(checkpoint, request)
        except StrictLoadError as exc:
            if exc.source:
                raise
            raise StrictLoadError(
                exc.module, exc.missing, exc.unexpected, exc.mismatched, source=checkpoint.source
            ) from exc

    return dataclasses.replace(claim, load=load_naming_source)
