"""The shared Qwen2.5-VL slot: weights in both key layouts, the processor, hidden states, claims, low memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffstudio import ModelConfig, Runtime
from diffstudio.identify import identify
from diffstudio_qwen_vl import (
    ImageTextProcessor,
    QwenVLCheckpointError,
    last_hidden_state,
    load_processor,
    load_qwen_vl,
)
from diffstudio_qwen_vl.processor import ProcessorConfigError
from PIL import Image

KIT = Path(__file__).with_name("vram_kit.py")
MESSAGES = [{"role": "user", "content": [
    {"type": "text", "text": "Describe the picture."}, {"type": "image"}, {"type": "text", "text": "make it blue"},
]}]  # fmt: skip


def _image(seed: int, size: tuple[int, int]) -> Image.Image:
    pixels = (np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype("uint8")
    return Image.fromarray(pixels)


def _batch(processor: Any) -> Any:
    text = processor.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True, add_vision_id=True)
    short = text.replace("make it blue", "blue")
    return processor(text=[text, short], images=[_image(0, (120, 90)), _image(1, (70, 100))], padding=True,
                     return_tensors="pt")  # fmt: skip


@pytest.mark.parametrize("layout", ["legacy", "transformers5"])
def test_last_hidden_states_equal_transformers_qwen2_5_vl_model_from_both_key_layouts(
    qwen_repo: dict[str, Any], qfx: Any, layout: str
) -> None:
    root = qwen_repo["root"]
    model = load_qwen_vl(root / layout)
    processor = load_processor(root / "processor", min_pixels=qfx.MIN_PIXELS, max_pixels=8 * 28 * 28)
    batch = _batch(processor)
    assert batch["attention_mask"].sum(1).tolist()[0] > batch["attention_mask"].sum(1).tolist()[1]  # padded row
    ours = last_hidden_state(model, batch)
    with torch.no_grad():
        keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
        expected = qwen_repo["reference"].model(**{k: batch[k] for k in keys}).last_hidden_state
    assert ours.shape == (2, batch["input_ids"].shape[1], 32)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    without_types = {k: v for k, v in batch.items() if k != "mm_token_type_ids"}  # derived from input_ids
    torch.testing.assert_close(last_hidden_state(model, without_types), expected, atol=1e-5, rtol=0)
    with torch.no_grad():  # the 3-D multimodal positions matter: 1-D positions give other states
        flat = qwen_repo["reference"].model(**{k: batch[k] for k in keys[:4]}).last_hidden_state
    assert (flat - expected).abs().max() > 1e-3


def test_processor_equals_transformers_qwen2_5_vl_processor_on_the_same_files(
    qwen_repo: dict[str, Any], qfx: Any
) -> None:
    """Without torchvision AutoProcessor cannot build the video half; the fallback must match the real class.

    The oracle is transformers' ``Qwen2_5_VLProcessor`` itself, built over the same tokenizer and image processor
    with its class check bypassed (it refuses a missing video processor only in that check).
    """
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLProcessor

    folder = qwen_repo["root"] / "processor"
    ours = load_processor(folder, min_pixels=qfx.MIN_PIXELS, max_pixels=8 * 28 * 28)
    if not isinstance(ours, ImageTextProcessor):
        pytest.skip("AutoProcessor builds the real processor here (torchvision installed)")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    images = AutoImageProcessor.from_pretrained(folder, min_pixels=qfx.MIN_PIXELS, max_pixels=8 * 28 * 28)
    original = Qwen2_5_VLProcessor.check_argument_for_proper_class
    try:
        Qwen2_5_VLProcessor.check_argument_for_proper_class = lambda self, name, arg: None  # type: ignore[method-assign]
        oracle = Qwen2_5_VLProcessor(image_processor=images, tokenizer=tokenizer, video_processor=None,
                                     chat_template=qfx.CHAT_TEMPLATE)  # fmt: skip
    finally:
        Qwen2_5_VLProcessor.check_argument_for_proper_class = original  # type: ignore[method-assign]
    text = ours.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True, add_vision_id=True)
    assert text == oracle.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True, add_vision_id=True)
    assert "Picture 1: <|vision_start|><|image_pad|><|vision_end|>" in text
    got, want = _batch(ours), _batch(oracle)
    assert sorted(got) == sorted(want)
    for key in got:
        assert torch.equal(got[key], want[key]), key


def test_pixel_bounds_are_set_per_caller(qwen_repo: dict[str, Any], qfx: Any) -> None:
    folder = qwen_repo["root"] / "processor"
    image = _image(2, (400, 300))
    small = load_processor(folder, min_pixels=qfx.MIN_PIXELS, max_pixels=4 * 28 * 28)
    large = load_processor(folder, min_pixels=qfx.MIN_PIXELS, max_pixels=16 * 28 * 28)
    grid_small = small.image_processor(images=[image], return_tensors="pt")["image_grid_thw"]
    grid_large = large.image_processor(images=[image], return_tensors="pt")["image_grid_thw"]
    assert int(grid_small.prod()) <= 4 * 4 < int(grid_large.prod()) <= 16 * 4


def test_claims_qwen_vl_in_both_layouts_for_the_shared_slot(qwen_repo: dict[str, Any]) -> None:
    runtime = Runtime()
    for layout in ("legacy", "transformers5"):
        checkpoint, claim = identify(runtime, ModelConfig(path=str(qwen_repo["root"] / layout)))
        with checkpoint:
            assert (claim.family, claim.model_type, claim.component, claim.source_format) == (
                "qwen-vl", "qwen2.5-vl", "qwen_vl", layout)  # fmt: skip


def test_missing_config_and_wrong_files_are_typed_errors(qwen_repo: dict[str, Any], tmp_path: Path) -> None:
    from safetensors.torch import save_file

    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "model.safetensors").write_bytes((qwen_repo["root"] / "legacy" / "model.safetensors").read_bytes())
    with pytest.raises(QwenVLCheckpointError, match="config.json"):
        load_qwen_vl(bare)
    save_file({"x.weight": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(QwenVLCheckpointError, match="not a Qwen2.5-VL"):
        load_qwen_vl(tmp_path / "other.safetensors")
    with pytest.raises(ProcessorConfigError, match="preprocessor_config.json"):
        load_processor(tmp_path)


def test_config_override_reaches_the_loader(qwen_repo: dict[str, Any]) -> None:
    root = qwen_repo["root"]
    config = json.loads((root / "legacy" / "config.json").read_text())
    model = load_qwen_vl(root / "legacy" / "model.safetensors", config=config)
    assert model.config.text_config.hidden_size == 32


def _child(repo: Path, name: str) -> dict[str, Any]:
    env = {**{k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}, "OMP_NUM_THREADS": "1",
           "DIFFSTUDIO_ONEDNN_LINEAR": "0"}  # fmt: skip
    done = subprocess.run([sys.executable, str(KIT), "--child", name, "--repo", str(repo)], capture_output=True,
                          text=True, timeout=300, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    figures: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return figures


@pytest.mark.slow
def test_disk_offload_keeps_rss_under_0_3_of_resident(tmp_path_factory: pytest.TempPathFactory) -> None:
    """RssAnon above the post-import baseline, one process per configuration (a 57 MiB float32 model)."""
    import vram_kit

    repo = vram_kit.build_repo(tmp_path_factory.mktemp("qwen_vl_vram"))
    runs = {name: _child(repo, name) for name in ("resident", "disk")}

    def above(name: str, key: str) -> float:
        return float(runs[name][key] - runs[name]["rss_anon_base_mib"])

    assert runs["disk"]["strategy"] == "layerwise"
    assert above("resident", "rss_anon_after_load_mib") > 50
    for key in ("rss_anon_after_load_mib", "rss_anon_peak_mib"):
        assert above("disk", key) < 0.3 * above("resident", key), (key, runs)
