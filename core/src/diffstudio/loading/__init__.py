"""Checkpoint loading for diffstudio.

Strict safetensors headers, the lazy :class:`Checkpoint` view, meta-device assignment and exact state-dict
conversion primitives.

Importing this package does not import torch; only the functions that create or move tensors do.
"""

from __future__ import annotations

from diffstudio.loading.assign import (
    MetaTensorsRemainError,
    WeightDtypeError,
    build_on_meta,
    find_meta_tensors,
    load_state_dict_into,
)
from diffstudio.loading.checkpoint import (
    Checkpoint,
    CheckpointChangedError,
    DuplicateTensorError,
    TensorNotFoundError,
    UnsupportedDtypeError,
)
from diffstudio.loading.convert import (
    ConversionError,
    Converter,
    conv_to_linear,
    fuse_qkv,
    linear_to_conv,
    map_tensors,
    rename_keys,
    split_qkv,
    swap_halves,
)
from diffstudio.loading.finite import is_finite, nonfinite_tensors
from diffstudio.loading.pickle_policy import PickleContentError
from diffstudio.loading.safetensors_header import SafetensorsHeader, TensorInfo, read_header
from diffstudio.loading.sources import (
    CheckpointFileNotFoundError,
    CheckpointSource,
    NoWeightFilesError,
    ShardIndexError,
    UnsupportedFileError,
)

__all__ = [
    "Checkpoint",
    "CheckpointChangedError",
    "CheckpointFileNotFoundError",
    "CheckpointSource",
    "ConversionError",
    "Converter",
    "DuplicateTensorError",
    "MetaTensorsRemainError",
    "NoWeightFilesError",
    "PickleContentError",
    "SafetensorsHeader",
    "ShardIndexError",
    "TensorInfo",
    "TensorNotFoundError",
    "UnsupportedDtypeError",
    "UnsupportedFileError",
    "WeightDtypeError",
    "build_on_meta",
    "conv_to_linear",
    "find_meta_tensors",
    "is_finite",
    "fuse_qkv",
    "linear_to_conv",
    "load_state_dict_into",
    "map_tensors",
    "nonfinite_tensors",
    "read_header",
    "rename_keys",
    "split_qkv",
    "swap_halves",
]
