"""The standard flow-matching units, written once for every family that denoises packed latent tokens.

A family describes its latent layout with a :class:`LatentGeometry` (pack, unpack, ids, grid, channels) and its
unit set with a :class:`FlowFamily` (name prefix, geometry, a few opt-in inputs); :func:`flow_units` then builds
the units every such pipeline shares, named ``<prefix><unit>`` so that records, templates and adapters can anchor
on them. The family keeps only what differs (its prompt encoders, guidance, reference images).

Prepare stage, in anchor order: ``check_size`` -> (the family's ``encode_prompt``) -> ``set_timesteps`` ->
``noise`` -> ``image_ids`` -> ``input_image`` -> ``inpaint_mask``; ``extensions`` (per CFG branch) runs after the
family's ``encode_prompt``. Finish stage: ``decode``.

Shapes, for B images of H x W pixels and a token grid of h x w = H/f x W/f (f = ``LatentGeometry.factor``):

- pixels ``(B, 3, H, W)`` in ``[-1, 1]``;
- latents ``(B, C, p*h, p*w)``: what the pipeline's ``encode_image`` returns and ``decode_latents`` takes
  (``C`` = ``channels``, ``p`` = ``patch``);
- packed tokens ``(B, N, C*p*p)`` with ``N = h*w`` in row-major order: what the DiT denoises;
- ids ``(B, N, axes)`` int64: the tokens' position ids (3 axes for FLUX.1, 4 for FLUX.2).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from PIL import Image

from diffstudio.errors import PipelineInputError, UnitGraphError
from diffstudio.pipeline.images import as_image_list, convert_output, pil_to_tensor, to_rgb
from diffstudio.pipeline.units import InputParam, OutputParam, PipelineUnit
from diffstudio.types import PipelineLike

__all__ = [
    "HOOK_UNIT_INPUTS",
    "STANDARD_UNITS",
    "TILING_INPUTS",
    "FlowFamily",
    "FlowPipeline",
    "LatentGeometry",
    "flow_unit_class",
    "flow_units",
    "gaussian_blur",
    "mask_tokens",
    "tiling_options",
]


class IdsFn(Protocol):
    """Position ids of a target-image token grid: ``(batch, h, w) -> (B, h*w, axes)`` int64, ``t = 0``."""

    def __call__(
        self, batch: int, height: int, width: int, *, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """Return the ids on ``device``."""
        ...


@dataclass(frozen=True)
class LatentGeometry:
    """How a family lays an image out as latents and as DiT tokens, for one pipeline call.

    Built per call from the loaded components (the VAE fixes ``factor``, the DiT or VAE ``channels``).

    Attributes:
        factor: Pixels per token side ``f``: an ``H x W`` image has an ``H/f x W/f`` token grid.
        channels: Latent channels ``C`` (16 for FLUX.1, 128 for FLUX.2).
        pack: Latents ``(B, C, p*h, p*w)`` -> packed tokens ``(B, h*w, C*p*p)``, row-major; a view or one
            rearrangement, never an extra copy.
        unpack: ``(tokens (B, h*w, C*p*p), h, w)`` -> latents ``(B, C, p*h, p*w)``; the inverse of ``pack``.
        ids: ``(batch, h, w, device=...)`` -> target-image ids ``(B, h*w, axes)``; None for a family whose
            denoiser takes no position ids (it then lists no ``image_ids`` unit).
        patch: Latent pixels per token side ``p`` (2 for FLUX.1's 2 x 2 packing; 1 where the VAE folds patches
            into channels itself, as FLUX.2's does).
        noise_in_tokens: Draw each image's seeded noise directly as tokens ``(h*w, C*p*p)`` instead of as latents
            ``(C, p*h, p*w)`` that are then packed (the template SDK's toy does; the FLUX families do not). The two
            give different noise for one seed.
    """

    factor: int
    channels: int
    pack: Callable[[torch.Tensor], torch.Tensor]
    unpack: Callable[[torch.Tensor, int, int], torch.Tensor]
    ids: IdsFn | None = None
    patch: int = 1
    noise_in_tokens: bool = False

    @property
    def token_channels(self) -> int:
        """Channels of a packed token, ``C * p * p``."""
        return self.channels * self.patch * self.patch

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Token grid ``(h, w)`` of an image of ``height x width`` pixels.

        Raises:
            PipelineInputError: A side is not a multiple of ``factor``.
        """
        f = self.factor
        if height % f or width % f:
            raise PipelineInputError(
                f"{height}x{width} is not a multiple of {f} (this VAE's pixels per latent token); pass a height "
                f"and width that are"
            )
        return height // f, width // f

    def noise_shape(self, h: int, w: int) -> tuple[int, ...]:
        """Shape of one image's seeded noise for an ``h x w`` token grid (latents, or tokens, see above)."""
        if self.noise_in_tokens:
            return (h * w, self.token_channels)
        return (self.channels, self.patch * h, self.patch * w)


class FlowPipeline(PipelineLike, Protocol):
    """What the standard units use of a pipeline (``BasePipeline`` plus the family's VAE calls)."""

    scheduler: Any

    def check_size(self, height: int, width: int) -> None:
        """Raise unless both sides are positive multiples of the pipeline's size multiple."""
        ...

    def seeds_for(self, seed: int | None, batch: int) -> list[int]:
        """Per-image seeds ``seed + i``."""
        ...

    def generate_noise(self, shape: Sequence[int], seeds: Sequence[int], rand_device: str = "cpu") -> torch.Tensor:
        """One noise tensor ``(len(seeds), *shape)`` in the pipeline dtype."""
        ...

    def encode_image(self, pixels: torch.Tensor, **tiling: Any) -> torch.Tensor:
        """Pixels ``(B, 3, H, W)`` in ``[-1, 1]`` -> latents ``(B, C, p*h, p*w)`` in the pipeline dtype."""
        ...

    def decode_latents(self, latents: torch.Tensor, **tiling: Any) -> torch.Tensor:
        """Latents ``(B, C, p*h, p*w)`` -> pixels ``(B, 3, H, W)`` in about ``[-1, 1]``."""
        ...


@dataclass(frozen=True)
class FlowFamily:
    """A family's standard unit set: names, latent geometry and the inputs it opts in to.

    Attributes:
        prefix: Prepended to every unit name (``"flux2_"`` gives ``flux2_noise``; ``""`` for the SDK toy).
        geometry: Builds the call's :class:`LatentGeometry` from the pipeline.
        tokens: How descriptions write the packed-token shape (``"(B, L, 64)"``).
        latents: How descriptions write the latent shape (``"(B, 16, H/8, W/8)"``).
        ids: How descriptions write the ids (``"(B, L, 3) ids (0, row, col)"``).
        extra_text_key: Branch key ``extensions`` writes the extra text tokens to (what the DiT call reads).
        vae: The component slot ``input_image`` and ``decode`` onload for ``encode_image`` / ``decode_latents``;
            None for a family without one (the SDK toy decodes by reshaping).
        tiling: ``input_image`` and ``decode`` accept the VAE tiling inputs (``tiled``, ``tile_size``,
            ``tile_stride``) and pass them to ``encode_image`` / ``decode_latents``.
        sigma_shift: ``set_timesteps`` accepts ``sigma_shift`` (a static shift instead of the dynamic one).
        inpaint_blur: ``inpaint_mask`` accepts ``inpaint_blur_size`` / ``inpaint_blur_sigma``.
    """

    prefix: str
    geometry: Callable[[Any], LatentGeometry]
    tokens: str = "(B, N, C)"
    latents: str = "(B, C, h, w)"
    ids: str = "(B, N, axes) ids"
    extra_text_key: str = "extra_txt"
    vae: str | None = "vae"
    tiling: bool = False
    sigma_shift: bool = False
    inpaint_blur: bool = False

    def named(self, unit: str) -> str:
        """The family's name of standard unit ``unit``."""
        return f"{self.prefix}{unit}"

    @property
    def vae_components(self) -> tuple[str, ...]:
        """``components`` of the units that call the VAE."""
        return () if self.vae is None else (self.vae,)


_HEIGHT = InputParam("height", "image height in pixels", True)
_WIDTH = InputParam("width", "image width in pixels", True)

TILING_INPUTS = (
    InputParam("tiled", "VAE in overlapping tiles (large images, less memory)"),
    InputParam("tile_size", "tile side in latent pixels (128)"),
    InputParam("tile_stride", "tile stride in latent pixels (64)"),
)
"""The VAE tiling inputs of a family with ``FlowFamily.tiling`` (for its own VAE units too)."""

HOOK_UNIT_INPUTS = (
    InputParam("timesteps", "(N,) schedule", True),
    _HEIGHT,
    _WIDTH,
    InputParam("call_hooks", "per-call extension hooks installed by earlier units"),
    *TILING_INPUTS,
)
"""What a unit that VAE-encodes a conditioning image and adds a per-call hook (ControlNet, InfiniteYou, Flex.2)
reads besides its own inputs: the schedule, the image size, the hooks installed so far and the VAE tiling."""


def tiling_options(inputs: Mapping[str, Any]) -> dict[str, Any]:
    """``encode_image`` / ``decode_latents`` keywords from the tiling inputs (defaults 128 / 64)."""
    return {
        "tiled": bool(inputs.get("tiled")),
        "tile_size": int(inputs.get("tile_size") or 128),
        "tile_stride": int(inputs.get("tile_stride") or 64),
    }


def mask_tokens(weights: torch.Tensor) -> torch.Tensor:
    """Per-token weights ``(B, 1, h, w)`` at the token grid -> ``(B, h*w, 1)``, row-major (a view)."""
    return weights.flatten(2).transpose(1, 2)


def gaussian_blur(x: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(B, C, H, W)`` with an odd ``size`` kernel and replicate padding."""
    size = size + 1 - size % 2
    coords = torch.arange(size, dtype=torch.float32) - size // 2
    kernel = torch.exp(-(coords**2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).to(x)
    channels = x.shape[1]
    pad = size // 2
    x = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="replicate")
    x = torch.nn.functional.conv2d(x, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, size), groups=channels)
    return torch.nn.functional.conv2d(x, kernel.view(1, 1, -1, 1).expand(channels, 1, size, 1), groups=channels)


class _FlowUnit(PipelineUnit[FlowPipeline]):
    """A standard unit; :func:`flow_unit_class` subclasses it per family (units keep no instance state).

    Class attributes (besides :class:`PipelineUnit`'s):
        unit: The standard name; the family's unit is named ``prefix + unit``.
        anchors: Standard names (or the family's ``encode_prompt``) it runs after, prefixed likewise.
        uses_vae: It calls ``encode_image`` / ``decode_latents``: its ``components`` are the family's VAE slot.
        family: The family it is bound to (set on the per-family subclass).
    """

    unit: ClassVar[str]
    anchors: ClassVar[tuple[str, ...]] = ()
    uses_vae: ClassVar[bool] = False
    family: ClassVar[FlowFamily]

    @classmethod
    def _declare(cls, family: FlowFamily) -> dict[str, Any]:
        """The family's description, inputs and outputs."""
        raise NotImplementedError

    def geometry(self, pipe: FlowPipeline) -> LatentGeometry:
        """The call's latent geometry."""
        return self.family.geometry(pipe)

    def vae_options(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """Tiling keywords for the VAE when the family accepts them, else none."""
        return tiling_options(inputs) if self.family.tiling else {}


class CheckSize(_FlowUnit):
    """Reject sizes that are not positive multiples of the pipeline's ``size_multiple``."""

    unit = "check_size"

    @classmethod
    def _declare(cls, family: FlowFamily) -> dict[str, Any]:
        return {
            "description": "Checks that height and width are positive multiples of the pipeline's size multiple "
            "(16: pixels per latent token).",
            "inputs": (_HEIGHT, _WIDTH),
        }

    def process(self, pipe: FlowPipeline, **inputs: Any) -> Mapping[str, Any]:
        """Raise ``PipelineInputError`` for a wrong size."""
        pipe.check_size(inputs["height"], inputs["width"])
        return {}


class SetTimesteps(_FlowUnit):
    """The scheduler's schedule for this call: shift from the token count (or static ``sigma_shift``)."""

    unit = "set_timesteps"
    anchors = ("check_size",)

    @classmethod
    def _declare(cls, family: FlowFamily) -> dict[str, Any]:
        shift = (
            (InputParam("sigma_shift", "static shift s (sigma -> s sigma / (1 + (s - 1) sigma)) instead of dynamic"),)
            if family.sigma_shift
            else ()
        )
        return {
            "description": "Sets the flow-matching schedule (shift from the token count, strength, explicit sigmas"
            + (", or a static sigma_shift)." if family.sigma_shift else ")."),
            "inputs": (
                InputParam("num_inference_steps", "number of denoising steps", True),
                InputParam("denoising_strength", "image-to-image strength in (0, 1]; 1.0 for text-to-image"),
                InputParam("sigmas", "explicit (N,) unshifted sigmas, overrides the step count"),
                *shift,
                _HEIGHT,
                _WIDTH,
            ),
            "outputs": (OutputParam("timesteps", "(N,) timesteps in [0, 1000]"),),
        }

    def process(self, pipe: FlowPipeline, **inputs: Any) -> Mapping[str, Any]:
        """Set the scheduler's timesteps and return them."""
        sigmas = inputs["sigmas"]
        steps = len(sigmas) if sigmas is not None else inputs["num_inference_steps"]
        h, w = self.geometry(pipe).grid(inputs["height"], inputs["width"])
        mu = None
        shift = inputs.get("sigma_shift")
        if shift is not None:
            if not float(shift) > 0:
                raise PipelineInputError(f"sigma_shift must be a positive number, got {shift!r}")
            mu = math.log(float(shift))  # static shift s == exponential shift mu = ln s
        pipe.scheduler.set_timesteps(
            steps, image_seq_len=h * w, denoising_strength=inputs["denoising_strength"] or 1.0, sigmas=sigmas, mu=mu
        )
        return {"timesteps": pipe.scheduler.timesteps}


class Noise(_FlowUnit):
    """Seeded initial noise (seed + i per image), packed to tokens, or the caller's ``latents``."""

    unit = "noise"
    anchors = ("set_timesteps",)

    @classmethod
    def _declare(cls, family: FlowFamily) -> dict[str, Any]:
        tokens = family.tokens
        return {
            "description": f"Draws seeded noise on rand_device and packs it to {tokens} tokens, or takes latents=.",
            "inputs": (
                InputParam("prompt", "list of B prompts (sets the batch size)", True),
                InputParam("seed", "base seed; None draws one"),
                InputParam("rand_device", "device of the random generator ('cpu' gives the same noise everywhere)"),
                InputParam("latents", f"initial noise {tokens} in token layout"),
                _HEIGHT,
                _WIDTH,
            ),
            "outputs": (
                OutputParam("latents", f"{tokens} noisy tokens"),
                OutputParam("noise", f"{tokens} the initial noise"),
                OutputParam("seeds", "per-image seeds"),
            ),
        }

    def process(self, pipe: FlowPipeline, **inputs: Any) -> Mapping[str, Any]:
        """Draw (or check and take) the initial noise."""
        geometry = self.geometry(pipe)
        batch = len(inputs["prompt"])
        seeds = pipe.seeds_for(inputs["seed"], batch)
        h, w = geometry.grid(inputs["height"], inputs["width"])
        given = inputs["latents"]
        if given is not None:
            expected = (h * w, geometry.token_channels)
            if given.ndim != 3 or tuple(given.shape[1:]) != expected or given.shape[0] not in (1, batch):
                raise PipelineInputError(
                    f"latents= has shape {tuple(given.shape)}; expected (1 or {batch}, {expected[0]}, {expected[1]}) "
                    f"tokens for {batch} image(s) of {inputs['height']}x{inputs['width']}"
                )
            noise = given.to(pipe.device, pipe.torch_dtype).expand(batch, -1, -1)
        else:
            drawn = pipe.generate_noise(geometry.noise_shape(h, w), seeds, inputs["rand_device"] or "cpu")
            noise = drawn if geometry.noise_in_tokens else geometry.pack(drawn)
        return {"latents": noise, "noise": noise, "seeds": seeds}


class ImageIds(_FlowUnit):
    """Position ids of the target-image tokens."""

    unit = "image_ids"
    anchors = ("noise",)

    @classmethod
    def _declare(cls, family: FlowFamily) -> dict[str, Any]:
        return {
            "description": f"Builds the target latent token grid's {family.ids}.",
            "inputs": (InputParam("latents", f"{family.tokens} tokens", True), _HEIGHT, _WIDTH),
            "outputs": (OutputParam("image_ids", f"{family.ids}, int64"),),
        }

    def process(self, pipe: FlowPipeline, **inputs: Any) -> Mapping[str, Any]:
        """Ids for the batch of ``latents``."""
        geometry = self.geometry(pipe)
        if geometry.ids is None:
            raise UnitGraphError(f"unit {self.name}: this family's latent geometry has no position ids")
        h, w = geometry.grid(inputs["height"], inputs["width"])
        return {"image_ids": geometry.ids(inputs["latents"].shape[0], h, w, device=pipe.device)}


def _pixels(images: Sequence[Image.Image], size: tuple[int, int], argument: str) -> torch.Tensor:
    rgb = [to_rgb(img, argument=argument) for img in images]
    resized = [img if img.size == size else img.resize(size, Image.Resampling.LANCZOS) for img in rgb]
    return torch.cat([pil_to_tensor(img, argument=argument) for img in resized])


class InputImage(_FlowUnit):
    """Image-to-image: encode ``input_image`` and start from it, noised to the first sigma."""

    unit = "input_image"
    anchors = ("noise", "set_timesteps")
    uses_vae = True

    @classmethod
    def _declare(cls, family: FlowFamily) -> dict[str, Any]:
        tokens = family.tokens
        return {
            "description": f"VAE-encodes input_image to input_latents {tokens} and noises it to the schedule's start.",
            "inputs": (
                InputParam("input_image", "PIL image (or one per prompt) for image-to-image or training"),
                InputParam("noise", f"{tokens} initial noise", True),
                _HEIGHT,
                _WIDTH,
                *(TILING_INPUTS if family.tiling else ()),
            ),
            "outputs": (
                OutputParam("input_latents", f"{tokens} clean latents of input_image", optional=True),
                OutputParam("latents", f"{tokens} start of denoising", optional=True),
            ),
        }

    def process(self, pipe: FlowPipeline, **inputs: Any) -> Mapping[str, Any]:
        """Encode, pack and noise the input image(s); nothing without one."""
        if inputs["input_image"] is None:
            return {}
        noise = inputs["noise"]
        images = as_image_list(inputs["input_image"], "input_image")
        if len(images) not in (1, noise.shape[0]):
            raise PipelineInputError(f"got {len(images)} input images for {noise.shape[0]} prompts")
        pixels = _pixels(images, (inputs["width"], inputs["height"]), "input_image")
        packed = self.geometry(pipe).pack(pipe.encode_image(pixels, **self.vae_options(inputs)))
        latents = packed.expand(noise.shape[0], -1, -1)
        start = pipe.scheduler.add_noise(latents, noise, float(pipe.scheduler.sigmas[0]))
        return {"input_latents": latents, "latents": start}


class InpaintMask(_FlowUnit):
    """Inpainting: the mask (white = repaint) at the latent token grid, optionally blurred."""

    unit = "inpaint_mask"
    anchors = ("input_image",)

    @classmethod
    def _declare(cls, family: FlowFamily) -> dict[str, Any]:
        blur = (
            (
                InputParam("inpaint_blur_size", "Gaussian blur kernel size in latent cells (odd), 0/None: none"),
                InputParam("inpaint_blur_sigma", "Gaussian blur sigma in latent cells"),
            )
            if family.inpaint_blur
            else ()
        )
        return {
            "description": "Turns inpaint_mask (PIL, white = repaint) into (1, N, 1) weights at the latent token grid.",
            "inputs": (
                InputParam("inpaint_mask", "PIL mask, white where the image is repainted (needs input_image)"),
                *blur,
                InputParam("input_image", "the image being inpainted"),
                _HEIGHT,
                _WIDTH,
            ),
            "outputs": (OutputParam("inpaint_mask", "(1, N, 1) repaint weights in [0, 1]", optional=True),),
        }

    def process(self, pipe: FlowPipeline, **inputs: Any) -> Mapping[str, Any]:
        """The repaint weights per token; nothing without a mask."""
        mask = inputs["inpaint_mask"]
        if mask is None:
            return {}
        if inputs["input_image"] is None:
            raise PipelineInputError("inpaint_mask needs input_image (the picture to repaint)")
        if not isinstance(mask, Image.Image):
            raise PipelineInputError(f"inpaint_mask must be a PIL image, got {type(mask).__name__}")
        h, w = self.geometry(pipe).grid(inputs["height"], inputs["width"])
        rgb = to_rgb(mask, argument="inpaint_mask").resize((w, h), Image.Resampling.BILINEAR)
        grey = pil_to_tensor(rgb, argument="inpaint_mask").mean(1, keepdim=True)
        weights = (grey + 1) / 2  # (1, 1, h, w) in [0, 1]
        size = int(inputs.get("inpaint_blur_size") or 0)
        if size > 1:
            weights = gaussian_blur(weights, size, float(inputs["inpaint_blur_sigma"] or size / 3))
        return {"inpaint_mask": mask_tokens(weights).to(pipe.device, pipe.torch_dtype)}


class Extensions(_FlowUnit):
    """Template-cache inputs the DiT accepts per CFG branch (K/V cache, extra text tokens)."""

    unit = "extensions"
    anchors = ("encode_prompt",)
    per_branch = True

    @classmethod
    def _declare(cls, family: FlowFamily) -> dict[str, Any]:
        return {
            "description": "Passes kv_cache ({'double_i'|'single_i': (K, V)}) and extra_text_embedding to each branch.",
            "inputs": (
                InputParam(
                    "kv_cache", "per-block (K, V) appended after RoPE, each (1|B, L_kv, H, Dh)", per_branch=True
                ),
                InputParam("extra_text_embedding", "(1|B, L_extra, text width) extra text tokens", per_branch=True),
            ),
            "outputs": (
                OutputParam("kv_extension", "the branch's per-block K/V extension", optional=True),
                OutputParam(family.extra_text_key, "the branch's extra text tokens", optional=True),
            ),
        }

    def process(self, pipe: FlowPipeline, **inputs: Any) -> Mapping[str, Any]:
        """The branch's extensions, in the DiT call's vocabulary."""
        out: dict[str, Any] = {}
        if inputs["kv_cache"] is not None:
            out["kv_extension"] = dict(inputs["kv_cache"])
        if inputs["extra_text_embedding"] is not None:
            out[self.family.extra_text_key] = inputs["extra_text_embedding"].to(pipe.device, pipe.torch_dtype)
        return out


class Decode(_FlowUnit):
    """Final tokens -> images in the requested ``output_type``."""

    unit = "decode"
    stage = "finish"
    uses_vae = True

    @classmethod
    def _declare(cls, family: FlowFamily) -> dict[str, Any]:
        return {
            "description": f"Unpacks the final tokens to {family.latents}, VAE-decodes them"
            + (" (optionally tiled)" if family.tiling else "")
            + " and converts them to output_type.",
            "inputs": (
                InputParam("latents", f"{family.tokens} final tokens", True),
                _HEIGHT,
                _WIDTH,
                *(TILING_INPUTS if family.tiling else ()),
                InputParam("output_type", "pil | np | pt | latent"),
                InputParam("single", "one prompt was given: return one image"),
            ),
            "outputs": (OutputParam("output", "the images (or the latents for output_type='latent')"),),
        }

    def process(self, pipe: FlowPipeline, **inputs: Any) -> Mapping[str, Any]:
        """Decode (or return the tokens for ``output_type='latent'``)."""
        latents = inputs["latents"]
        output_type = inputs["output_type"] or "pil"
        if output_type == "latent":
            return {"output": latents}
        geometry = self.geometry(pipe)
        h, w = geometry.grid(inputs["height"], inputs["width"])
        images = pipe.decode_latents(geometry.unpack(latents, h, w), **self.vae_options(inputs))
        return {"output": convert_output(images, output_type, bool(inputs["single"]))}


_UNIT_CLASSES: dict[str, type[_FlowUnit]] = {
    cls.unit: cls for cls in (CheckSize, SetTimesteps, Noise, ImageIds, InputImage, InpaintMask, Extensions, Decode)
}

STANDARD_UNITS: tuple[str, ...] = tuple(_UNIT_CLASSES)
"""The standard units, in anchor order (``extensions`` anchors on the family's ``encode_prompt``)."""

_BOUND: dict[tuple[str, FlowFamily], type[PipelineUnit[Any]]] = {}


def flow_unit_class(name: str, family: FlowFamily) -> type[PipelineUnit[Any]]:
    """The class of standard unit ``name`` for ``family`` (made once; instances take no arguments).

    Raises:
        UnitGraphError: ``name`` is not one of :data:`STANDARD_UNITS` (a mistake in the family's unit list).
    """
    key = (name, family)
    if key not in _BOUND:
        if name not in _UNIT_CLASSES:
            raise UnitGraphError(f"{name!r} is not a standard flow unit; choose from {list(STANDARD_UNITS)}")
        cls = _UNIT_CLASSES[name]
        attributes = {
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
            "family": family,
            "name": family.named(cls.unit),
            "after": tuple(family.named(anchor) for anchor in cls.anchors),
            "components": family.vae_components if cls.uses_vae else (),
        }
        _BOUND[key] = type(cls.__name__, (cls,), {**attributes, **cls._declare(family)})
    return _BOUND[key]


def flow_units(family: FlowFamily, names: Sequence[str] = STANDARD_UNITS) -> list[PipelineUnit[Any]]:
    """Instances of the standard units ``names`` (default: all of :data:`STANDARD_UNITS`) for ``family``.

    Raises:
        UnitGraphError: A name that is not a standard unit.
    """
    return [flow_unit_class(name, family)() for name in names]
