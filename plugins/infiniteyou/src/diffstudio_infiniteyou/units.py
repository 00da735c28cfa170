"""InfiniteYou's units of ``FluxImagePipeline`` and the per-call hook that runs the InfuseNet.

``infiniteyou_face`` (prepare): the identity embedding ``(1, 512)``: ``infinityou_id_embedding`` as given, or
``infinityou_id_image`` -> keypoints (``infinityou_id_keypoints``, else the InsightFace detector in the folder
``infinityou_face_detector``; largest face) -> ArcFace crop (BGR) -> the ``face_recognition`` slot's IR-SE50.

``infiniteyou_prepare`` (prepare, before ``controlnet_prepare``): the identity tokens ``image_proj(embedding)``
``(1, 8, 4096)``, the InfuseNet's control image (the ``controlnet_inputs`` item whose ``controlnet_id`` is the
number of plain ControlNets loaded, i.e. 0 without any; a black image when there is none) VAE-encoded to
condition tokens, and an :class:`InfuseNetHook` in ``call_hooks``. That item leaves ``controlnet_inputs``; the
others stay for diffstudio-controlnet, so a plain ControlNet and the InfuseNet work together.

On every DiT call of the positive branch the hook runs the InfuseNet on the call's noisy latents with its own text
stream (the identity tokens, zero text ids, guidance ``infinityou_guidance``; the pooled vector stays the
prompt's) and returns its residuals, scaled, with diffusers' repeat rule (DiT block ``i`` gets sample
``i // ceil(N_dit / N_infusenet)``). The negative branch gets none (InfiniteYou's true-CFG reference).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffstudio.dit.extensions import DitCall
from diffstudio.errors import MissingPluginError, PipelineInputError
from diffstudio.pipeline.base import BasePipeline
from diffstudio.pipeline.flow_units import HOOK_UNIT_INPUTS, tiling_options
from diffstudio.pipeline.units import InputParam, OutputParam, PipelineUnit
from diffstudio_controlnet.inputs import ControlNetInput, as_controlnet_inputs
from diffstudio_controlnet.model import FluxControlNet
from diffstudio_controlnet.units import ControlNetGroup, ResidualStacks, condition_tokens
from PIL import Image
from torch import Tensor, nn

from diffstudio_infiniteyou.face import FaceDetector, FaceStackError, align_face, crop_tensor, keypoints_array

EMBEDDING_DIM = 512


class InfuseNetHook:
    """Runs the InfuseNet on one DiT call (a :class:`~diffstudio.dit.extensions.CallHook`).

    Args:
        net: The InfuseNet.
        projector: The image projector (called per DiT call while it is being trained, else once).
        embedding: Identity embedding ``(1, 1, 512)``.
        cond: Condition tokens of the control image ``(1, L_img, 64)``.
        guidance: ``infinityou_guidance``.
        item: Scale and active range (``start`` / ``end`` as in diffstudio-controlnet: progress 1 -> 0).
        num_steps: Steps of the schedule.
        depth: The DiT's double and single block counts.
    """

    def __init__(self, net: FluxControlNet, projector: nn.Module, embedding: Tensor, cond: Tensor, guidance: float,
                 item: ControlNetInput, num_steps: int, depth: tuple[int, int]) -> None:  # fmt: skip
        self.net, self.projector = net, projector
        self.embedding, self.cond, self.guidance = embedding, cond, float(guidance)
        self.scale, self.start, self.end = item.scale, item.start, item.end
        self.num_steps, self.depth = num_steps, depth
        self._tokens: Tensor | None = None

    def tokens(self) -> Tensor:
        """Identity tokens ``(1, Q, C_txt)`` (recomputed while the projector trains, so it receives gradients)."""
        training = torch.is_grad_enabled() and any(p.requires_grad for p in self.projector.parameters())
        if self._tokens is None or training:
            tokens: Tensor = self.projector(self.embedding)
            if training:
                return tokens
            self._tokens = tokens
        return self._tokens

    def __call__(self, call: DitCall) -> Mapping[str, Any]:
        """``{"block_residual": ...}`` on the positive branch while active, else ``{}``."""
        progress = (self.num_steps - 1 - call.step_index) / max(self.num_steps - 1, 1)
        if call.branch != "positive" or not self.end <= progress <= self.start or call.y is None:
            return {}
        tokens = self.tokens().to(call.img.device, call.img.dtype)
        ids = torch.zeros(tokens.shape[1], call.txt_ids.shape[-1], device=call.img.device, dtype=call.txt_ids.dtype)
        batch = call.img.shape[0]
        guidance = torch.full((batch,), self.guidance, device=call.img.device, dtype=call.img.dtype)
        out = self.net(call.img, call.img_ids, self.cond.to(call.img.device), tokens, ids, call.timesteps, call.y,
                       guidance, None, self.scale)  # fmt: skip
        return {"block_residual": ResidualStacks([out], *self.depth)}


def as_embedding(value: Any) -> Tensor:
    """``infinityou_id_embedding`` (a tensor, array, list or ``.npy`` / ``.pt``-free path) -> ``(1, 1, 512)`` float32.

    Raises:
        PipelineInputError: Not 512 finite numbers, or an unreadable file.
    """
    if isinstance(value, (str, Path)):
        path = Path(value)
        if path.suffix.lower() != ".npy" or not path.is_file():
            raise PipelineInputError(f"infinityou_id_embedding: {path} is not an existing .npy file (512 numbers)")
        value = np.load(path, allow_pickle=False)
    try:
        tensor = torch.as_tensor(np.asarray(value.detach().cpu() if isinstance(value, Tensor) else value,
                                            dtype=np.float32))  # fmt: skip
    except (TypeError, ValueError) as exc:
        raise PipelineInputError(f"infinityou_id_embedding must be 512 numbers, got {type(value).__name__}") from exc
    if tensor.numel() != EMBEDDING_DIM or not torch.isfinite(tensor).all():
        raise PipelineInputError(
            "infinityou_id_embedding must be 512 finite numbers (the ArcFace embedding), got shape "
            f"{tuple(tensor.shape)}"
        )
    return tensor.reshape(1, 1, EMBEDDING_DIM)


def _image(value: Any, where: str) -> Image.Image:
    if isinstance(value, (str, Path)):
        path = Path(value)
        if not path.is_file():
            raise PipelineInputError(f"{where}: the file {path} does not exist")
        with Image.open(path) as opened:
            return opened.convert("RGB")
    if not isinstance(value, Image.Image):
        raise PipelineInputError(f"{where} must be a PIL image or a path, got {type(value).__name__}")
    return value.convert("RGB")


def face_embedding(pipe: BasePipeline, image: Image.Image, keypoints: Any, detector: Any) -> Tensor:
    """The ArcFace embedding ``(1, 1, 512)`` of the largest face of ``image`` (InfiniteYou's recipe).

    Raises:
        FaceStackError: No keypoints and no detector folder, or no ``face_recognition`` model loaded.
        NoFaceError: The detector finds no face.
    """
    if keypoints is None:
        if detector is None:
            raise FaceStackError(
                "infinityou_id_image needs the face keypoints: pass infinityou_face_detector=<folder holding "
                "models/antelopev2> (InfiniteYou's supports/insightface, with diffstudio-infiniteyou[face]) or "
                "infinityou_id_keypoints=[[x, y] x 5], or pass infinityou_id_embedding instead"
            )
        found = detector if isinstance(detector, FaceDetector) else FaceDetector(detector)
        keypoints = found.detect(image, "infinityou_id_image").keypoints
    points = keypoints_array(keypoints, "infinityou_id_keypoints")
    if not pipe.has("face_recognition"):
        raise FaceStackError(
            "infinityou_id_image needs the ArcFace model: convert recognition_arcface_ir_se50.pth once "
            "(diffstudio convert recognition_arcface_ir_se50.pth arcface.safetensors) and add "
            "ModelConfig(path='arcface.safetensors') to from_pretrained, or pass infinityou_id_embedding"
        )
    bgr = np.ascontiguousarray(np.asarray(image)[:, :, ::-1])
    crop = crop_tensor(align_face(bgr, points))
    model = pipe.face_recognition
    with torch.no_grad():
        embedding: Tensor = model(crop.to(pipe.device))
    return embedding.float().reshape(1, 1, EMBEDDING_DIM)


class InfiniteYouFace(PipelineUnit):
    """The identity embedding from ``infinityou_id_embedding`` or ``infinityou_id_image``."""

    name = "infiniteyou_face"
    description = (
        "The ArcFace identity embedding (1, 1, 512): infinityou_id_embedding as given, or infinityou_id_image -> "
        "5 keypoints (given or detected) -> aligned 112x112 BGR crop -> IR-SE50."
    )
    components = ("face_recognition",)
    optional_components = ("face_recognition",)
    inputs = (
        InputParam("infinityou_id_image", "the identity photo (PIL or path)"),
        InputParam("infinityou_id_embedding", "a precomputed ArcFace embedding (512,)"),
        InputParam("infinityou_id_keypoints", "the photo's 5 face keypoints (x, y), instead of the detector"),
        InputParam("infinityou_face_detector", "the folder holding models/antelopev2 (InsightFace's SCRFD)"),
    )
    outputs = (OutputParam("infinityou_embedding", "(1, 1, 512) identity embedding", optional=True),)

    def process(self, pipe: BasePipeline, **inputs: Any) -> Mapping[str, Any]:
        given, image = inputs["infinityou_id_embedding"], inputs["infinityou_id_image"]
        if given is not None and image is not None:
            raise PipelineInputError("pass infinityou_id_image or infinityou_id_embedding, not both")
        if given is not None:
            return {"infinityou_embedding": as_embedding(given)}
        if image is None:
            return {}
        photo = _image(image, "infinityou_id_image")
        embedding = face_embedding(pipe, photo, inputs["infinityou_id_keypoints"], inputs["infinityou_face_detector"])
        return {"infinityou_embedding": embedding}


def plain_controlnet_count(pipe: BasePipeline) -> int:
    """ControlNets in the ``controlnet`` slot (0, 1 or a group's size): the InfuseNet's ``controlnet_id``."""
    if not pipe.has("controlnet"):
        return 0
    module = pipe.controlnet
    return len(module) if isinstance(module, ControlNetGroup) else 1


def split_inputs(value: Any, infuse_id: int) -> tuple[ControlNetInput | None, list[ControlNetInput]]:
    """The InfuseNet's ``controlnet_inputs`` item (``controlnet_id == infuse_id``) and the others.

    Raises:
        PipelineInputError: Several items for the InfuseNet.
    """
    if value is None:
        return None, []
    items = as_controlnet_inputs(value)
    mine = [item for item in items if item.controlnet_id == infuse_id]
    if len(mine) > 1:
        raise PipelineInputError(
            f"{len(mine)} controlnet_inputs have controlnet_id={infuse_id}, the InfuseNet's; give it one control image"
        )
    return (mine[0] if mine else None), [item for item in items if item.controlnet_id != infuse_id]


class InfiniteYouPrepare(PipelineUnit):
    """Encode the InfuseNet's control image and install its per-call hook."""

    name = "infiniteyou_prepare"
    description = (
        "Identity tokens from the image projector, the InfuseNet's control image (its controlnet_inputs item, or "
        "black) VAE-encoded, and a call hook that adds the InfuseNet's residuals (own text stream) after each block."
    )
    components = ("vae", "image_proj", "infuse_net")
    optional_components = ("vae", "image_proj", "infuse_net")
    after = ("flux1_set_timesteps", "flux1_noise", "flux1_image_ids", "infiniteyou_face")
    before = ("controlnet_prepare",)
    inputs = (
        InputParam("infinityou_embedding", "(1, 1, 512) identity embedding"),
        InputParam("infinityou_guidance", "the InfuseNet's embedded guidance (1.0)"),
        InputParam("controlnet_inputs", "ControlNetInput list; the InfuseNet takes its controlnet_id's item"),
        *HOOK_UNIT_INPUTS,
    )
    outputs = (
        OutputParam("call_hooks", "{name: hook(DitCall)}, with 'infiniteyou' added", optional=True),
        OutputParam("controlnet_inputs", "the items left for the plain ControlNets", optional=True),
    )

    def _check_plain_items(self, pipe: BasePipeline, items: Any) -> None:
        """Items meant for plain ControlNets need diffstudio-controlnet's units (this plugin only reads its own)."""
        if items and not _serves_plain_controlnets(pipe, self):
            raise MissingPluginError("The argument 'controlnet_inputs' (plain ControlNet items)", _CONTROLNET)

    def process(self, pipe: BasePipeline, **inputs: Any) -> Mapping[str, Any]:
        embedding = inputs["infinityou_embedding"]
        if embedding is None:
            self._check_plain_items(pipe, inputs["controlnet_inputs"])
            return {}
        for slot, what in (("infuse_net", "InfuseNetModel folder"), ("image_proj", "image projector")):
            if not pipe.has(slot):
                raise PipelineInputError(
                    f"InfiniteYou inputs were given but no {slot} is loaded; add the {what} of ByteDance/InfiniteYou "
                    "(infu_flux_v1.0/<variant>/...) to from_pretrained (convert image_proj_model.bin once with "
                    "`diffstudio convert`)"
                )
        infuse_id = plain_controlnet_count(pipe)
        item, others = split_inputs(inputs["controlnet_inputs"], infuse_id)
        height, width = int(inputs["height"]), int(inputs["width"])
        if item is None:
            item = ControlNetInput(Image.new("RGB", (width, height), (0, 0, 0)), controlnet_id=infuse_id)
        net: FluxControlNet = pipe.infuse_net
        tiling = tiling_options(inputs)
        cond = condition_tokens(pipe, item, infuse_id, height, width, tiling, net.params.cond_channels)
        dit = pipe.dit
        guidance = 1.0 if inputs["infinityou_guidance"] is None else float(inputs["infinityou_guidance"])
        hook = InfuseNetHook(
            net, pipe.image_proj, embedding.to(pipe.device), cond.to(pipe.device, pipe.torch_dtype), guidance, item,
            len(inputs["timesteps"]), (len(dit.double_blocks), len(dit.single_blocks)),
        )  # fmt: skip
        if not any(p.requires_grad for p in pipe.image_proj.parameters()):
            with torch.no_grad():  # the projector is onloaded for this unit: its tokens are computed here, once
                hook.tokens()
        self._check_plain_items(pipe, others)
        out: dict[str, Any] = {"call_hooks": {**(inputs["call_hooks"] or {}), "infiniteyou": hook}}
        if inputs["controlnet_inputs"] is not None:
            out["controlnet_inputs"] = others or None
        return out


_CONTROLNET = "diffstudio-controlnet"


def _serves_plain_controlnets(pipe: BasePipeline, me: PipelineUnit) -> bool:
    """Whether another unit of ``pipe`` (diffstudio-controlnet's) reads ``controlnet_inputs``."""
    return any(
        unit is not me and any(param.name == "controlnet_inputs" for param in unit.inputs) for unit in pipe.units
    )


def units() -> Sequence[PipelineUnit]:
    """The plugin's units, in order."""
    return [InfiniteYouFace(), InfiniteYouPrepare()]
