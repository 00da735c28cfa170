"""Acceptance of the shipped templates on the embedded shapes model (``benchmarks/templates_acceptance.py``).

Skipped when the shapes model's weights (``plugins/shapes/src/diffstudio_shapes/weights/``) or the templates'
trained weights are not present: a source checkout before ``scripts/shapes-model.sh`` and the template recipes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from diffstudio.testing import import_file

ROOT = Path(__file__).resolve().parents[2]


def _missing() -> str | None:
    from diffstudio_brightness.plugin import WEIGHTS as BRIGHTNESS
    from diffstudio_colour_shift.plugin import WEIGHTS as COLOUR
    from diffstudio_shapes import model

    if not model.installed():
        return (
            f"the embedded shapes model's weights are absent ({model.WEIGHTS}; build them with scripts/shapes-model.sh)"
        )
    for weights in (BRIGHTNESS, COLOUR):
        if not weights.is_file():
            return f"{weights} is absent (train it with the package's recipe, see its README)"
    return None


pytestmark = [pytest.mark.slow, pytest.mark.skipif(_missing() is not None, reason=str(_missing()))]


@pytest.fixture(scope="module")
def acceptance() -> Any:
    module = import_file(ROOT / "benchmarks" / "templates_acceptance.py")
    return module.Acceptance(prompts=20)


def test_brightness_follows_the_scale_and_the_shape_colours_stay_right(acceptance: Any) -> None:
    figures = acceptance.brightness()
    assert figures["pearson_mean"] >= 0.9, figures
    assert figures["colour_accuracy"] >= 0.8, figures


def test_the_colour_shift_template_recolours_the_shape(acceptance: Any) -> None:
    figures = acceptance.colour_shift()
    assert figures["target_accuracy"] >= 0.8, figures


def test_brightness_and_colour_shift_both_take_effect_at_once(acceptance: Any) -> None:
    figures = acceptance.both()
    assert figures["target_accuracy"] >= 0.8, figures
    assert figures["luminance_gain"] > 5.0, figures  # luma units (0..255), scale 0.9 over 0.1
