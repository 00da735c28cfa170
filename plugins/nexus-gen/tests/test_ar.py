"""The prefilled AR forward against a direct computation on the same tiny Qwen2.5-VL (embeddings scattered by hand)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from diffstudio.config import ModelConfig
from diffstudio.loading import Checkpoint
from diffstudio.types import LoadRequest
from diffstudio_nexus_gen.ar import MAX_PIXELS, bound_image, editing_messages, generation_messages
from diffstudio_nexus_gen.loaders import claim

TOL = 1e-5


@pytest.fixture(scope="module")
def ar(ar_files: Any) -> Any:
    path = ar_files.folder / "model.safetensors"
    checkpoint = Checkpoint.open(path)
    found = claim(checkpoint)
    assert found is not None and found.component == "nexus_gen" and found.source_format == "legacy"
    return found.load(checkpoint, LoadRequest(ModelConfig(path=str(path)), torch.float32, "cpu"))


def direct(ar_files: Any, processor: Any, prompt: str, reference: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The published recipe spelled out on transformers' own model: positions found one by one, rows copied by hand."""
    model = ar_files.reference.model  # Qwen2_5_VLModel of the Qwen2_5_VLForConditionalGeneration in the files
    messages = editing_messages(prompt) if reference is not None else generation_messages(prompt)
    images = ([bound_image(reference)] if reference is not None else []) + [
        __import__("PIL.Image", fromlist=["Image"]).new("RGB", (252, 252), (255, 255, 255))
    ]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    text = text.replace("<image>", "<|vision_start|><|image_pad|><|vision_end|>")
    batch = processor(text=[text], images=images, padding=True, return_tensors="pt")
    ids, grids = batch["input_ids"], batch["image_grid_thw"]
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)[0].clone()
        per_image = model.get_image_features(batch["pixel_values"], grids, return_dict=True).pooler_output
        image_positions = [i for i, t in enumerate(ids[0].tolist()) if t == model.config.image_token_id]
        target_positions = image_positions[-81:]
        ref_rows = torch.cat(list(per_image[:-1])) if reference is not None else torch.zeros(0, embeds.shape[-1])
        for row, pos in enumerate(image_positions[: len(image_positions) - 81]):
            embeds[pos] = ref_rows[row]
        for row, pos in enumerate(target_positions):
            embeds[pos] = ar_files.prefill[row]
        types = (ids == model.config.image_token_id).int()
        positions, _ = model.get_rope_index(ids, types, image_grid_thw=grids, attention_mask=batch["attention_mask"])
        hidden = model.language_model(inputs_embeds=embeds[None], position_ids=positions,
                                      attention_mask=batch["attention_mask"]).last_hidden_state[0]  # fmt: skip
        predicted = torch.stack([hidden[pos - 1] @ ar_files.vision_head.T for pos in target_positions])
    return predicted, (ref_rows if reference is not None else None)


def test_prefilled_generation_forward_equals_the_direct_computation(ar: Any, ar_files: Any) -> None:
    out = ar("a red circle on a blue background")
    want, _ = direct(ar_files, ar.processor, "a red circle on a blue background", None)
    assert out.target.shape == (81, 32) and out.reference is None
    assert out.grids.tolist() == [[1, 18, 18]]
    torch.testing.assert_close(out.target, want, atol=TOL, rtol=0)


def test_prefilled_editing_forward_equals_the_direct_computation(ar: Any, ar_files: Any, reference_image: Any) -> None:
    out = ar("Add a crown.", reference_image)
    want, want_ref = direct(ar_files, ar.processor, "Add a crown.", reference_image)
    assert out.grids.tolist() == [[1, 6, 8], [1, 18, 18]]  # 84 x 112 pixels: 6 x 8 patches of 14
    assert out.reference is not None and want_ref is not None and out.reference.shape == (12, 32)
    torch.testing.assert_close(out.reference, want_ref, atol=TOL, rtol=0)
    torch.testing.assert_close(out.target, want, atol=TOL, rtol=0)


def test_target_embeddings_depend_on_the_prompt_and_the_prefill(ar: Any) -> None:
    a, b = ar("a cat").target, ar("a dog on the grass").target
    assert (a - b).abs().max() > 1e-3
    with torch.no_grad():
        saved = ar.image_prefill_embeds.weight.clone()
        ar.image_prefill_embeds.weight.mul_(2.0)
        c = ar("a cat").target
        ar.image_prefill_embeds.weight.copy_(saved)
    assert (a - c).abs().max() > 1e-3


def test_reference_is_bounded_to_262640_pixels_in_multiples_of_28() -> None:
    from PIL import Image

    image = bound_image(Image.new("RGB", (1024, 768)))
    assert image.width % 28 == 0 and image.height % 28 == 0
    assert image.width * image.height <= MAX_PIXELS
    assert abs(image.width / image.height - 1024 / 768) < 0.1
