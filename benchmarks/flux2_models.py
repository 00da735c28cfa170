"""Model folders for benchmarks/flux2.py: a medium FLUX.2 DiT (about 250M parameters) and a tiny klein repository.

Both are written once under the output folder and reused (a ``spec.json`` records what was built). The medium
repository is a diffusers pipeline folder (``model_index.json``, ``transformer/``, ``vae/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``) plus ``flux2.safetensors``, the same DiT in BFL single-file names. The text
encoder, tokenizer and VAE are the tiny ones of the plugin's tests (a Qwen3 of width 32 with 30 layers, so the
DiT's context width is 96; a 2-level VAE whose latent token covers 4x4 pixels).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from diffstudio.testing import import_file

TESTS = Path(__file__).resolve().parents[1] / "plugins" / "flux2" / "tests"
TEXT_WIDTH = 96  # 3 stacked Qwen3 hidden states of width 32
LATENT_CHANNELS = 32  # the test VAE: 8 channels x 2x2 patchify
PIXELS_PER_TOKEN = 4


@dataclass(frozen=True)
class Size:
    """DiT and workload size: ``hidden = heads * 128``; image tokens are a square grid."""

    name: str
    heads: int
    depth: int
    depth_single: int
    image_tokens: int
    text_tokens: int

    @property
    def hidden(self) -> int:
        return self.heads * 128

    @property
    def side(self) -> int:
        """Image side in pixels for ``image_tokens`` with the test VAE."""
        grid = int(round(self.image_tokens**0.5))
        assert grid * grid == self.image_tokens, "image_tokens must be a square"
        return grid * PIXELS_PER_TOKEN


SIZES = {
    # about 237M parameters, 1024 image + 512 text tokens
    "medium": Size("medium", heads=8, depth=3, depth_single=10, image_tokens=1024, text_tokens=512),
    # a couple of minutes in all on two threads
    "quick": Size("quick", heads=4, depth=1, depth_single=4, image_tokens=256, text_tokens=128),
    # the start-up figure's "small models" (about 1.5M parameters)
    "small": Size("small", heads=1, depth=1, depth_single=2, image_tokens=1024, text_tokens=512),
}


def fixtures(name: str) -> ModuleType:
    """Import one of the plugin's test helper modules (``conftest``, ``fixtures_text``, ``fixtures_pipeline``)."""
    return import_file(TESTS / f"{name}.py")


def medium_transformer(size: Size, seed: int = 0) -> Any:
    """A perturbed diffusers ``Flux2Transformer2DModel`` of ``size`` (klein-style: no guidance embedder)."""
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    model = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=LATENT_CHANNELS,
        num_layers=size.depth,
        num_single_layers=size.depth_single,
        attention_head_dim=128,
        num_attention_heads=size.heads,
        joint_attention_dim=TEXT_WIDTH,
        timestep_guidance_channels=256,
        mlp_ratio=3.0,
        axes_dims_rope=(32, 32, 32, 32),
        rope_theta=2000,
        guidance_embeds=False,
    )
    fixtures("conftest").perturb(model, seed)
    return model.eval()


def _reuse(folder: Path, spec: dict[str, Any]) -> bool:
    marker = folder / "spec.json"
    return marker.is_file() and json.loads(marker.read_text()) == spec


def _publish(partial: Path, folder: Path, spec: dict[str, Any]) -> Path:
    (partial / "spec.json").write_text(json.dumps(spec))
    if folder.exists():
        shutil.rmtree(folder)
    partial.rename(folder)
    return folder


def build_repository(out: Path, size: Size) -> Path:
    """Write (once) the repository of ``size`` under ``out``; return its folder."""
    from diffstudio_flux2.convert import convert_diffusers_to_bfl_dit
    from diffstudio_flux2.text_encoders import load_tokenizer
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
    from safetensors.torch import save_file

    spec = {"version": 1, **asdict(size)}
    folder = out / f"flux2-{size.name}"
    if _reuse(folder, spec):
        return folder
    out.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=out))
    text, helpers, pipeline = fixtures("fixtures_text"), fixtures("conftest"), fixtures("fixtures_pipeline")
    scratch = partial / "scratch"
    vocab = text.build_qwen3_tokenizer(scratch / "tokenizer")
    encoder = text.build_qwen3_encoder(scratch / "text_encoder", vocab, seed=0)
    helpers.diffusers_vae(seed=20).save_pretrained(scratch / "vae")
    reference = Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**pipeline.SCHEDULER_CONFIG),
        vae=AutoencoderKLFlux2.from_pretrained(str(scratch / "vae")).eval(),
        text_encoder=encoder,
        tokenizer=load_tokenizer(scratch / "tokenizer", "qwen3"),
        transformer=medium_transformer(size),
    )
    reference.save_pretrained(partial)
    shutil.rmtree(scratch)
    state = helpers.read_folder(partial / "transformer")
    bfl = convert_diffusers_to_bfl_dit(state)
    save_file({k: v.contiguous() for k, v in bfl.items()}, str(partial / "flux2.safetensors"))
    return _publish(partial, folder, spec)


def parameter_count(folder: Path) -> int:
    """Parameters of the DiT in ``folder`` (read from the BFL file's header)."""
    from diffstudio.loading import Checkpoint

    with Checkpoint.open(folder / "flux2.safetensors") as checkpoint:
        total = 0
        for key in checkpoint.keys():
            count = 1
            for dim in checkpoint.shape(key):
                count *= dim
            total += count
        return total
