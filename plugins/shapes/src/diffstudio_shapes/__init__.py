"""diffstudio-shapes: the embedded default model's data set generator and analyser.

Importing this package is cheap (no numpy, PIL or torch): the public names load on first access, so the entry
module (``diffstudio_shapes.plugin``) costs nothing at ``diffstudio`` start-up.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - import-time only for type checkers
    from diffstudio_shapes.analyse import Analysis, analyse, score
    from diffstudio_shapes.data import (
        ALL_SHAPES,
        BASE_SHAPES,
        NEW_SHAPES,
        PALETTE,
        CaptionParts,
        DatasetReport,
        ShapeSpec,
        all_captions,
        caption,
        combinations,
        is_heldout,
        parse_caption,
        read_specs,
        render,
        sample_specs,
        write_dataset,
    )

_LAZY: dict[str, str] = {
    "Analysis": "diffstudio_shapes.analyse",
    "analyse": "diffstudio_shapes.analyse",
    "score": "diffstudio_shapes.analyse",
    **{
        name: "diffstudio_shapes.data"
        for name in (
            "ALL_SHAPES",
            "BASE_SHAPES",
            "NEW_SHAPES",
            "PALETTE",
            "CaptionParts",
            "DatasetReport",
            "ShapeSpec",
            "all_captions",
            "caption",
            "combinations",
            "is_heldout",
            "parse_caption",
            "read_specs",
            "render",
            "sample_specs",
            "write_dataset",
        )
    },
}

__all__ = [
    "ALL_SHAPES",
    "BASE_SHAPES",
    "NEW_SHAPES",
    "PALETTE",
    "Analysis",
    "CaptionParts",
    "DatasetReport",
    "ShapeSpec",
    "all_captions",
    "analyse",
    "caption",
    "combinations",
    "is_heldout",
    "parse_caption",
    "read_specs",
    "render",
    "sample_specs",
    "score",
    "write_dataset",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'diffstudio_shapes' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
