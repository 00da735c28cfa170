"""Entry module of diffstudio-brightness: registers ``diffstudio/brightness`` (no torch at import time).

The trained weights ship in ``weights/brightness.safetensors``; a source checkout before the recipe has run has
none, and the template then loads with its seeded, untrained initialisation.
"""

from pathlib import Path

from diffstudio_template_sdk.registration import template, templates_hook

WEIGHTS = Path(__file__).with_name("weights") / "brightness.safetensors"

register_templates = templates_hook(
    template(
        "diffstudio/brightness",
        "diffstudio_brightness.model:BrightnessTemplate",
        "brightness of the shapes model's images: {'scale': s}, s in [0, 1] (0.5 leaves it unchanged), KV cache",
        weights="diffstudio_brightness:weights/brightness.safetensors" if WEIGHTS.is_file() else None,
        data_processor="diffstudio_brightness.model:BrightnessData",
    )
)
