"""The shipped embedded model: the README's first command, and LoRA training on it read back by diffusers.

Skipped (with the reason) in a checkout whose weights have not been built yet (``make shapes-model``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from diffstudio_shapes import model

pytestmark = pytest.mark.skipif(not model.installed(), reason="shapes weights not built (make shapes-model)")


def test_the_readme_command_draws_the_caption_with_its_parameters(tmp_path: Path) -> None:
    from diffstudio.outputs import read_image_metadata
    from diffstudio_shapes.analyse import analyse
    from PIL import Image

    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    done = subprocess.run(
        [sys.executable, "-m", "diffstudio", "run", "a red circle on a blue background", "--out", str(tmp_path),
         "--seed", "0", "--format", "json"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    path = Path(json.loads(done.stdout.splitlines()[-1])["path"])
    parameters, record = read_image_metadata(path)
    assert parameters is not None and "a red circle on a blue background" in parameters
    assert record is not None and record["seed"] == 0
    with Image.open(path) as image:
        assert image.size == (128, 128)
        found = analyse(image.convert("RGB"))
    assert (found.colour, found.background) == ("red", "blue")


def _zigzag_data(folder: Path, count: int = 8) -> Path:
    from diffstudio_shapes.data import write_dataset

    write_dataset(folder, count, 5, 128, shapes=("zigzag",))
    return folder


@pytest.mark.slow
def test_lora_training_lowers_the_loss_and_diffusers_reads_the_file(tmp_path: Path) -> None:
    import torch
    from diffstudio.train import train
    from diffstudio_flux2 import apply_lora
    from diffstudio_flux2.convert import convert_bfl_to_diffusers_dit
    from diffstudio_flux2.loaders import claim
    from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel

    data = _zigzag_data(tmp_path / "data")
    weights = model.WEIGHTS
    result = train(
        dataset_base_path=str(data),
        dataset_metadata_path=str(data / "metadata.csv"),
        model_paths=[str(weights / model.DIT_FILE), str(weights / model.VAE_FILE),
                     str(weights / model.TEXT_ENCODER_FILE)],
        tokenizer_path=str(weights / "tokenizer"),
        height=128, width=128, pipeline_args={"max_sequence_length": 32},
        lora_base_model="dit", lora_target_modules=["qkv", "proj", "linear1", "linear2"], lora_rank=8,
        learning_rate=2e-3, batch_size=4, num_epochs=8, output_path=str(tmp_path / "lora"), seed=3,
    )  # fmt: skip
    first, last = sum(result.losses[:4]) / 4, sum(result.losses[-4:]) / 4
    assert last < first, result.losses
    lora_file = tmp_path / "lora" / "epoch-7.safetensors"

    from diffstudio.loading import Checkpoint

    checkpoint = Checkpoint.open(weights / model.DIT_FILE)
    dit = claim(checkpoint).load(checkpoint, _request())
    params = dit.params
    state = {k: v.float() for k, v in dit.state_dict().items()}
    reference = Flux2Transformer2DModel(
        patch_size=1, in_channels=params.in_channels, num_layers=params.depth,
        num_single_layers=params.depth_single_blocks, attention_head_dim=params.head_dim,
        num_attention_heads=params.num_heads, joint_attention_dim=params.context_in_dim,
        timestep_guidance_channels=256, mlp_ratio=params.mlp_ratio, axes_dims_rope=params.axes_dim,
        rope_theta=params.theta, guidance_embeds=False,
    )  # fmt: skip
    reference.load_state_dict(convert_bfl_to_diffusers_dit(state))
    pipe = Flux2KleinPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=reference)
    pipe.load_lora_weights(str(lora_file))
    apply_lora(dit, str(lora_file), name="zigzag")

    from diffstudio_flux2.math import image_ids, text_ids

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, params.in_channels, generator=gen)
    ctx = torch.randn(2, 32, params.context_in_dim, generator=gen)
    x_ids, ctx_ids = image_ids(2, 8, 8), text_ids(2, 32)
    t = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        ours = dit(x, x_ids, t, ctx, ctx_ids)
        theirs = reference(hidden_states=x, encoder_hidden_states=ctx, timestep=t, img_ids=x_ids,
                           txt_ids=ctx_ids).sample  # fmt: skip
    assert (ours - theirs).abs().max().item() <= 1e-4


def _request():
    import torch
    from diffstudio.config import ModelConfig
    from diffstudio.types import LoadRequest

    return LoadRequest(ModelConfig(path=str(model.WEIGHTS / model.DIT_FILE)), torch.float32, "cpu")
