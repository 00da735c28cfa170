"""Fit TeaCache coefficients for a DiT: ``diffstudio cache calibrate``.

For a few prompts the pipeline runs uncached while a recorder sits in the ``stack_hook`` slot of each CFG branch:
at every step after the first it records the estimator ``x`` (relative L1 change of the first double block's
modulated image input, what TeaCache measures) and the true change ``y`` (relative L1 change of the block stack's
output, what a skipped step gets wrong). ``numpy.polyfit(x, y, degree)`` gives the rescale polynomial, written as
a small JSON bound to the DiT's shape (:mod:`diffstudio.cache.coefficients`); TeaCache picks it up from beside the
DiT's weights (``<stem>.teacache.json``) or from ``tea_cache_coefficients=FILE``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import ChainMap
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from diffstudio.cache.coefficients import Coefficients, beside, save_coefficients
from diffstudio.cache.errors import StepCacheError
from diffstudio.cache.hooks import StepCache, _stack_run, relative_l1
from diffstudio.cache.units import dit_shape

DEFAULT_PROMPTS = (
    "a red circle on a blue background",
    "a photograph of a lighthouse on a cliff at sunset",
    "a bowl of fruit on a wooden table, soft light",
    "a green triangle in the top left corner on a white background",
    "a portrait of an old man with a grey beard",
    "a city street at night in the rain, neon signs",
)


class Recorder(StepCache):
    """A ``stack_hook`` that always computes and records (estimator, true change) pairs for one branch."""

    kind = "calibrate"

    def __init__(self) -> None:
        super().__init__(0.0)
        self.previous_modulated: Tensor | None = None
        self.previous_out: Tensor | None = None
        self.pairs: list[tuple[float, float]] = []

    def __call__(self, img: Tensor, vec: Tensor, run: Callable[[], Tensor]) -> Tensor:
        """Run the stack; record ``(x, y)`` against the previous step."""
        stack = _stack_run(run, "cache calibration")
        modulated = stack.modulated_input()
        out = stack()
        if self.previous_modulated is not None and self.previous_out is not None:
            self.pairs.append((relative_l1(modulated, self.previous_modulated), relative_l1(out, self.previous_out)))
        self.previous_modulated, self.previous_out = modulated, out
        self.computed.append(True)
        return out


def record(pipe: Any, prompts: Sequence[str], batch: int = 1, **arguments: Any) -> list[tuple[float, float]]:
    """Generate the prompts uncached, ``batch`` per call, and return every branch's (estimator, change) pairs.

    With ``batch`` > 1 each pair is measured over the whole batch, as TeaCache measures it when generating batches.
    """
    pairs: list[tuple[float, float]] = []
    original = pipe.predict_velocity
    recorders: dict[str, Recorder] = {}

    def recording(inputs: Mapping[str, Any], step_index: int, timestep: Tensor) -> Tensor:
        branch = str(inputs.get("branch") or "positive")
        recorder = recorders.setdefault(branch, Recorder())
        view: ChainMap[str, Any] = ChainMap({"stack_hook": recorder}, dict(inputs))
        velocity: Tensor = original(view, step_index, timestep)
        return velocity

    pipe.predict_velocity = recording
    try:
        for index in range(0, len(prompts), batch):
            recorders.clear()
            chunk = list(prompts[index : index + batch])
            pipe(chunk[0] if batch == 1 else chunk, seed=index, **arguments)
            for recorder in recorders.values():
                pairs.extend(recorder.pairs)
    finally:
        del pipe.predict_velocity
    return pairs


def fit(pairs: Sequence[tuple[float, float]], degree: int = 4) -> tuple[tuple[float, ...], float]:
    """Least-squares polynomial ``y ~ f(x)`` (highest power first) and its RMS residual.

    Raises:
        StepCacheError: Fewer points than ``degree + 1``, or non-finite values.
    """
    import numpy as np

    points = [(x, y) for x, y in pairs if math.isfinite(x) and math.isfinite(y)]
    if len(points) < degree + 1:
        raise StepCacheError(f"calibration recorded {len(points)} usable steps; a degree-{degree} fit needs "
                             f"{degree + 1}: add prompts or steps")  # fmt: skip
    x = np.array([p[0] for p in points], dtype=np.float64)
    y = np.array([p[1] for p in points], dtype=np.float64)
    coefficients = np.polyfit(x, y, degree)
    rmse = float(np.sqrt(np.mean((np.polyval(coefficients, x) - y) ** 2)))
    return tuple(float(c) for c in coefficients), rmse


def calibrate(
    pipe: Any,
    prompts: Sequence[str] = DEFAULT_PROMPTS,
    *,
    degree: int = 4,
    name: str = "",
    batch: int = 1,
    **arguments: Any,
) -> Coefficients:
    """Record and fit TeaCache coefficients for ``pipe.dit`` (see the module docstring).

    Args:
        pipe: A loaded pipeline whose DiT passes a ``StackRun`` to ``stack_hook`` (FLUX.1, FLUX.2).
        prompts: Calibration prompts (one generation each; seeds 0, 1, ...).
        degree: Polynomial degree (4, as TeaCache's published FLUX polynomial).
        name: A name recorded in the file.
        batch: Prompts per generation (the estimator is then measured over the batch).
        **arguments: Pipeline arguments (steps, size, cfg_scale...): use those the model will be run with.
    """
    started = time.monotonic()
    pairs = record(pipe, prompts, batch, **arguments)
    polynomial, rmse = fit(pairs, degree)
    shape = dit_shape(pipe)
    settings = {k: v for k, v in arguments.items() if isinstance(v, (int, float, str, bool)) or v is None}
    info = {"prompts": len(prompts), "batch": batch, "points": len(pairs), "degree": degree, "rmse": rmse,
            "x_range": [min(p[0] for p in pairs), max(p[0] for p in pairs)], "arguments": settings,
            "seconds": round(time.monotonic() - started, 2)}  # fmt: skip
    return Coefficients(polynomial, shape, name or f"calibrated for {shape}", info)


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts:
        try:
            text = Path(args.prompts).read_text(encoding="utf-8")
        except OSError as exc:
            raise StepCacheError(f"--prompts {args.prompts}: cannot read it ({exc.strerror})") from None
        prompts += [line.strip() for line in text.splitlines() if line.strip()]
    return prompts or list(DEFAULT_PROMPTS)


def run_command(args: argparse.Namespace, runtime: Any) -> int:
    """Run ``diffstudio cache calibrate``; print the written file and the fit as one JSON line."""
    from diffstudio.run_api import load_pipeline

    if args.degree < 1 or args.degree > 8:
        raise StepCacheError(f"--degree {args.degree} must be in [1, 8]")
    pipe, defaults = load_pipeline(runtime, args.model, device=args.device, torch_dtype=args.dtype,
                                   tokenizer=args.tokenizer)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    given = {"num_inference_steps": args.steps, "height": args.height, "width": args.width, "cfg_scale": args.cfg_scale}
    arguments = {**defaults, **{k: v for k, v in given.items() if v is not None}}
    if args.batch < 1:
        raise StepCacheError(f"--batch {args.batch} must be at least 1")
    coefficients = calibrate(pipe, _prompts(args), degree=args.degree, batch=args.batch, **arguments)
    target = args.out
    if target is None:
        candidates = beside(pipe.loaded["dit"].files)
        if not candidates:
            raise StepCacheError("the DiT was not loaded from a file; pass --out FILE.json")
        target = candidates[0]
    path = save_coefficients(coefficients, target)
    print(json.dumps({"written": str(path), "polynomial": list(coefficients.polynomial), **(coefficients.fit or {})}))
    return 0
