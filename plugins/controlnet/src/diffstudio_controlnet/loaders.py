"""Detection and loading of FLUX.1 ControlNet checkpoints (what the ``load_model`` hook returns).

Claims are made from tensor names and shapes only:

* a ControlNet has ``controlnet_x_embedder.weight`` and per-block projections ``controlnet_blocks.*`` /
  ``controlnet_single_blocks.*``;
* its trunk is in diffusers' ``FluxControlNetModel`` layout (``x_embedder``, ``transformer_blocks``, ...: the
  InstantX, alimama and jasperai repositories) or in the BFL layout this plugin saves (``img_in``,
  ``double_blocks``, ...: what ``diffstudio train --trainable_models controlnet`` writes);
* the variant: ``union`` with ``controlnet_mode_embedder.weight`` (InstantX Union), ``inpainting`` when the
  condition has 4 channels more than the latents (alimama Inpainting: masked-image latents + packed mask),
  else ``plain`` (jasperai Upscaler, InstantX canny/depth, Shakker and other single-purpose ControlNets).

Checkpoints with an ``input_hint_block`` (pixel-space condition encoders) are claimed and refused with an
error that says so. Everything is built on the meta device and assigned strictly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from diffstudio.errors import CheckpointError
from diffstudio.types import LoadRequest, ModelClaim

if TYPE_CHECKING:
    from diffstudio.loading import Checkpoint
    from torch import Tensor, nn

FAMILY = "flux1"
COMPONENT = "controlnet"
OWN_PREFIXES = (
    "controlnet_blocks.",
    "controlnet_single_blocks.",
    "controlnet_x_embedder.",
    "controlnet_mode_embedder.",
)


class UnsupportedControlNetError(CheckpointError):
    """A FLUX ControlNet checkpoint of a kind this plugin does not run."""


def variant(keys: list[str], shape: Mapping[str, tuple[int, ...]]) -> str:
    """``union``, ``inpainting``, ``hint`` or ``plain`` (see the module docstring)."""
    if any(k.startswith("input_hint_block.") for k in keys):
        return "hint"
    if "controlnet_mode_embedder.weight" in shape:
        return "union"
    image = shape.get("x_embedder.weight") or shape.get("img_in.weight")
    cond = shape["controlnet_x_embedder.weight"]
    if image is not None and cond[1] == image[1] + 4:
        return "inpainting"
    return "plain"


def claim_controlnet(checkpoint: Checkpoint) -> ModelClaim | None:
    """Claim a FLUX.1 ControlNet in the diffusers or the BFL (diffstudio) layout."""
    keys = checkpoint.keys()
    names = set(keys)
    if "controlnet_x_embedder.weight" not in names:
        return None
    if "controlnet_blocks.0.weight" not in names and "controlnet_single_blocks.0.weight" not in names:
        return None
    if is_infusenet(checkpoint):  # same keys as a plain ControlNet, another text stream: diffstudio-infiniteyou's
        return None
    if "x_embedder.weight" in names:
        source = "diffusers"
    elif "img_in.weight" in names:
        source = "bfl"
    else:
        return None
    probes = ("x_embedder.weight", "img_in.weight", "controlnet_x_embedder.weight", "controlnet_mode_embedder.weight")
    shapes = {k: checkpoint.shape(k) for k in probes if k in names}
    return ModelClaim(FAMILY, f"flux1-controlnet/{variant(keys, shapes)}", COMPONENT, source, load_controlnet)


def to_canonical(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Diffusers ``FluxControlNetModel`` keys -> this plugin's (BFL trunk + ControlNet names); BFL input passes.

    Raises:
        ConversionError: A trunk key is not part of the FLUX.1 layout (the FLUX.1 converter's error).
        UnsupportedControlNetError: The FLUX.1 family's converter is not installed.
    """
    if "x_embedder.weight" not in state:
        return dict(state)
    own = {k: v for k, v in state.items() if k.startswith(OWN_PREFIXES)}
    trunk = _trunk_converter()({k: v for k, v in state.items() if k not in own})
    return {**trunk, **own}


TRUNK_CONVERTER = "convert_flux1_dit_diffusers_to_bfl"
"""The registered converter of the ControlNet's trunk (a FLUX.1 DiT's blocks), offered by the FLUX.1 family."""


def _trunk_converter() -> Callable[[Mapping[str, Tensor]], dict[str, Tensor]]:
    """The FLUX.1 family's diffusers -> BFL DiT converter, found through the plugin registry (no family import).

    Raises:
        UnsupportedControlNetError: No installed plugin offers it (diffstudio-flux1 is not installed).
    """
    from diffstudio.runtime import Runtime

    converters = Runtime().hooks.converters()
    if TRUNK_CONVERTER not in converters:
        raise UnsupportedControlNetError(
            f"a diffusers-layout FLUX ControlNet needs the converter {TRUNK_CONVERTER!r}, which the FLUX.1 family "
            "plugin offers; install diffstudio-flux1 (the pipelines ControlNets serve come from it too)"
        )
    converter: Callable[[Mapping[str, Tensor]], dict[str, Tensor]] = converters.get(TRUNK_CONVERTER)
    return converter


def load_controlnet(checkpoint: Checkpoint, request: LoadRequest) -> nn.Module:
    """Build :class:`~diffstudio_controlnet.model.FluxControlNet` from a claimed checkpoint.

    Raises:
        UnsupportedControlNetError: The checkpoint encodes the condition from pixels (``input_hint_block``).
    """
    from diffstudio.loading import build_on_meta, load_state_dict_into

    from diffstudio_controlnet.model import ControlNetParams, FluxControlNet

    keys = checkpoint.keys()
    if any(k.startswith("input_hint_block.") for k in keys):
        raise UnsupportedControlNetError(
            f"{checkpoint.source} is a FLUX ControlNet with an input_hint_block (the condition is encoded from "
            "pixels, as in XLabs-style models); diffstudio-controlnet runs ControlNets whose condition is VAE "
            "latents (InstantX, alimama, jasperai, Shakker). Use a latent-conditioned ControlNet."
        )
    state = to_canonical(checkpoint.state_dict(keys))
    params = ControlNetParams.from_state_dict_shapes({k: tuple(v.shape) for k, v in state.items()})
    model = build_on_meta(lambda: FluxControlNet(params))
    load_state_dict_into(model, state, dtype=request.torch_dtype, device=request.device)
    return model.eval().requires_grad_(False)


INFUSENET_MARKERS = ("infusenet", "infuse_net")
"""Path parts (lower-cased) that mark InfiniteYou's InfuseNet (official folder ``InfuseNetModel/``)."""


def is_infusenet(checkpoint: Checkpoint) -> bool:
    """Whether a ControlNet-shaped checkpoint is InfiniteYou's InfuseNet, told by its path (keys cannot tell).

    The published folder is ``infu_flux_v1.0/<variant>/InfuseNetModel/``; a file or folder whose name contains
    ``infusenet`` / ``infuse_net`` (e.g. what ``--trainable_models infuse_net`` saves) counts too. Such a
    checkpoint is left to diffstudio-infiniteyou, which runs it with the identity tokens as its text.
    """
    from pathlib import Path

    for file in checkpoint.files[:1]:
        path = Path(file)
        if any(marker in part.lower() for part in (path.name, path.parent.name) for marker in INFUSENET_MARKERS):
            return True
    return False
