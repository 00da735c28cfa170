"""The InfuseNet: claimed by its folder name, its residuals equal diffusers' FluxControlNetModel fed the identity
tokens, zero text ids and infinityou_guidance, and a full DiT step equals diffusers' FluxTransformer2DModel given
those residuals."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from diffstudio import ModelConfig
from diffstudio.dit.extensions import DitCall
from diffstudio.identify import identify
from diffstudio.runtime import Runtime
from diffstudio_controlnet import ControlNetInput
from diffstudio_infiniteyou.units import InfuseNetHook

TOL_RESIDUAL = 1e-5  # the bound for the InfuseNet's residuals
TOL_STEP = 1e-4  # DESIGN.md section 5, DiT forward


def _call(fx: Any, batch: int = 2, h: int = 3, w: int = 4, step: int = 0, branch: str = "positive") -> DitCall:
    from diffstudio_flux1.math import image_ids, text_ids

    gen = torch.Generator().manual_seed(11)
    return DitCall(
        img=torch.randn(batch, h * w, 64, generator=gen), img_ids=image_ids(1, h, w)[0][None].expand(batch, -1, -1),
        txt=torch.randn(batch, 5, fx.T5_HIDDEN, generator=gen), txt_ids=text_ids(1, 5)[0][None],
        timesteps=torch.rand(batch, generator=gen), y=torch.randn(batch, fx.CLIP_HIDDEN, generator=gen),
        guidance=torch.full((batch,), 3.5), step_index=step, branch=branch,
    )  # fmt: skip


def _hook(net: Any, projector: Any, embedding: torch.Tensor, cond: torch.Tensor, guidance: float = 1.7,
          scale: float = 0.8, start: float = 1.0, end: float = 0.0, steps: int = 4) -> InfuseNetHook:  # fmt: skip
    item = ControlNetInput(None, scale=scale, start=start, end=end)
    return InfuseNetHook(net, projector, embedding, cond, guidance, item, steps, (2, 2))


def test_infusenet_folder_is_claimed_by_this_plugin_and_not_as_a_plain_controlnet(files: Any, tmp_path: Path) -> None:
    _, found = identify(Runtime(), ModelConfig(path=str(files.infusenet_folder)))
    assert (found.plugin, found.model_type, found.component) == ("infiniteyou", "flux1-infiniteyou/infusenet",
                                                                 "infuse_net")  # fmt: skip
    copy = tmp_path / "FLUX.1-dev-Controlnet-plain"
    shutil.copytree(files.infusenet_folder, copy)  # the same tensors in another folder: a plain ControlNet
    _, plain = identify(Runtime(), ModelConfig(path=str(copy)))
    assert (plain.plugin, plain.model_type) == ("controlnet", "flux1-controlnet/plain")


def test_infusenet_residuals_equal_diffusers_fed_identity_tokens(files: Any, helpers: Any, fx: Any) -> None:
    net, _ = helpers.load(files.infusenet_folder)
    call = _call(fx)
    cond = torch.randn(1, 12, 64, generator=torch.Generator().manual_seed(5))
    embedding = torch.randn(1, 1, 512, generator=torch.Generator().manual_seed(6))
    hook = _hook(net, files.projector, embedding, cond)
    with torch.no_grad():
        out = hook(call)["block_residual"].outputs[0]
        tokens = files.projector(embedding)
        double, single = files.infusenet(
            hidden_states=call.img, controlnet_cond=cond.expand(2, -1, -1),
            encoder_hidden_states=tokens.expand(2, -1, -1),
            pooled_projections=call.y, timestep=call.timesteps, img_ids=call.img_ids[0], txt_ids=torch.zeros(8, 3),
            guidance=torch.full((2,), 1.7), conditioning_scale=0.8, return_dict=False,
        )  # fmt: skip
    pairs = list(zip(out.double, double)) + list(zip(out.single, single))
    assert len(pairs) == 2 and tokens.shape == (1, 8, fx.T5_HIDDEN)
    diff = max((a - b).abs().max().item() for a, b in pairs)
    print(f"InfuseNet residual max diff {diff:.2e}")
    assert diff <= TOL_RESIDUAL and min(b.abs().max().item() for _, b in pairs) > 1e-2
    with torch.no_grad():  # the text stream is the identity tokens, not the prompt: the prompt changes nothing
        other = hook(DitCall(**{**call.__dict__, "txt": torch.zeros_like(call.txt)}))["block_residual"].outputs[0]
        moved = _hook(net, files.projector, embedding, cond, guidance=4.0)(call)["block_residual"].outputs[0]
    assert torch.equal(other.double[0], out.double[0])
    assert (moved.double[0] - out.double[0]).abs().max() > 1e-4  # infinityou_guidance reaches the InfuseNet


def test_full_step_equals_diffusers_transformer_with_the_residuals(
    repo: Any, files: Any, helpers: Any, fx: Any
) -> None:
    dit, _ = helpers.load(repo.root / "transformer")
    net, _ = helpers.load(files.infusenet_folder)
    reference = repo.components["transformer"]
    call = _call(fx, h=4, w=6)
    cond = torch.randn(1, 24, 64, generator=torch.Generator().manual_seed(7))
    embedding = torch.randn(1, 1, 512, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        residual = _hook(net, files.projector, embedding, cond)(call)["block_residual"]
        ours = dit(call.img, call.img_ids, call.txt, call.txt_ids, call.timesteps, call.y, call.guidance,
                   block_residual=residual)  # fmt: skip
        double, single = files.infusenet(
            hidden_states=call.img, controlnet_cond=cond.expand(2, -1, -1),
            encoder_hidden_states=files.projector(embedding).expand(2, -1, -1), pooled_projections=call.y,
            timestep=call.timesteps, img_ids=call.img_ids[0], txt_ids=torch.zeros(8, 3), guidance=torch.full((2,), 1.7),
            conditioning_scale=0.8, return_dict=False,
        )  # fmt: skip
        theirs = reference(
            hidden_states=call.img, encoder_hidden_states=call.txt, pooled_projections=call.y, timestep=call.timesteps,
            img_ids=call.img_ids[0], txt_ids=call.txt_ids[0], guidance=call.guidance, controlnet_block_samples=double,
            controlnet_single_block_samples=single, return_dict=False,
        )[0]  # fmt: skip
        plain = dit(call.img, call.img_ids, call.txt, call.txt_ids, call.timesteps, call.y, call.guidance)
    diff = (ours - theirs).abs().max().item()
    print(f"DiT step with InfuseNet residuals max diff {diff:.2e}")
    assert diff <= TOL_STEP and (plain - theirs).abs().max() > 1e-3


@pytest.mark.parametrize(("step", "branch", "start", "end", "active"), [
    (0, "positive", 1.0, 0.0, True), (0, "negative", 1.0, 0.0, False), (0, "positive", 0.5, 0.0, False),
    (3, "positive", 0.5, 0.0, True), (3, "positive", 1.0, 0.5, False),
])  # fmt: skip
def test_hook_acts_on_the_positive_branch_between_start_and_end(
    files: Any, helpers: Any, fx: Any, step: int, branch: str, start: float, end: float, active: bool
) -> None:
    """InfiniteYou's true CFG gives the negative branch no residual; progress runs 1 -> 0 over 4 steps."""
    net, _ = helpers.load(files.infusenet_folder)
    hook = _hook(net, files.projector, torch.randn(1, 1, 512), torch.randn(1, 12, 64), start=start, end=end)
    with torch.no_grad():
        out = hook(_call(fx, step=step, branch=branch))
    assert ("block_residual" in out) == active
