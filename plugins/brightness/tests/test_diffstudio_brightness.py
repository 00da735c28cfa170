"""diffstudio-brightness: the SDK's template conformance checks, the scale checks and the data generator."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffstudio_brightness.model import BrightnessData, BrightnessTemplate
from diffstudio_brightness.recipe import SPAN, brighten, write_data
from diffstudio_template_sdk.testing import TemplateConformance
from PIL import Image


class TestTemplate(TemplateConformance):
    template_class = BrightnessTemplate
    config = {"num_double_blocks": 1, "num_single_blocks": 1, "num_heads": 2, "head_dim": 16}
    example_inputs = [{"scale": 0.2}, {"scale": 0.9}, {}]
    cache_keys = {"kv_cache"}
    plugin_module = "diffstudio_brightness.plugin"
    registered_name = "diffstudio/brightness"


def test_the_default_sizes_are_the_shapes_model_and_scales_outside_0_1_are_refused():
    model = BrightnessTemplate()
    cache = model(**model.process_inputs(scale=0.3))["kv_cache"]
    assert sorted(cache) == ["double_0", "double_1", "single_0", "single_1", "single_2", "single_3"]
    assert tuple(cache["single_3"][0].shape) == (1, 8, 2, 64)
    other = model(**model.process_inputs(scale=0.7))["kv_cache"]
    assert (other["double_0"][1] - cache["double_0"][1]).abs().max() > 0
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            model.process_inputs(scale=bad)
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            BrightnessData()(scale=bad)
    assert torch.equal(BrightnessTemplate().table, model.table)  # seeded: every installation builds the same


def test_the_data_generator_scales_brightness_by_the_row_scale(tmp_path):
    import json

    from diffstudio_shapes.data import render, sample_specs

    metadata = write_data(tmp_path, 6, seed=3, size=64)
    rows = [json.loads(line) for line in metadata.read_text().splitlines()]
    specs = sample_specs(6, 3, split="train")
    assert [r["prompt"] for r in rows] == [s.caption for s in specs]
    scales = [r["template_inputs"]["scale"] for r in rows]
    assert all(0.0 <= s <= 1.0 for s in scales) and len(set(scales)) == 6
    for row, spec in zip(rows, specs):
        image = np.asarray(Image.open(tmp_path / row["image"]), dtype=np.float64)
        original = np.asarray(render(spec, 64), dtype=np.float64)
        factor = 1 + 2 * SPAN * (row["template_inputs"]["scale"] - 0.5)
        np.testing.assert_allclose(image, np.clip(np.round(original * factor), 0, 255), atol=1)
    assert brighten(render(specs[0], 16), 0.5).tobytes() == render(specs[0], 16).tobytes()
