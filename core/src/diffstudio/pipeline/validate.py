"""Checks of pipeline call arguments, run before any compute: types, finite numbers, sizes and limits.

The validity spec (what :func:`check_prompts` and :func:`check_values` accept; anything else is a
:class:`~diffstudio.errors.PipelineInputError` naming the argument, or a
:class:`~diffstudio.errors.LimitExceededError` naming the limit and its override):

- ``prompt``: a ``str`` or a non-empty list/tuple of ``str`` (at most ``limits.max_batch``), encodable as UTF-8.
- ``negative_prompt``: ``None`` (the same as ``""``: no negative prompt, as in diffusers), a ``str``, or a
  list/tuple of ``str`` with one entry per prompt.
- ``seed``: ``None`` (a random seed, recorded) or an ``int`` (not ``bool``) with ``0 <= seed`` and
  ``seed + images - 1 < 2**64``.
- ``height`` / ``width``: positive ``int`` (multiples of the family's ``size_multiple``, checked by its units),
  ``height * width <= limits.max_pixels``.
- ``num_inference_steps``: ``int`` in ``[1, limits.max_steps]`` (``None`` where the family has a default).
- ``sigmas``: ``None`` or 1 to ``limits.max_steps`` finite numbers (a sequence or a 1-D tensor).
- ``max_sequence_length`` / ``t5_sequence_length``: ``int`` in ``[1, limits.max_sequence_length]``.
- ``cfg_scale``, ``embedded_guidance``: finite real numbers; ``denoising_strength`` in ``(0, 1]``;
  ``sigma_shift`` and ``inpaint_blur_sigma`` finite and ``> 0``; ``edit_kv_timestep`` in ``[0, 1]``.
- ``inpaint_blur_size``, ``tile_size``, ``tile_stride``: non-negative / positive ``int``.
- ``tiled``, ``edit_image_auto_resize``, ``edit_kv_cache``: ``bool``.
- ``rand_device``: a device string or :class:`torch.device` a :class:`torch.Generator` can run on.
- ``latents``: ``None`` or a finite floating-point tensor.
- ``output_type``: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.
- Every PIL image argument (alone or in a list): both sides ``>= 1`` and ``width * height <=
  limits.max_input_pixels``, read from ``Image.size`` before any pixel is decoded.

:func:`ensure_finite` is the output check: the pipeline runs it on the latents after the first denoising step
and after the last one, and on the decoded images, and raises
:class:`~diffstudio.errors.NonFiniteOutputError` when the model produced NaN or Inf.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from diffstudio.errors import NonFiniteOutputError, PipelineInputError
from diffstudio.pipeline.limits import Limits

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
PROMPT_TYPES = "a str or a non-empty list of str"
SEED_END = 2**64

#: Real-valued arguments: name -> (lowest, lowest allowed?, highest, highest allowed?) or None for any finite.
_REALS: dict[str, tuple[float, bool, float, bool] | None] = {
    "cfg_scale": None,
    "embedded_guidance": None,
    "denoising_strength": (0.0, False, 1.0, True),
    "sigma_shift": (0.0, False, math.inf, False),
    "inpaint_blur_sigma": (0.0, False, math.inf, False),
    "edit_kv_timestep": (0.0, True, 1.0, True),
}
#: Integer arguments: name -> smallest allowed value.
_INTS = {"inpaint_blur_size": 0, "tile_size": 1, "tile_stride": 1}
_BOOLS = ("tiled", "edit_image_auto_resize", "edit_kv_cache")
_SEQUENCE_LENGTHS = ("max_sequence_length", "t5_sequence_length")


def _kind(value: object) -> str:
    name = type(value).__name__
    return f"an {name}" if name[:1].lower() in "aeiou" else f"a {name}"


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_prompts(prompt: Any, negative_prompt: Any, limits: Limits) -> tuple[str | list[str], str | list[str]]:
    """Check ``prompt`` and ``negative_prompt`` (see the module docstring) and return them normalised.

    Returns:
        ``(prompt, negative_prompt)``: a ``str`` stays a ``str``, a tuple becomes a list, ``None`` negative
        becomes ``""``.

    Raises:
        PipelineInputError: A wrong type, an empty list, a string that is not valid Unicode, or one negative
            prompt per prompt expected but another count given.
        LimitExceededError: More prompts than ``limits.max_batch``.
    """
    prompts = _prompt_list(prompt, "prompt")
    if not prompts:
        raise PipelineInputError(f"prompt=[] holds no prompt; pass {PROMPT_TYPES}")
    limits.check("max_batch", len(prompts), "the number of prompts")
    if negative_prompt is None:
        negative_prompt = ""
    negatives = _prompt_list(negative_prompt, "negative_prompt")
    if not isinstance(negative_prompt, str) and len(negatives) != len(prompts):
        raise PipelineInputError(
            f"negative_prompt has {len(negatives)} entries for {len(prompts)} prompts; pass one str for all of "
            f"them or one per prompt"
        )
    return (
        prompt if isinstance(prompt, str) else prompts,
        negative_prompt if isinstance(negative_prompt, str) else negatives,
    )


def _prompt_list(value: Any, name: str) -> list[str]:
    items = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else None
    if items is None:
        raise PipelineInputError(f"{name}={_short(value)} is {_kind(value)}; pass {PROMPT_TYPES}")
    for index, item in enumerate(items):
        where = name if isinstance(value, str) else f"{name}[{index}]"
        if not isinstance(item, str):
            raise PipelineInputError(f"{where}={_short(item)} is {_kind(item)}; pass {PROMPT_TYPES}")
        try:
            item.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise PipelineInputError(
                f"{where} is not valid Unicode text ({exc.reason} at character {exc.start}); remove lone "
                f"surrogates (e.g. decode bytes with errors='replace')"
            ) from None
    return items


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_values(values: Mapping[str, Any], limits: Limits, *, batch: int | None = None) -> None:
    """Check every argument of the module docstring's spec that ``values`` holds (others are left alone).

    Args:
        values: Call arguments or a pipeline's state inputs.
        limits: The pipeline's limits.
        batch: Number of images (for the seed range); default from ``values["prompt"]``.

    Raises:
        PipelineInputError: A value of the wrong type or range (the message names the argument).
        LimitExceededError: A size above its limit (the message names the limit and its override).
    """
    if batch is None:
        prompt = values.get("prompt")
        batch = len(prompt) if isinstance(prompt, (list, tuple)) else 1
    if "seed" in values:
        check_seed(values["seed"], batch)
    for name in ("height", "width"):
        if name in values and values[name] is not None and (not _is_int(values[name]) or values[name] <= 0):
            raise PipelineInputError(f"{name}={_short(values[name])} is not a positive int; pass e.g. 1024")
    height: Any = values.get("height")
    width: Any = values.get("width")
    if _is_int(height) and _is_int(width):
        limits.check("max_pixels", int(height) * int(width), f"height x width = {height} x {width}")
    steps = values.get("num_inference_steps")
    if steps is not None:
        if not _is_int(steps) or steps < 1:
            raise PipelineInputError(f"num_inference_steps={_short(steps)} is not an int >= 1; pass e.g. 4 or 30")
        if values.get("sigmas") is None:  # explicit sigmas set the step count (checked below)
            limits.check("max_steps", int(steps), "num_inference_steps")
    if values.get("sigmas") is not None:
        _check_sigmas(values["sigmas"], limits)
    for name in _SEQUENCE_LENGTHS:
        length = values.get(name)
        if length is None:
            continue
        if not _is_int(length) or length < 1:
            raise PipelineInputError(f"{name}={_short(length)} is not an int >= 1; pass e.g. 512")
        limits.check("max_sequence_length", int(length), name)
    for name, bounds in _REALS.items():
        if values.get(name) is not None:
            _check_real(name, values[name], bounds)
    for name, lowest in _INTS.items():
        value = values.get(name)
        if value is not None and (not _is_int(value) or value < lowest):
            raise PipelineInputError(f"{name}={_short(value)} is not an int >= {lowest}")
    for name in _BOOLS:
        if values.get(name) is not None and not isinstance(values[name], bool):
            raise PipelineInputError(f"{name}={_short(values[name])} is {_kind(values[name])}; pass True or False")
    if values.get("rand_device") is not None:
        check_rand_device(values["rand_device"])
    if values.get("output_type") is not None and values["output_type"] not in OUTPUT_TYPES:
        raise PipelineInputError(f"output_type={_short(values['output_type'])}; pass one of {OUTPUT_TYPES}")
    latents = values.get("latents")
    if latents is not None:
        if not isinstance(latents, torch.Tensor) or not latents.is_floating_point():
            raise PipelineInputError(f"latents= must be a floating-point torch.Tensor, got {_kind(latents)}")
        if not bool(torch.isfinite(latents).all()):
            raise PipelineInputError("latents= holds NaN or Inf values; pass finite initial noise")
    for name, value in values.items():
        check_image_sizes(name, value, limits)


def check_seed(seed: Any, batch: int = 1) -> None:
    """Check a base seed (``None`` or an int whose ``batch`` seeds ``seed + i`` fit torch's 64-bit range)."""
    if seed is None:
        return
    if not _is_int(seed):
        raise PipelineInputError(
            f"seed={_short(seed)} is {_kind(seed)}; pass an int (image i uses seed + i) or None for a random seed"
        )
    if seed < 0 or int(seed) + max(batch, 1) - 1 >= SEED_END:
        raise PipelineInputError(
            f"seed={seed} is outside [0, 2**64 - {max(batch, 1)}] for {batch} image(s); pass a non-negative int "
            f"(or None for a random seed, where other tools use -1)"
        )


def _check_real(name: str, value: Any, bounds: tuple[float, bool, float, bool] | None) -> None:
    if not _is_real(value):
        raise PipelineInputError(f"{name}={_short(value)} is {_kind(value)}; pass a number")
    number = float(value)
    if not math.isfinite(number):
        raise PipelineInputError(f"{name}={number} is not a finite number; pass e.g. 1.0")
    if bounds is None:
        return
    low, low_ok, high, high_ok = bounds
    if number < low or (number == low and not low_ok) or number > high or (number == high and not high_ok):
        shown = f"{'[' if low_ok else '('}{low:g}, {high:g}{']' if high_ok else ')'}"
        raise PipelineInputError(f"{name}={number} is outside {shown}")


def _check_sigmas(sigmas: Any, limits: Limits) -> None:
    if isinstance(sigmas, torch.Tensor):
        if sigmas.ndim != 1 or not sigmas.is_floating_point():
            raise PipelineInputError(f"sigmas= must be a 1-D float tensor, got shape {tuple(sigmas.shape)}")
        limits.check("max_steps", sigmas.numel(), "len(sigmas)")
        values = sigmas
    else:
        if isinstance(sigmas, (str, bytes)) or not isinstance(sigmas, Sequence):
            raise PipelineInputError(f"sigmas={_short(sigmas)} is {_kind(sigmas)}; pass a list of numbers")
        limits.check("max_steps", len(sigmas), "len(sigmas)")
        if not all(_is_real(s) for s in sigmas):
            raise PipelineInputError(f"sigmas={_short(sigmas)} holds something other than numbers")
        values = torch.tensor([float(s) for s in sigmas], dtype=torch.float64)
    if values.numel() == 0:
        raise PipelineInputError("sigmas=[] is empty; pass at least one sigma (or None for the default schedule)")
    if not bool(torch.isfinite(values).all()):
        raise PipelineInputError("sigmas holds NaN or Inf; pass finite values in [0, 1]")


def check_rand_device(device: Any) -> None:
    """Check that a :class:`torch.Generator` can run on ``device`` (``"cpu"``, ``"cuda"``, ...)."""
    if not isinstance(device, (str, torch.device)):
        raise PipelineInputError(f"rand_device={_short(device)} is {_kind(device)}; pass 'cpu' or 'cuda'")
    try:
        torch.Generator(device)
    except (RuntimeError, ValueError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PipelineInputError(
            f"rand_device={str(device)!r} cannot draw random numbers here ({first[:120]}); pass 'cpu' (the same "
            f"noise on every machine)"
        ) from None


def check_image_sizes(name: str, value: Any, limits: Limits) -> None:
    """Check every PIL image in ``value`` (one image or a list/tuple of them) by its header size.

    Raises:
        PipelineInputError: An image has a side of 0 pixels.
        LimitExceededError: An image has more than ``limits.max_input_pixels`` pixels.
    """
    from PIL import Image

    items = value if isinstance(value, (list, tuple)) else (value,)
    for index, item in enumerate(items):
        if not isinstance(item, Image.Image):
            continue
        where = f"{name}[{index}]" if isinstance(value, (list, tuple)) else name
        width, height = item.size
        if width < 1 or height < 1:
            raise PipelineInputError(f"{where} is {width} x {height} pixels; pass an image with at least one pixel")
        limits.check("max_input_pixels", width * height, f"the pixel count of {where} ({width} x {height})")


def ensure_finite(tensor: Any, where: str) -> None:
    """Raise :class:`NonFiniteOutputError` when a floating-point tensor holds NaN or Inf.

    Args:
        tensor: The latents or images to check (anything else is ignored).
        where: Where in the run, for the message (e.g. ``"in the latents after denoising step 1"``).
    """
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        return
    if bool(torch.isfinite(tensor).all()):
        return
    raise NonFiniteOutputError(
        f"the model produced non-finite values (NaN/Inf) {where}: the weights may contain NaN/Inf (check the "
        f"checkpoint files), or the dtype overflows (try torch_dtype=torch.float32)"
    )


def check_callback_updates(updates: Any, latents: torch.Tensor) -> Mapping[str, Any]:
    """Check what ``callback_on_step_end`` returned: a dict whose ``latents``, if any, keep their shape."""
    if not isinstance(updates, Mapping):
        raise PipelineInputError(
            f"callback_on_step_end returned a {type(updates).__name__}; return a dict (e.g. {{}} or "
            f"{{'latents': latents}}) or None"
        )
    new = updates.get("latents")
    if new is not None and (not isinstance(new, torch.Tensor) or new.shape != latents.shape):
        raise PipelineInputError(
            f"callback_on_step_end returned latents of shape {tuple(getattr(new, 'shape', ()))}; they must keep "
            f"the shape {tuple(latents.shape)}"
        )
    return updates
