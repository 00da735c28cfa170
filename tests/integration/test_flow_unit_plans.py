"""The FLUX families' unit plans keep their names, anchors, order and inputs on core's standard flow units (issue 20.3).

PNG records, templates and adapters name units (``flux1_set_timesteps``, ``flux2_extensions``, ...), so moving the
standard units into :mod:`diffstudio.pipeline.flow_units` must leave every family's plan exactly as it was.
"""

from __future__ import annotations

import importlib

import pytest
from diffstudio.pipeline.units import order_units

FLUX1 = [
    ("flux1_check_size", (), ("height", "width")),
    ("flux1_encode_prompt", ("flux1_check_size",), ("prompt", "t5_sequence_length")),
    ("flux1_extensions", ("flux1_encode_prompt",), ("kv_cache", "extra_text_embedding")),
    ("flux1_set_timesteps", ("flux1_check_size",),
     ("num_inference_steps", "denoising_strength", "sigmas", "sigma_shift", "height", "width")),
    ("flux1_noise", ("flux1_set_timesteps",), ("prompt", "seed", "rand_device", "latents", "height", "width")),
    ("flux1_guidance", ("flux1_noise",), ("embedded_guidance", "noise")),
    ("flux1_image_ids", ("flux1_noise",), ("latents", "height", "width")),
    ("flux1_input_image", ("flux1_noise", "flux1_set_timesteps"),
     ("input_image", "noise", "height", "width", "tiled", "tile_size", "tile_stride")),
    ("flux1_inpaint_mask", ("flux1_input_image",), ("inpaint_mask", "input_image", "height", "width")),
    ("flux1_kontext", ("flux1_image_ids",), ("kontext_images", "tiled", "tile_size", "tile_stride")),
    ("flux1_decode", (), ("latents", "height", "width", "tiled", "tile_size", "tile_stride", "output_type", "single")),
]  # fmt: skip

FLUX2 = [
    ("flux2_check_size", (), ("height", "width")),
    ("flux2_encode_prompt", ("flux2_check_size",), ("prompt", "max_sequence_length")),
    ("flux2_extensions", ("flux2_encode_prompt",), ("kv_cache", "extra_text_embedding")),
    ("flux2_set_timesteps", ("flux2_check_size",),
     ("num_inference_steps", "denoising_strength", "sigmas", "height", "width")),
    ("flux2_noise", ("flux2_set_timesteps",), ("prompt", "seed", "rand_device", "latents", "height", "width")),
    ("flux2_image_ids", ("flux2_noise",), ("latents", "height", "width")),
    ("flux2_edit_images", ("flux2_image_ids",), ("edit_image", "edit_image_auto_resize")),
    ("flux2_input_image", ("flux2_noise", "flux2_set_timesteps"), ("input_image", "noise", "height", "width")),
    ("flux2_inpaint_mask", ("flux2_input_image",),
     ("inpaint_mask", "inpaint_blur_size", "inpaint_blur_sigma", "input_image", "height", "width")),
    ("flux2_reference_kv", ("flux2_edit_images",),
     ("edit_kv_cache", "edit_latents", "edit_image_ids", "edit_kv_timestep")),
    ("flux2_decode", (), ("latents", "height", "width", "output_type", "single")),
]  # fmt: skip

OUTPUTS = {
    "noise": ("latents", "noise", "seeds"),
    "image_ids": ("image_ids",),
    "input_image": ("input_latents", "latents"),
    "inpaint_mask": ("inpaint_mask",),
    "set_timesteps": ("timesteps",),
    "decode": ("output",),
}


@pytest.mark.parametrize(("family", "expected"), [("flux1", FLUX1), ("flux2", FLUX2)])
def test_unit_plan_unchanged_by_core_flow_units(
    family: str, expected: list[tuple[str, tuple[str, ...], tuple[str, ...]]]
) -> None:
    module = importlib.import_module(f"diffstudio_{family}.units")
    plan = order_units(getattr(module, f"{family}_units")())
    assert [(u.name, u.after, tuple(p.name for p in u.inputs)) for u in plan] == expected
    by_name = {u.name: u for u in plan}
    for unit, outputs in OUTPUTS.items():
        assert tuple(p.name for p in by_name[f"{family}_{unit}"].outputs) == outputs
    assert [p.name for p in by_name[f"{family}_extensions"].outputs][0] == "kv_extension"
    assert by_name[f"{family}_decode"].stage == "finish" and by_name[f"{family}_decode"].components == ("vae",)
    assert by_name[f"{family}_extensions"].per_branch
