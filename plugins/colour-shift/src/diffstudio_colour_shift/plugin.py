"""Entry module of diffstudio-colour-shift: registers ``diffstudio/colour-shift`` (no torch at import time).

The trained weights ship in ``weights/colour-shift.safetensors``; without them (a source checkout before the
recipe has run) the template loads with its seeded, untrained initialisation, which leaves images unchanged.
"""

from pathlib import Path

from diffstudio_template_sdk.registration import template, templates_hook

WEIGHTS = Path(__file__).with_name("weights") / "colour-shift.safetensors"

register_templates = templates_hook(
    template(
        "diffstudio/colour-shift",
        "diffstudio_colour_shift.model:ColourShiftTemplate",
        "recolours the shape of the shapes model's images: {'colour': name, 'strength': 1.0}, LoRA tensors",
        weights="diffstudio_colour_shift:weights/colour-shift.safetensors" if WEIGHTS.is_file() else None,
        data_processor="diffstudio_colour_shift.model:ColourShiftData",
    )
)
