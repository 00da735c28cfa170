"""diffstudio-colour-shift: the SDK's template conformance checks, the LoRA layout and the data generator."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffstudio_colour_shift.model import COLOURS, ColourShiftTemplate, lora_targets
from diffstudio_colour_shift.recipe import write_data
from diffstudio_template_sdk.testing import TemplateConformance
from PIL import Image

TINY = {"double_blocks": 1, "single_blocks": 1, "hidden_size": 32, "rank": 2}


class TestTemplate(TemplateConformance):
    template_class = ColourShiftTemplate
    config = TINY
    example_inputs = [{"colour": "green"}, {"colour": "red", "strength": 0.5}]
    cache_keys = {"lora"}
    plugin_module = "diffstudio_colour_shift.plugin"
    registered_name = "diffstudio/colour-shift"


def test_the_cache_selects_the_colour_and_starts_as_no_change():
    model = ColourShiftTemplate(**TINY)
    lora = model(**model.process_inputs(colour="blue"))["lora"]
    targets = lora_targets(1, 1, 32, 3.0, 32)
    assert set(lora) == {f"{p}.lora_{x}.weight" for p in targets for x in "AB"}
    assert tuple(lora["single_blocks.0.linear1.lora_B.weight"].shape) == (3 * 32 + 2 * 96, 2)
    assert all(lora[f"{p}.lora_B.weight"].abs().max() == 0 for p in targets)  # untrained: zero up matrices
    with torch.no_grad():
        for up in model.up:
            up[COLOURS.index("blue")].fill_(1.0)
    blue = model(**model.process_inputs(colour="blue", strength=0.5))["lora"]
    red = model(**model.process_inputs(colour="red"))["lora"]
    assert blue["img_in.lora_B.weight"].unique().tolist() == [0.5]
    assert red["img_in.lora_B.weight"].abs().max() == 0
    with pytest.raises(ValueError, match="unknown colour 'teal'"):
        model.process_inputs(colour="teal")


def test_the_data_generator_draws_the_shape_in_the_target_colour(tmp_path):
    import json

    from diffstudio_shapes.analyse import analyse
    from diffstudio_shapes.data import parse_caption

    metadata = write_data(tmp_path, 8, seed=1, size=64)
    rows = [json.loads(line) for line in metadata.read_text().splitlines()]
    changed = 0
    for row in rows:
        target, words = row["template_inputs"]["colour"], parse_caption(row["prompt"])
        found = analyse(np.asarray(Image.open(tmp_path / row["image"]).convert("RGB")))
        assert found.colour == target and found.background == words.background and target != words.background
        changed += target != words.colour
    assert changed >= 4
