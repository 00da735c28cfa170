"""Flex.2 trains like any FLUX.1 DiT: a full fine-tune and a LoRA (text to image with the default conditions, and with
control images plus the random inpaint-mask / control dropout options) lower a fixed-noise loss."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.slow
POSITIONS = [0, 1, 2, 3]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory, fp: Any) -> Path:
    """Four 32x32 images with control images: ``control.jsonl`` names both, ``plain.jsonl`` the images only."""
    root = tmp_path_factory.mktemp("flex-data")
    rows = []
    for i in range(4):
        fp.image(32, 32, seed=40 + i).save(root / f"{i}.png")
        fp.image(32, 32, seed=60 + i).save(root / f"control-{i}.png")
        rows.append({"prompt": "a red circle", "image": f"{i}.png", "flex_control_image": f"control-{i}.png"})
    (root / "control.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    plain = [{"prompt": r["prompt"], "image": r["image"]} for r in rows]
    (root / "plain.jsonl").write_text("".join(json.dumps(r) + "\n" for r in plain))
    return root


def _options(flex_repo: Any, data: Path, output: Path, control: bool, **extra: Any) -> dict[str, Any]:
    options: dict[str, Any] = {
        "dataset_base_path": str(data),
        "dataset_metadata_path": str(data / f"{'control' if control else 'plain'}.jsonl"),
        "model_paths": flex_repo.paths(), "height": 32, "width": 32, "batch_size": 2, "output_path": str(output),
        "data_file_keys": ["image", "flex_control_image"] if control else ["image"],
        "pipeline_args": {"t5_sequence_length": 16}, "seed": 0,
    }  # fmt: skip
    options.update(extra)
    return options


def _trained_and_untrained(
    options: dict[str, Any], flags: dict[str, float], helpers: ModuleType
) -> tuple[float, float]:
    """Fixed-noise loss on the data set before and after a run trained with ``flags`` (evaluated without them)."""
    from diffstudio.runtime import Runtime
    from diffstudio.train import TrainConfig, Trainer

    before = helpers.loss_and_grads(options, POSITIONS).loss
    trainer = Trainer(TrainConfig(**{**options, "pipeline_args": {**options["pipeline_args"], **flags}}), Runtime())
    trainer.run()
    trainer.config.pipeline_args = dict(options["pipeline_args"])
    return before, helpers.fixed_loss(trainer, POSITIONS)


def test_a_full_flex_fine_tune_with_default_conditions_lowers_the_loss(flex_repo, dataset, tmp_path, train_helpers):
    options = _options(flex_repo, dataset, tmp_path, control=False, trainable_models=["dit"], learning_rate=1e-3,
                       num_epochs=2)  # fmt: skip
    before, after = _trained_and_untrained(options, {}, train_helpers)
    assert after < 0.9 * before, (before, after)


def test_a_flex_lora_with_control_and_random_inpainting_lowers_the_loss(flex_repo, dataset, tmp_path, train_helpers):
    options = _options(flex_repo, dataset, tmp_path, control=True, lora_base_model="dit", lora_rank=4,
                       learning_rate=1e-2, num_epochs=2)  # fmt: skip
    seen: list[torch.Tensor] = []
    from diffstudio_flex import units

    original = units.condition_channels

    def spy(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        seen.append(out[0])
        return out

    units.condition_channels = spy
    try:
        before, after = _trained_and_untrained(
            options, {"flex_random_inpaint": 0.5, "flex_control_dropout": 0.5}, train_helpers
        )
    finally:
        units.condition_channels = original
    assert after < 0.9 * before, (before, after)
    masks = [bool((c[..., 64:68] < 1).any()) for c in seen]  # img_cond: inpaint 64 | mask 4 | control 64
    controls = [bool(c[..., 68:].abs().max() > 0) for c in seen]
    assert any(masks) and not all(masks)  # some samples got a random repaint box, some none
    assert any(controls) and not all(controls)  # some control images were dropped
