"""Flex.2 test fixtures: a tiny FLUX.1 repository whose DiT takes 196 input channels (Flex.2's layout).

The FLUX.1 helpers (``fx``, ``helpers``, ``fp``, ``repo``) come from the root ``conftest.py``; the Flex DiT is a
perturbed diffusers ``FluxTransformer2DModel(in_channels=196, guidance_embeds=True)`` of the kit's tiny sizes,
saved as a diffusers folder (``flex-transformer/``) and as a BFL single file (``Flex.2-preview.safetensors``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest


@dataclass
class FlexRepo:
    """The FLUX.1 kit repository plus a Flex DiT in both layouts and its diffusers reference."""

    root: Path
    reference: Any
    bfl: Path
    folder: Path

    def paths(self, dit: str = "bfl") -> list[str]:
        """Model paths for ``from_pretrained``: the Flex DiT (``bfl`` / ``diffusers``) + the kit's VAE and encoders."""
        first = self.bfl if dit == "bfl" else self.folder
        return [str(first), *(str(self.root / n) for n in ("vae", "text_encoder", "text_encoder_2"))]


@pytest.fixture(scope="session")
def flex_repo(repo: Any, helpers: ModuleType, fx: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> FlexRepo:
    """A Flex DiT (196 channels) beside the kit repository's VAE, CLIP and T5."""
    from diffstudio_flux1.convert import convert_diffusers_to_bfl_dit
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("flex")
    ref = helpers.diffusers_dit(True, seed=21, in_channels=196, context=fx.T5_HIDDEN, pooled=fx.CLIP_HIDDEN)
    folder = root / "flex-transformer"
    ref.save_pretrained(folder)
    bfl = root / "Flex.2-preview.safetensors"
    state = convert_diffusers_to_bfl_dit(helpers.read_folder(folder))
    save_file({k: v.contiguous() for k, v in state.items()}, str(bfl))
    for name in ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        (root / name).symlink_to(repo.root / name, target_is_directory=True)
    return FlexRepo(root, ref, bfl, folder)


@pytest.fixture(scope="session")
def flex_pipe(flex_repo: FlexRepo) -> Any:
    """``FluxImagePipeline`` over the Flex repository (fp32, CPU)."""
    import torch
    from diffstudio import ModelConfig
    from diffstudio.runtime import Runtime
    from diffstudio_flux1 import FluxImagePipeline

    pipe = FluxImagePipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu", runtime=Runtime(),
        model_configs=[ModelConfig(path=p) for p in flex_repo.paths()],
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe
