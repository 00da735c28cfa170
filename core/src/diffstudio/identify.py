"""Identify a checkpoint: resolve a ModelConfig, open its files, and get exactly one family claim."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from diffstudio.config import ModelConfig
from diffstudio.errors import AmbiguousCheckpointError, StrictLoadError, UnknownCheckpointError
from diffstudio.loading.checkpoint import Checkpoint
from diffstudio.loading.sources import WEIGHT_SUFFIXES, ShardIndexError
from diffstudio.resolve import resolve_files
from diffstudio.runtime import Runtime
from diffstudio.types import LoadRequest, ModelClaim


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


def identify(runtime: Runtime, config: ModelConfig) -> tuple[Checkpoint, ModelClaim]:
    """Resolve ``config`` offline and ask every family to claim its checkpoint.

    Returns:
        The checkpoint view and the single claim.

    Raises:
        ModelNotFoundError: the files cannot be found (the message lists every path tried).
        UnknownCheckpointError: no family claimed it (names the file, its telling keys, the families asked).
        AmbiguousCheckpointError: two or more plugins claimed it (names them).
    """
    checkpoint = open_checkpoint(runtime, config)
    claims = runtime.hooks.load_model(checkpoint, config)
    if not claims:
        raise UnknownCheckpointError(checkpoint.source, checkpoint.telling_keys(), runtime.hooks.families_asked())
    if len(claims) > 1:
        raise AmbiguousCheckpointError(checkpoint.source, [c.describe() for c in claims])
    return checkpoint, naming_source(claims[0])


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
