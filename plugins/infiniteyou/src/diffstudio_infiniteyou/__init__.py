"""diffstudio-infiniteyou: InfiniteYou (identity-preserving FLUX.1 generation) for ``FluxImagePipeline``.

Public names (imported lazily): ``Resampler``, ``ResamplerParams``, ``ArcFaceIRSE``, ``FaceDetector``,
``align_face``, ``similarity_transform``, ``draw_keypoints``, ``resize_and_pad``, ``load_file``, ``NoFaceError``,
``FaceStackError``, ``ARCFACE_TEMPLATE``.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "Resampler": "diffstudio_infiniteyou.resampler",
    "ResamplerParams": "diffstudio_infiniteyou.resampler",
    "ArcFaceIRSE": "diffstudio_infiniteyou.arcface",
    "FaceDetector": "diffstudio_infiniteyou.face",
    "align_face": "diffstudio_infiniteyou.face",
    "similarity_transform": "diffstudio_infiniteyou.face",
    "draw_keypoints": "diffstudio_infiniteyou.face",
    "resize_and_pad": "diffstudio_infiniteyou.face",
    "NoFaceError": "diffstudio_infiniteyou.face",
    "FaceStackError": "diffstudio_infiniteyou.face",
    "ARCFACE_TEMPLATE": "diffstudio_infiniteyou.face",
    "load_file": "diffstudio_infiniteyou.loaders",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'diffstudio_infiniteyou' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
