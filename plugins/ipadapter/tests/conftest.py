"""IP-Adapter test fixtures: tiny image encoders (the FLUX.1 helpers and repository are in the root ``conftest.py``)."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import pytest


@pytest.fixture(scope="session")
def encoders(tmp_path_factory: pytest.TempPathFactory, helpers: ModuleType) -> dict[str, Any]:
    """Tiny perturbed CLIP (with projection) and SigLIP vision encoders saved as transformers folders."""
    import transformers

    root = tmp_path_factory.mktemp("image-encoders")
    common = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8}  # fmt: skip
    clip = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(projection_dim=16, **common))
    siglip = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**common))
    out = {}
    for name, model, seed in (("clip", clip, 1), ("siglip", siglip, 2)):
        helpers.perturb(model, seed)
        model.eval().save_pretrained(root / name)
        out[name] = (model, root / name)
    return out
