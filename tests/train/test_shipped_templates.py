"""The recipes of the shipped templates (``diffstudio-brightness``, ``diffstudio-colour-shift``) on the tiny FLUX.2
model: their data generators feed split training, and the trained data-only folders work alone and together."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from diffstudio import ModelConfig
from diffstudio.runtime import Runtime
from diffstudio.templates import TemplatePipeline, export_template
from diffstudio.train import config_from_args, train
from diffstudio_brightness import recipe as brightness_recipe
from diffstudio_brightness.model import BrightnessTemplate
from diffstudio_colour_shift import recipe as colour_recipe
from diffstudio_colour_shift.model import ColourShiftTemplate

pytestmark = pytest.mark.slow

CALL = {"prompt": "a red circle on a blue background", "seed": 1, "height": 64, "width": 64, "num_inference_steps": 2,
        "output_type": "latent", "max_sequence_length": 32}  # fmt: skip


def split_train(recipe: Any, tiny_model: Any, tmp_path: Path, template: Path, name: str) -> Path:
    """Write the recipe's data at 64 px, run both split-training stages for 8 steps; return the exported folder."""
    data = tmp_path / f"{name}-data"
    recipe.write_data(data, 8, seed=0, size=64)
    models, tokenizer = json.loads(tiny_model.model_paths()), tiny_model.root / "tokenizer"
    for task in ("sft:data_process", "sft:train"):
        argv = recipe.train_argv(data, tmp_path / name, models, tokenizer, task=task, steps=8, learning_rate=1e-2,
                                 template=str(template), size=64)  # fmt: skip
        result = train(config_from_args(argv))
    assert result.steps == 8 and len(result.losses) == 8
    return tmp_path / name / "step-8"


def test_the_shipped_recipes_train_both_templates_and_they_combine(tiny_model, tmp_path):
    runtime = Runtime()
    tiny_kv = BrightnessTemplate(num_double_blocks=1, num_single_blocks=1, num_heads=2, head_dim=16)
    tiny_lora = ColourShiftTemplate(double_blocks=1, single_blocks=1, hidden_size=32, rank=2)
    sources = [
        export_template(m, tmp_path / f"initial-{i}", runtime=runtime) for i, m in enumerate((tiny_kv, tiny_lora))
    ]
    trained = [split_train(brightness_recipe, tiny_model, tmp_path, sources[0], "brightness"),
               split_train(colour_recipe, tiny_model, tmp_path, sources[1], "colour")]  # fmt: skip
    for folder, name in zip(trained, ("diffstudio/brightness", "diffstudio/colour-shift")):
        assert json.loads((folder / "template.json").read_text())["template"] == name

    from diffstudio_flux2 import Flux2ImagePipeline

    files = json.loads(tiny_model.model_paths())
    pipe = Flux2ImagePipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu", runtime=runtime, model_configs=[ModelConfig(path=f) for f in files],
        tokenizer_config=ModelConfig(path=str(tiny_model.root / "tokenizer")),
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    base = pipe(**CALL)
    untrained = TemplatePipeline.from_pretrained(device="cpu", model_configs=[str(sources[1])], runtime=runtime)
    assert torch.equal(untrained(pipe, **CALL, template_inputs=[{"colour": "green"}]), base)  # zero-initialised
    both = TemplatePipeline.from_pretrained(device="cpu", model_configs=[str(f) for f in trained], runtime=runtime)
    bright = both(pipe, **CALL, template_inputs=[{"scale": 0.9}])
    green = both(pipe, **CALL, template_inputs=[{"model_id": 1, "colour": "green"}])
    together = both(pipe, **CALL, template_inputs=[{"scale": 0.9}, {"model_id": 1, "colour": "green"}])
    for one in (bright, green):
        assert (one - base).abs().max() > 1e-4
        assert (together - one).abs().max() > 1e-4
