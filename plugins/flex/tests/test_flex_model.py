"""The Flex.2 DiT is a FLUX.1 DiT with 196 input channels: claimed as ``flux1-dit/flex`` from a BFL single file or a
diffusers folder (sizes from its config.json) and equal to diffusers' ``FluxTransformer2DModel`` (<= 1e-5)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

TOL = 1e-5


def _inputs(helpers: Any, fx: Any, seed: int = 0) -> dict[str, Any]:
    from diffstudio_flux1.math import image_ids, text_ids

    gen = torch.Generator().manual_seed(seed)
    return {
        "img": torch.randn(2, 24, 64, generator=gen),
        "img_ids": image_ids(1, 4, 6)[0],
        "txt": torch.randn(2, 7, fx.T5_HIDDEN, generator=gen),
        "txt_ids": text_ids(1, 7)[0],
        "timesteps": torch.rand(2, generator=gen),
        "y": torch.randn(2, fx.CLIP_HIDDEN, generator=gen),
        "guidance": 1.0 + 4.0 * torch.rand(2, generator=gen),
    }


@pytest.mark.parametrize("layout", ["bfl", "diffusers"])
def test_flex_dit_equals_diffusers_with_196_input_channels(flex_repo, helpers, fx, layout):
    model, claim = helpers.load(flex_repo.bfl if layout == "bfl" else flex_repo.folder)
    assert (claim.family, claim.model_type, claim.component) == ("flux1", "flux1-dit/flex", "dit")
    assert claim.source_format == ("bfl" if layout == "bfl" else "diffusers")
    assert (model.in_channels, model.out_channels, model.guidance_embed) == (196, 64, True)
    inp = _inputs(helpers, fx)
    cond = torch.randn(2, 24, 132, generator=torch.Generator().manual_seed(3))
    expected = helpers.run_reference(flex_repo.reference, {**inp, "img": torch.cat([inp["img"], cond], -1)}, True)
    with torch.no_grad():
        got = model(**inp, img_cond=cond)
        zeroed = model(**inp, img_cond=torch.zeros_like(cond))
    diff = (got - expected).abs().max().item()
    assert diff <= TOL, diff
    assert (got - zeroed).abs().max() > 1e-3  # the conditioning channels reach img_in


def test_block_counts_come_from_the_diffusers_config(tmp_path, helpers, fx):
    """Other sizes than the official 8 / 38 blocks: the folder's config.json gives them (3 double, 1 single)."""
    from diffusers import FluxTransformer2DModel

    ref = FluxTransformer2DModel(
        patch_size=1, in_channels=196, out_channels=64, num_layers=3, num_single_layers=1,
        attention_head_dim=helpers.HEAD_DIM, num_attention_heads=helpers.HEADS, joint_attention_dim=fx.T5_HIDDEN,
        pooled_projection_dim=fx.CLIP_HIDDEN, guidance_embeds=True, axes_dims_rope=(8, 12, 12),
    )  # fmt: skip
    helpers.perturb(ref, 7)
    ref.save_pretrained(tmp_path / "transformer")
    assert json.loads((tmp_path / "transformer" / "config.json").read_text())["axes_dims_rope"] == [8, 12, 12]
    model, claim = helpers.load(tmp_path / "transformer")
    assert claim.model_type == "flux1-dit/flex"
    assert (model.params.depth, model.params.depth_single_blocks, model.params.axes_dim) == (3, 1, (8, 12, 12))
    inp = _inputs(helpers, fx, seed=1)
    cond = torch.randn(2, 24, 132, generator=torch.Generator().manual_seed(4))
    expected = helpers.run_reference(ref.eval(), {**inp, "img": torch.cat([inp["img"], cond], -1)}, True)
    with torch.no_grad():
        got = model(**inp, img_cond=cond)
    assert (got - expected).abs().max().item() <= TOL


def test_a_196_channel_dit_without_a_guidance_embedder_is_not_called_flex(tmp_path, helpers, fx):
    ref = helpers.diffusers_dit(False, seed=2, in_channels=196, context=fx.T5_HIDDEN, pooled=fx.CLIP_HIDDEN)
    ref.save_pretrained(tmp_path / "transformer")
    _, claim = helpers.load(tmp_path / "transformer")
    assert claim.model_type == "flux1-dit/custom"
