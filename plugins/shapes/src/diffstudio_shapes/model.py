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
    "cfg_scale": 6.0,
    "negative_prompt": "",
    "max_sequence_length": 32,
}
"""Call arguments the model was trained for: 128 x 128, 32 text tokens, real CFG at 6 over 20 steps.

CFG 6 is measured (``diffstudio eval-shapes``, 200 held-out captions): shape class 0.285 at 3, 0.345 at 6,
0.38 at 8 (shape colour 1.00 at 3 and 6, 0.98 at 8; 0.80 at 20)."""


def installed(root: Path = WEIGHTS) -> bool:
    """True when every weight file is present under ``root``."""
    files = (DIT_FILE, VAE_FILE, TEXT_ENCODER_FILE, TOKENIZER_FOLDER + "tokenizer.json")
    return all((root / name).is_file() for name in files)
