"""Acceptance figures of the shipped templates on the embedded shapes model, one JSON line per figure.

Usage::

    .venv/bin/python benchmarks/templates_acceptance.py [--prompts 20] [--brightness NAME_OR_FOLDER]
        [--colour NAME_OR_FOLDER] [--negative neutral|none] [--device cpu] [--threads 2]

With the model's defaults (128 x 128, 20 steps, cfg 3, 32 text tokens), for ``--prompts`` shapes captions (training
split, seed 101) and image seed ``1000 + i``:

* ``brightness``: images at ``scale`` 0.1, 0.2, ..., 0.9 through ``diffstudio/brightness``; ``pearson_mean`` is the
  Pearson correlation between the scale and the mean luminance (ITU-R 601 luma, 0..255) of each scale's images
  (target >= 0.9), ``pearson_pooled`` the same over every image, ``colour_accuracy`` the share of images whose
  shape colour the analyser (``diffstudio_shapes.analyse.score``) reads as the caption's (target >= 0.8);
* ``colour_shift``: ``diffstudio/colour-shift`` with a target colour per prompt (the next palette colour that is
  neither the caption's nor the background's): ``target_accuracy`` is the share drawn in the target colour;
* ``both``: the two templates at once (scales 0.1 and 0.9 with the same targets): ``target_accuracy`` and the
  luminance difference between the two scales, ``luminance_gain`` (> 0 when the brightness still takes effect).

``--negative neutral`` gives the negative CFG branch ``{"scale": 0.5}`` (the brightness template's neutral value,
DiffSynth's choice for its brightness template), so CFG amplifies only the brightness change; ``same`` gives the
negative branch the same template inputs as the positive one (CFG then amplifies neither template); ``none`` runs
the templates on the positive branch only.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

SCALES = tuple(round(0.1 * k, 1) for k in range(1, 10))


def luminance(image: Any) -> float:
    """Mean ITU-R 601 luma (0..255) of an RGB image."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    return float((pixels @ np.array([0.299, 0.587, 0.114])).mean())


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation of two equally long sequences."""
    return float(np.corrcoef(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64))[0, 1])


def targets(specs: Sequence[Any]) -> list[str]:
    """Per caption the next palette colour (in palette order) that is neither its colour nor its background."""
    from diffstudio_shapes.data import COLOURS

    out = []
    for spec in specs:
        start = COLOURS.index(spec.colour)
        out.append(next(c for k in range(1, len(COLOURS)) if (c := COLOURS[(start + k) % len(COLOURS)])
                        not in (spec.colour, spec.background)))  # fmt: skip
    return out


class Acceptance:
    """The embedded pipeline, the two templates and the prompts (loaded once)."""

    def __init__(self, brightness: str = "diffstudio/brightness", colour: str = "diffstudio/colour-shift",
                 prompts: int = 20, negative: str = "neutral", device: str = "cpu",
                 weights: str | None = None) -> None:  # fmt: skip
        from diffstudio.run_api import load_pipeline
        from diffstudio.runtime import Runtime
        from diffstudio.templates import TemplatePipeline
        from diffstudio_shapes.data import sample_specs

        self.runtime = Runtime()
        if weights is None:
            self.pipe, self.defaults = load_pipeline(self.runtime, None, device=device)
        else:  # a folder in the embedded model's layout (e.g. a recipe's output before it is installed)
            self.pipe, self.defaults = self._from_folder(weights, device)
        self.pipe.set_progress_bar_config(disable=True)
        self.templates = TemplatePipeline.from_pretrained(
            device=device, model_configs=[brightness, colour], runtime=self.runtime
        )  # fmt: skip
        self.specs = sample_specs(prompts, 101, split="train")
        self.captions = [spec.caption for spec in self.specs]
        self.targets = targets(self.specs)
        self.negative = negative

    def _from_folder(self, weights: str, device: str) -> tuple[Any, dict[str, Any]]:
        import torch
        from diffstudio import ModelConfig
        from diffstudio_flux2 import Flux2ImagePipeline
        from diffstudio_shapes import model

        root = Path(weights)
        files = [root / model.DIT_FILE, root / model.VAE_FILE, root / model.TEXT_ENCODER_FILE]
        pipe = Flux2ImagePipeline.from_pretrained(
            torch_dtype=torch.float32, device=device, runtime=self.runtime,
            model_configs=[ModelConfig(path=str(f)) for f in files],
            tokenizer_config=ModelConfig(path=str(root / model.TOKENIZER_FOLDER)),
        )  # fmt: skip
        return pipe, dict(model.DEFAULTS)

    def images(self, inputs: list[dict[str, Any]], *, per_prompt: list[dict[str, Any]] | None = None) -> list[Any]:
        """One image per prompt with ``inputs`` (plus one prompt-specific input dict each, if given)."""
        negative = [{"model_id": 0, "scale": 0.5}] if self.negative == "neutral" and any(
            i.get("model_id", 0) == 0 for i in inputs) else None  # fmt: skip
        if self.negative == "same":
            return self._same(inputs, per_prompt)
        if per_prompt is None:  # one batch; image i uses seed 1000 + i either way
            if not inputs:
                return list(self.pipe(self.captions, **{**self.defaults, "seed": 1000}))
            return list(self.templates(self.pipe, self.captions, **{**self.defaults, "seed": 1000},
                                       template_inputs=inputs, negative_template_inputs=negative))  # fmt: skip
        images = []
        for index, caption in enumerate(self.captions):
            images.extend(self.templates(self.pipe, [caption], **{**self.defaults, "seed": 1000 + index},
                                         template_inputs=[*inputs, per_prompt[index]],
                                         negative_template_inputs=negative))  # fmt: skip
        return images

    def _same(self, inputs: list[dict[str, Any]], per_prompt: list[dict[str, Any]] | None) -> list[Any]:
        """Every template input also on the negative branch (CFG then does not amplify the templates' change)."""
        if per_prompt is None:
            if not inputs:
                return list(self.pipe(self.captions, **{**self.defaults, "seed": 1000}))
            return list(self.templates(self.pipe, self.captions, **{**self.defaults, "seed": 1000},
                                       template_inputs=inputs, negative_template_inputs=inputs))  # fmt: skip
        images = []
        for index, caption in enumerate(self.captions):
            both = [*inputs, per_prompt[index]]
            images.extend(self.templates(self.pipe, [caption], **{**self.defaults, "seed": 1000 + index},
                                         template_inputs=both, negative_template_inputs=both))  # fmt: skip
        return images

    def brightness(self) -> dict[str, Any]:
        """Luminance against scale and colour accuracy over ``SCALES`` x prompts."""
        from diffstudio_shapes.analyse import score

        means, pooled_x, pooled_y, hits = [], [], [], 0
        for scale in SCALES:
            images = self.images([{"model_id": 0, "scale": scale}])
            values = [luminance(image) for image in images]
            means.append(float(np.mean(values)))
            pooled_x += [scale] * len(values)
            pooled_y += values
            hits += round(score(self.specs, images)["accuracy"]["colour"] * len(images))
        return {"figure": "brightness", "scales": list(SCALES), "mean_luminance": [round(m, 2) for m in means],
                "pearson_mean": round(pearson(SCALES, means), 4),
                "pearson_pooled": round(pearson(pooled_x, pooled_y), 4),
                "colour_accuracy": round(hits / (len(SCALES) * len(self.specs)), 4),
                "images": len(SCALES) * len(self.specs)}  # fmt: skip

    def colour_shift(self) -> dict[str, Any]:
        """Share of images drawn in the per-prompt target colour, and the base model's own colour accuracy."""
        from diffstudio_shapes.analyse import analyse, score

        base = self.images([])
        shifted = self.images([], per_prompt=[{"model_id": 1, "colour": t} for t in self.targets])
        found = [analyse(np.asarray(image.convert("RGB"))).colour for image in shifted]
        accuracy = float(np.mean([f == t for f, t in zip(found, self.targets)]))
        return {"figure": "colour_shift", "target_accuracy": round(accuracy, 4),
                "base_colour_accuracy": round(score(self.specs, base)["accuracy"]["colour"], 4),
                "images": 2 * len(self.specs)}  # fmt: skip

    def both(self) -> dict[str, Any]:
        """The two templates at once: target colours at scales 0.1 and 0.9."""
        from diffstudio_shapes.analyse import analyse

        colours = [{"model_id": 1, "colour": t} for t in self.targets]
        dark = self.images([{"model_id": 0, "scale": 0.1}], per_prompt=colours)
        bright = self.images([{"model_id": 0, "scale": 0.9}], per_prompt=colours)
        found = [analyse(np.asarray(image.convert("RGB"))).colour for image in (*dark, *bright)]
        hits = [f == t for f, t in zip(found, [*self.targets, *self.targets])]
        gain = float(np.mean([luminance(b) - luminance(d) for d, b in zip(dark, bright)]))
        return {"figure": "both", "target_accuracy": round(float(np.mean(hits)), 4), "luminance_gain": round(gain, 2),
                "images": 2 * len(self.specs)}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--brightness", default="diffstudio/brightness", help="registered name or trained folder")
    parser.add_argument("--colour", default="diffstudio/colour-shift", help="registered name or trained folder")
    parser.add_argument("--negative", choices=("neutral", "same", "none"), default="neutral")
    parser.add_argument("--only", default="brightness,colour_shift,both", help="comma-separated figures")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--weights", default=None, help="shapes model folder (default: the installed embedded model)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    run = Acceptance(
        args.brightness,
        args.colour,
        prompts=args.prompts,
        negative=args.negative,
        device=args.device,
        weights=args.weights,
    )
    for name in args.only.split(","):
        started = time.monotonic()
        figure = getattr(run, name)()
        figure["seconds"] = round(time.monotonic() - started, 1)
        figure["negative"] = args.negative
        print(json.dumps(figure), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
