"""Claims and loaders of InfiniteYou's three models (names, shapes and the InfuseNet's folder name only).

* ``flux1-infiniteyou/infusenet`` -> slot ``infuse_net``: a diffusers ``FluxControlNetModel`` folder named
  ``InfuseNetModel`` (or a file / folder whose name contains ``infusenet`` / ``infuse_net``). Its keys are those of a
  plain ControlNet, so diffstudio-controlnet steps aside for such paths (``is_infusenet``) and it is built as that
  plugin's :class:`~diffstudio_controlnet.model.FluxControlNet`.
* ``flux1-infiniteyou/image-proj`` -> slot ``image_proj``: the Resampler (``latents``, ``proj_in``,
  ``layers.{i}.0.to_kv``, ``proj_out``, ``norm_out``), bare or under ``image_proj.`` (the published
  ``image_proj_model.bin`` after ``diffstudio convert``, or opened with ``allow_pickle=True``).
* ``flux1-infiniteyou/arcface-ir-se`` -> slot ``face_recognition``: facexlib's IR-SE ArcFace
  (``input_layer``, ``body.{i}.res_layer``, ``output_layer``), from ``recognition_arcface_ir_se50.pth`` converted
  once (``diffstudio convert``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffstudio.types import LoadRequest, ModelClaim

if TYPE_CHECKING:
    from diffstudio.loading import Checkpoint
    from torch import nn

FAMILY = "flux1"
PROJECTOR_PREFIX = "image_proj."


def claim(checkpoint: Checkpoint) -> ModelClaim | None:
    """The plugin's answer to ``load_model``."""
    names = set(checkpoint.keys())
    if "controlnet_x_embedder.weight" in names:
        from diffstudio_controlnet.loaders import is_infusenet

        if is_infusenet(checkpoint) and ("x_embedder.weight" in names or "img_in.weight" in names):
            source = "diffusers" if "x_embedder.weight" in names else "bfl"
            return ModelClaim(FAMILY, "flux1-infiniteyou/infusenet", "infuse_net", source, load_infuse_net)
        return None
    for prefix in ("", PROJECTOR_PREFIX):
        if {f"{prefix}latents", f"{prefix}proj_in.weight", f"{prefix}layers.0.0.to_kv.weight"} <= names:
            return ModelClaim(FAMILY, "flux1-infiniteyou/image-proj", "image_proj", "infiniteyou", load_image_proj)
    if {"input_layer.0.weight", "body.0.res_layer.1.weight", "output_layer.3.weight"} <= names:
        return ModelClaim(FAMILY, "flux1-infiniteyou/arcface-ir-se", "face_recognition", "facexlib", load_arcface)
    return None


def load_infuse_net(checkpoint: Checkpoint, request: LoadRequest) -> nn.Module:
    """Build the InfuseNet (a :class:`~diffstudio_controlnet.model.FluxControlNet`) from its claimed checkpoint."""
    from diffstudio_controlnet.loaders import load_controlnet

    return load_controlnet(checkpoint, request)


def load_image_proj(checkpoint: Checkpoint, request: LoadRequest) -> nn.Module:
    """Build the :class:`~diffstudio_infiniteyou.resampler.Resampler` (sizes read from the tensors)."""
    from diffstudio.loading import build_on_meta, load_state_dict_into

    from diffstudio_infiniteyou.resampler import Resampler, ResamplerParams

    keys = checkpoint.keys()
    prefix = PROJECTOR_PREFIX if f"{PROJECTOR_PREFIX}latents" in keys else ""
    state = {k[len(prefix) :]: checkpoint.tensor(k) for k in keys if k.startswith(prefix)}
    params = ResamplerParams.from_shapes({k: tuple(v.shape) for k, v in state.items()})
    model = build_on_meta(lambda: Resampler(params))
    load_state_dict_into(model, state, dtype=request.torch_dtype, device=request.device)
    return model.eval().requires_grad_(False)


def load_arcface(checkpoint: Checkpoint, request: LoadRequest) -> nn.Module:
    """Build the :class:`~diffstudio_infiniteyou.arcface.ArcFaceIRSE` embedder (stage sizes from the names)."""
    import torch
    from diffstudio.loading import build_on_meta, load_state_dict_into

    from diffstudio_infiniteyou.arcface import ArcFaceIRSE

    keys = checkpoint.keys()
    units = ArcFaceIRSE.units_from_keys(keys)
    side = int((checkpoint.shape("output_layer.3.weight")[1] // 512) ** 0.5)
    model = build_on_meta(lambda: ArcFaceIRSE(units, crop=side * 16))
    # float32 like the published pipeline (a small model; a bf16 embedding would move the identity tokens)
    dtype = None if request.torch_dtype is None else torch.float32
    load_state_dict_into(model, checkpoint.state_dict(keys), dtype=dtype, device=request.device)
    return model.eval().requires_grad_(False)


def load_file(path: str | Path, *, allow_pickle: bool = False, torch_dtype: Any = None, device: Any = "cpu") -> Any:
    """Load one InfiniteYou model file outside a pipeline (e.g. for ``pipe.set_component``).

    Pickle files (``image_proj_model.bin``, ``recognition_arcface_ir_se50.pth``) go through core's pickle
    policy: refused unless ``allow_pickle=True``, then read with ``torch.load(weights_only=True)``.

    Returns:
        ``(slot, module)``.

    Raises:
        PickleRefusedError: A pickle without ``allow_pickle=True``.
        UnknownCheckpointError: The file is none of InfiniteYou's models.
    """
    import torch
    from diffstudio.config import ModelConfig
    from diffstudio.errors import CheckpointError
    from diffstudio.loading import Checkpoint

    with Checkpoint.open(Path(path), allow_pickle=allow_pickle) as checkpoint:
        found = claim(checkpoint)
        if found is None:
            raise CheckpointError(
                f"{path} is not an InfiniteYou model (an InfuseNetModel folder, the image projector or the IR-SE "
                "ArcFace)"
            )
        request = LoadRequest(ModelConfig(path=str(path)), torch_dtype or torch.float32, str(device))
        return found.component, found.load(checkpoint, request)
