"""The seed's template scripts (``000-template-model-training``: packaging, then "verify inference") run with only
import and path changes, on the tiny FLUX.2 model with a template published in the local ModelScope cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow


# The seed's step 3 ("Package model files"); changed: the import line and the three paths.
PACKAGING = """
from diffstudio.templates import load_template_model, load_state_dict
from safetensors.torch import save_file
import torch
model = load_template_model("{template}", torch_dtype=torch.bfloat16, device="cpu")
state_dict = load_state_dict("{checkpoint}", torch_dtype=torch.bfloat16, device="cpu")
state_dict.update(model.state_dict())
save_file(state_dict, "{output}")
"""

# The seed's step 5 ("Verify inference"); changed: the imports, device "cuda" -> "cpu" and the model paths.
INFERENCE = """
from diffstudio.templates import TemplatePipeline
from diffstudio_flux2 import Flux2ImagePipeline
from diffstudio import ModelConfig
import torch

# Load base model
pipe = Flux2ImagePipeline.from_pretrained(
    torch_dtype=torch.bfloat16,
    device="cpu",
    model_configs=[
        ModelConfig(path="{text_encoder}"),
        ModelConfig(path="{transformer}"),
        ModelConfig(path="{vae}"),
    ],
    tokenizer_config=ModelConfig(path="{tokenizer}"),
)
# Load Template model
template_pipeline = TemplatePipeline.from_pretrained(
    torch_dtype=torch.bfloat16,
    device="cpu",
    model_configs=[
        ModelConfig(model_id="user_name/your_model_id")
    ],
)
# Generate image
image = template_pipeline(
    pipe,
    prompt="a cat",
    seed=0, cfg_scale=4,
    height=1024, width=1024,
    template_inputs=[{{"scale": 0.9}}],
)
image.save("image.png")
"""


def _run(code: str, cwd: Path, env: dict[str, str]) -> None:
    result = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]


def test_the_seed_packaging_and_inference_scripts_run_with_only_import_and_path_changes(tiny_model, tmp_path):
    from diffstudio.runtime import Runtime
    from diffstudio.templates import export_template
    from diffstudio_brightness.model import BrightnessTemplate
    from safetensors.torch import load_file, save_file

    runtime = Runtime()
    # a trained template as the trainer leaves it: the data-only folder and a checkpoint with the prefix removed
    template = BrightnessTemplate(num_double_blocks=1, num_single_blocks=1, num_heads=2, head_dim=16)
    folder = export_template(template, tmp_path / "trained", runtime=runtime)
    checkpoint = tmp_path / "epoch-1.safetensors"
    save_file({k: v * 3 for k, v in template.state_dict().items()}, str(checkpoint))
    published = tmp_path / "modelscope" / "models" / "user_name" / "your_model_id"
    published.mkdir(parents=True)
    (published / "template.json").write_text((folder / "template.json").read_text())
    env = {**os.environ, "MODELSCOPE_CACHE": str(tmp_path / "modelscope"), "DIFFSTUDIO_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    _run(PACKAGING.format(template=folder, checkpoint=checkpoint, output=published / "model.safetensors"),
         tmp_path, env)  # fmt: skip
    assert json.loads((published / "template.json").read_text())["weights"] == ["model.safetensors"]
    assert sorted(load_file(str(published / "model.safetensors"))) == sorted(template.state_dict())

    root = tiny_model.root
    paths = {"text_encoder": root / "text_encoder", "transformer": tiny_model.dit, "vae": root / "ae.safetensors",
             "tokenizer": root / "tokenizer"}  # fmt: skip
    _run(INFERENCE.format(**paths), tmp_path, env)
    with Image.open(tmp_path / "image.png") as image:
        assert image.size == (1024, 1024)
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    assert pixels.std() > 0
