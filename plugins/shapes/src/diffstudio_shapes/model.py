"""Where the embedded model's files live and how it is run by default (no torch import)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

MODEL_ID = "diffstudio/shapes"
WEIGHTS = Path(__file__).with_name("weights")
"""The shipped files: ``flux2-shapes.safetensors`` (DiT, BFL layout), ``ae.safetensors`` (VAE, BFL layout),
``text_encoder/`` and ``tokenizer/`` (transformers layout)."""

DIT_FILE = "flux2-shapes.safetensors"
VAE_FILE = "ae.safetensors"
TEXT_ENCODER_FILE = "text_encoder/model.safetensors"
TOKENIZER_FOLDER = "tokenizer/"

DEFAULTS: dict[str, Any] = {
    "height": 128,
    "width": 128,
    "num_inference_steps": 20,
    "cfg_scale": 3.0,
    "negative_prompt": "",
    "max_sequence_length": 32,
}
"""Call arguments the model was trained for: 128 x 128, 32 text tokens, real CFG at 3 over 20 steps.

The scale was chosen on 200 held-out captions of another draw than the documented evaluation's (``eval-shapes
--seed 2``): shape class 0.88 at CFG 2, 0.87 at 3, 0.845 at 4, 0.76 at 6, 0.725 at 8 (30 steps instead of 20 at
CFG 3: 0.855); shape colour 1.00 up to CFG 4, 0.985 at 6, 0.945 at 8."""


def model_files(root: str | Path = WEIGHTS) -> list[str]:
    """The DiT, VAE and text encoder files under ``root`` (the ``model`` list of ``run`` / ``--model_paths``)."""
    folder = Path(root)
    return [str(folder / name) for name in (DIT_FILE, VAE_FILE, TEXT_ENCODER_FILE)]


def installed(root: Path = WEIGHTS) -> bool:
    """True when every weight file is present under ``root``."""
    files = (DIT_FILE, VAE_FILE, TEXT_ENCODER_FILE, TOKENIZER_FOLDER + "tokenizer.json")
    return all((root / name).is_file() for name in files)
