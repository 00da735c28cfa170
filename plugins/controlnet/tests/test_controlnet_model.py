"""FluxControlNet equals diffusers' FluxControlNetModel; checkpoints are claimed by their keys."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from diffstudio.runtime import Runtime
from diffstudio_controlnet.loaders import to_canonical
from diffstudio_controlnet.units import ResidualStacks
from safetensors.torch import save_file

TOL = 1e-4  # DESIGN.md section 5, DiT forward (oneDNN and MKL sum in different orders: about 1e-5 here)


def _inputs(fx: Any, batch: int = 2, h: int = 3, w: int = 4, txt: int = 5, seed: int = 0) -> dict[str, torch.Tensor]:
    from diffstudio_flux1.math import image_ids, text_ids

    gen = torch.Generator().manual_seed(seed)
    return {
        "img": torch.randn(batch, h * w, 64, generator=gen),
        "img_ids": image_ids(1, h, w)[0],
        "txt": torch.randn(batch, txt, fx.T5_HIDDEN, generator=gen),
        "txt_ids": text_ids(1, txt)[0],
        "timesteps": torch.rand(batch, generator=gen),
        "y": torch.randn(batch, fx.CLIP_HIDDEN, generator=gen),
        "guidance": 1 + 3 * torch.rand(batch, generator=gen),
    }


def _reference(model: Any, inp: dict[str, torch.Tensor], cond: torch.Tensor, **extra: Any) -> tuple[list, list]:
    with torch.no_grad():
        double, single = model(
            hidden_states=inp["img"], controlnet_cond=cond, encoder_hidden_states=inp["txt"],
            pooled_projections=inp["y"], timestep=inp["timesteps"], img_ids=inp["img_ids"], txt_ids=inp["txt_ids"],
            guidance=inp["guidance"], return_dict=False, **extra,
        )  # fmt: skip
    return list(double or []), list(single or [])


def _max_diff(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> float:
    assert len(ours) == len(theirs)
    return max([(a - b).abs().max().item() for a, b in zip(ours, theirs)] or [0.0])


@pytest.mark.parametrize("kind", ["plain", "union", "inpainting"])
def test_block_residuals_equal_diffusers(kind: str, controlnet_files: dict[str, Any], helpers: Any, fx: Any) -> None:
    reference, folder = controlnet_files[kind]
    model, claim = helpers.load(folder)
    assert claim.model_type == f"flux1-controlnet/{kind}" and claim.component == "controlnet"
    assert claim.source_format == "diffusers"
    inp = _inputs(fx)
    cond = torch.randn(1, 12, model.params.cond_channels, generator=torch.Generator().manual_seed(5)).expand(2, -1, -1)
    extra: dict[str, Any] = {}
    mode = None
    if kind == "union":
        mode = torch.tensor([2])
        extra["controlnet_mode"] = torch.tensor([[2], [2]])
    ref_double, ref_single = _reference(reference, inp, cond, conditioning_scale=0.7, **extra)
    with torch.no_grad():
        out = model(inp["img"], inp["img_ids"], cond, inp["txt"], inp["txt_ids"], inp["timesteps"], inp["y"],
                    inp["guidance"], mode, scale=0.7)  # fmt: skip
    diff = max(_max_diff(out.double, ref_double), _max_diff(out.single, ref_single))
    print(f"controlnet {kind} residual max diff {diff:.2e}")
    assert diff <= TOL and min(r.abs().max().item() for r in ref_double + ref_single) > 1e-2
    if kind == "union":  # the mode token matters
        with torch.no_grad():
            other = model(inp["img"], inp["img_ids"], cond, inp["txt"], inp["txt_ids"], inp["timesteps"], inp["y"],
                          inp["guidance"], torch.tensor([0]), scale=0.7)  # fmt: skip
        assert (other.double[0] - out.double[0]).abs().max() > 1e-3


def test_bfl_layout_round_trip_and_claims(controlnet_files: dict[str, Any], helpers: Any, tmp_path: Path) -> None:
    """What the trainer saves (this plugin's own names) loads back, claimed as the same variant."""
    model, _ = helpers.load(controlnet_files["union"][1])
    path = tmp_path / "trained-controlnet.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    again, claim = helpers.load(path)
    assert claim.model_type == "flux1-controlnet/union" and claim.source_format == "bfl"
    for key, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[key])
    assert set(to_canonical(model.state_dict())) == set(model.state_dict())


def test_no_family_claims_a_controlnet_but_this_plugin(controlnet_files: dict[str, Any]) -> None:
    from diffstudio import ModelConfig
    from diffstudio.errors import UnknownCheckpointError
    from diffstudio.identify import identify

    config = ModelConfig(path=str(controlnet_files["plain"][1]))
    _, claim = identify(Runtime(), config)
    assert claim.plugin == "controlnet"
    with pytest.raises(UnknownCheckpointError):
        identify(Runtime(env={"DIFFSTUDIO_DISABLED_PLUGINS": "controlnet"}), config)


def test_hint_block_controlnets_are_refused(tmp_path: Path, helpers: Any) -> None:
    from diffstudio_controlnet.loaders import UnsupportedControlNetError

    tensors = {
        "x_embedder.weight": torch.zeros(64, 64), "controlnet_x_embedder.weight": torch.zeros(64, 64),
        "controlnet_blocks.0.weight": torch.zeros(64, 64), "input_hint_block.0.weight": torch.zeros(16, 3, 3, 3),
    }  # fmt: skip
    save_file(tensors, str(tmp_path / "hint.safetensors"))
    with pytest.raises(UnsupportedControlNetError, match="input_hint_block"):
        helpers.load(tmp_path / "hint.safetensors")


def test_residual_stacks_repeat_to_the_dit_depth() -> None:
    """A stack of 2 samples over 5 DiT blocks: interval ceil(5/2) = 3, so blocks 0-2 get sample 0, 3-4 sample 1."""
    from diffstudio_controlnet.model import ControlNetOutput

    samples = [torch.full((1, 2, 3), float(i)) for i in range(2)]
    a = ResidualStacks([ControlNetOutput(samples, [])], depth=5, depth_single=4)
    b = ResidualStacks([ControlNetOutput(samples, []), ControlNetOutput([torch.ones(1, 2, 3)], [])], 5, 4)
    img = torch.zeros(1, 2, 3)
    assert [a("double", i, img)[0, 0, 0].item() for i in range(5)] == [0, 0, 0, 1, 1]
    assert a("single", 0, img) is None
    assert [b("double", i, img)[0, 0, 0].item() for i in range(5)] == [1, 1, 1, 2, 2]
