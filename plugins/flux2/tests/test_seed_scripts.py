# ruff: noqa: E501  (the scripts keep the long lines of the seed's examples)
"""Scripts written the way the seed 002-flux2-zh.md writes them run unchanged apart from imports and model paths.

Each script is executed as a file (``runpy``) in a fresh working folder, with ``model_id`` values left as the seed
spells them: the test serves the tiny repositories of ``fixtures_pipeline`` from a local Hugging Face cache
(``HF_HUB_CACHE``, offline), so the resolver's normal offline path is what finds them. Besides imports, only the
devices (``"cuda"`` -> ``"cpu"``, ``torch.cuda.mem_get_info`` -> a number) and the image size (the tiny VAE's
latent token covers 4x4 pixels, so 1024x1024 would mean 65536 tokens) differ from the seed.
"""

from __future__ import annotations

import runpy
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
from diffstudio.testing import import_file
from PIL import Image


def _load(name: str) -> ModuleType:
    return import_file(Path(__file__).with_name(f"{name}.py"))


fp = _load("fixtures_pipeline")


@pytest.fixture(scope="module")
def klein(tmp_path_factory: pytest.TempPathFactory, helpers: ModuleType) -> Any:
    return fp.build_repo(tmp_path_factory.mktemp("klein"), "klein", helpers, seed=0)


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory, helpers: ModuleType) -> Any:
    return fp.build_repo(tmp_path_factory.mktemp("dev"), "dev", helpers, seed=3)


def serve_from_hf_cache(root: Path, repo_id: str, repo: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``repo_id`` resolve offline to the tiny repository, as a snapshot in a Hugging Face hub cache."""
    cache = root / "hub"
    model = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = model / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (model / "refs").mkdir()
    (model / "refs" / "main").write_text("0123abcd")
    for part in ("text_encoder", "transformer", "vae", "tokenizer"):
        (snapshot / part).symlink_to(repo.root / part, target_is_directory=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MODELSCOPE_CACHE", str(root / "modelscope"))


def run_script(folder: Path, text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(folder)
    script = folder / "script.py"
    script.write_text(text)
    runpy.run_path(str(script), run_name="__main__")


SEED_QUICKSTART = """
from diffstudio import ModelConfig
from diffstudio_flux2 import Flux2ImagePipeline
import torch

vram_config = {
    "offload_dtype": "disk",
    "offload_device": "disk",
    "onload_dtype": torch.float8_e4m3fn,
    "onload_device": "cpu",
    "preparing_dtype": torch.float8_e4m3fn,
    "preparing_device": "cpu",
    "computation_dtype": torch.bfloat16,
    "computation_device": "cpu",
}
pipe = Flux2ImagePipeline.from_pretrained(
    torch_dtype=torch.bfloat16,
    device="cpu",
    model_configs=[
        ModelConfig(model_id="black-forest-labs/FLUX.2-dev", origin_file_pattern="text_encoder/*.safetensors", **vram_config),
        ModelConfig(model_id="black-forest-labs/FLUX.2-dev", origin_file_pattern="transformer/*.safetensors", **vram_config),
        ModelConfig(model_id="black-forest-labs/FLUX.2-dev", origin_file_pattern="vae/diffusion_pytorch_model.safetensors"),
    ],
    tokenizer_config=ModelConfig(model_id="black-forest-labs/FLUX.2-dev", origin_file_pattern="tokenizer/"),
    vram_limit=8.0,
)
prompt = "High resolution. A dreamy underwater portrait of a serene young woman in a flowing blue dress."
image = pipe(prompt, seed=42, rand_device="cpu", num_inference_steps=50, height=64, width=64)
image.save("image.jpg")
"""


# The klein example of the seed's model table, in the quick start's form: distilled klein (4 steps), klein-base
# style CFG, editing with a reference image, and a LoRA loaded as the seed's LoRA validation scripts do.
KLEIN_SCRIPT = """
from PIL import Image
from diffstudio import ModelConfig
from diffstudio_flux2 import Flux2ImagePipeline
import torch

pipe = Flux2ImagePipeline.from_pretrained(
    torch_dtype=torch.bfloat16,
    device="cpu",
    model_configs=[
        ModelConfig(model_id="black-forest-labs/FLUX.2-klein-4B", origin_file_pattern="text_encoder/*.safetensors"),
        ModelConfig(model_id="black-forest-labs/FLUX.2-klein-4B", origin_file_pattern="transformer/*.safetensors"),
        ModelConfig(model_id="black-forest-labs/FLUX.2-klein-4B", origin_file_pattern="vae/diffusion_pytorch_model.safetensors"),
    ],
    tokenizer_config=ModelConfig(model_id="black-forest-labs/FLUX.2-klein-4B", origin_file_pattern="tokenizer/"),
)
prompt = "Masterpiece, best quality. A small wooden cabin beside a frozen lake at dawn, soft pink sky."
image = pipe(prompt, seed=0, num_inference_steps=4, height=64, width=96)
image.save("image.jpg")
image = pipe(prompt, negative_prompt="blurry, low quality", cfg_scale=4, seed=0, num_inference_steps=3, height=64, width=96)
image.save("image_cfg.jpg")
image = pipe("Make the sky green.", edit_image=[Image.open("image.jpg")], seed=1, num_inference_steps=4, height=64, width=96)
image.save("image_edit.jpg")
pipe.load_lora(pipe.dit, "models/train/FLUX.2-klein-4B_lora/epoch-4.safetensors", alpha=1)
image = pipe(prompt, seed=0, num_inference_steps=4, height=64, width=96)
image.save("image_lora.jpg")
"""


def test_the_seed_quickstart_runs_with_only_imports_device_and_size_changed(
    dev: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """002-flux2-zh.md's quick start (FLUX.2-dev, vram_config with disk offload), model ids unchanged."""
    serve_from_hf_cache(tmp_path, "black-forest-labs/FLUX.2-dev", dev, monkeypatch)
    run_script(tmp_path, SEED_QUICKSTART, monkeypatch)
    with Image.open(tmp_path / "image.jpg") as image:
        assert image.size == (64, 64)


def test_a_klein_script_in_the_seed_style_runs_with_only_imports_and_paths_changed(
    klein: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from diffstudio.lora import LoraWeights
    from diffstudio_flux2.lora import save_lora_file

    serve_from_hf_cache(tmp_path, "black-forest-labs/FLUX.2-klein-4B", klein, monkeypatch)
    gen = torch.Generator().manual_seed(0)
    lora = {  # a DiffSynth-trained LoRA on the single blocks' fused projection, written in DiffSynth's layout
        f"single_blocks.{i}.linear1": LoraWeights(torch.randn(4, 32, generator=gen), torch.randn(288, 4, generator=gen))
        for i in range(2)
    }
    trained = tmp_path / "models" / "train" / "FLUX.2-klein-4B_lora"
    trained.mkdir(parents=True)
    save_lora_file(lora, trained / "epoch-4.safetensors")
    run_script(tmp_path, KLEIN_SCRIPT, monkeypatch)
    pixels = {}
    for name in ("image", "image_cfg", "image_edit", "image_lora"):
        with Image.open(tmp_path / f"{name}.jpg") as image:
            assert image.size == (96, 64)
            pixels[name] = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32))
    for name in ("image_cfg", "image_edit", "image_lora"):
        assert (pixels[name] - pixels["image"]).abs().mean() > 1.0, f"{name} equals the plain image"
