"""Core's own sub-commands: ``diffstudio plugins``, ``diffstudio run`` and ``diffstudio train``."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import TYPE_CHECKING

from diffstudio._markers import hookimpl
from diffstudio.types import CommandSpec

if TYPE_CHECKING:
    from diffstudio.runtime import Runtime


def _plugins_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print a JSON array, one object per plugin")


def _plugins_run(args: argparse.Namespace, runtime: Runtime) -> int:
    from diffstudio._table import format_table

    # Ask the registration hooks that need no torch, so that a plugin whose registrations fail shows as failed.
    for registry in (runtime.hooks.pipelines, runtime.hooks.embedded_models, runtime.hooks.schedulers,
                     runtime.hooks.templates):  # fmt: skip
        registry()
    rows = [status.to_json() for status in runtime.statuses]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        table = []
        for row in rows:
            detail = row["error"] if row["status"] in ("failed", "blocked", "not allowed") else ", ".join(row["hooks"])
            dist = f"{row['distribution']} {row['version']}".strip()
            table.append([row["name"], row["status"].upper(), dist, detail or ""])
        print(format_table(["NAME", "STATUS", "DISTRIBUTION", "HOOKS / ERROR"], table))
    return 1 if runtime.failed() and runtime.strict else 0


def _run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Generate images from a prompt, a job file (--jobs) or the records of earlier images (--from). Each image is "
        "named {index}-{prompt}-s{seed}-{job hash}.png; a re-run skips images whose identical job already wrote "
        "them. Every option is recorded in the PNG and replayed by --from."
    )
    parser.add_argument("prompt", nargs="?", help="the prompt (or use --jobs / --from)")
    parser.add_argument("--jobs", help="JSON or JSONL file of jobs (each an object with a prompt and options)")
    parser.add_argument(
        "--from", dest="from_images", action="append", metavar="IMAGE.png",
        help="re-run the job recorded in a PNG written by diffstudio run (repeatable; flags given here override "
        "the recorded values; a warning when a file's SHA-256 differs from the record)",
    )  # fmt: skip
    parser.add_argument(
        "--model",
        action="append",
        help="model: checkpoint file, component folder, diffusers repository folder (model_index.json), glob or "
        "model id (repeat for one file per component); default: the embedded model",
    )
    parser.add_argument("--tokenizer", action="append", metavar="DIR", help="tokenizer folder, when the model has none")
    parser.add_argument(
        "--lora", action="append", metavar="FILE[:SCALE]", help="apply a LoRA with a scale (default 1; repeatable)"
    )
    parser.add_argument("--out", default="outputs", help="output folder (default: ./outputs)")
    parser.add_argument("--overwrite", action="store_true", help="regenerate images whose files already exist")
    parser.add_argument(
        "--dry-run", action="store_true", help="print each image's file name (and whether it exists); load nothing"
    )
    parser.add_argument("--seed", type=int, default=None, help="base seed; image i of a batch uses seed + i")
    parser.add_argument("--steps", type=int, default=None, help="number of inference steps")
    parser.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance scale")
    parser.add_argument("--guidance", type=float, default=None, help="distilled guidance (FLUX dev / Kontext)")
    parser.add_argument("--negative-prompt", default=None, help="negative prompt (used when cfg scale > 1)")
    parser.add_argument("--height", type=int, default=None, help="image height (multiple of 16)")
    parser.add_argument("--width", type=int, default=None, help="image width (multiple of 16)")
    parser.add_argument("--num-images", type=int, default=1, help="images per prompt")
    parser.add_argument("--max-sequence-length", type=int, default=None, help="text tokens (FLUX.2)")
    parser.add_argument(
        "--scheduler", default=None, help="noise schedule: flux1, flux2, static or one a plugin registers"
    )
    parser.add_argument("--shift", type=float, default=None, help="schedule shift (alone: the static schedule)")
    parser.add_argument("--device", default=None, help="computation device (default: cuda if available)")
    parser.add_argument(
        "--dtype",
        default=None,
        help="computation dtype: float32, bfloat16, float16 (default: bf16 on cuda, avx512_bf16/AMX cpus; else fp32)",
    )
    parser.add_argument("--no-metadata", action="store_true", help="write PNGs without generation parameters")
    parser.add_argument("--format", choices=("text", "json"), default="text", help="output format")
    parser.add_argument(
        "--cache", default=None, metavar="KIND:THRESHOLD",
        help="step caching: teacache:0.4 (TeaCache, calibrated coefficients) or fbcache:0.1 (First-Block-Cache); "
        "larger is faster and less faithful; the result reports the computed steps",
    )  # fmt: skip
    images = parser.add_argument_group("input images")
    images.add_argument("--image", metavar="FILE", help="image-to-image (and inpainting) source image")
    images.add_argument("--mask", metavar="FILE", help="inpainting mask for --image (white = repaint)")
    images.add_argument(
        "--denoising-strength", type=float, default=None, help="image-to-image strength in (0, 1] (default 1)"
    )
    images.add_argument(
        "--edit-image", action="append", metavar="FILE",
        help="edit / reference image (FLUX.2 edit images, FLUX.1 Kontext images; repeatable)",
    )  # fmt: skip
    memory = parser.add_argument_group("low-memory execution")
    memory.add_argument(
        "--vram-limit", type=float, default=None, metavar="GIB",
        help="memory budget on the computation device in GiB; weights beyond it stream in layer by layer "
        "(implies --offload cpu)",
    )  # fmt: skip
    memory.add_argument(
        "--offload", choices=("cpu", "disk"), default=None,
        help="keep weights in CPU memory or in the memory-mapped file between uses, onloaded layer by layer",
    )  # fmt: skip
    memory.add_argument("--fp8", action="store_true", help="store weights as float8, compute in --dtype")
    templates = parser.add_argument_group("Diffusion Templates")
    templates.add_argument(
        "--template", action="append", help="template to apply: installed name or folder (repeat for several)"
    )
    templates.add_argument(
        "--template-input", action="append", type=_json_inputs, metavar="JSON",
        help='template inputs, e.g. \'{"scale": 0.8}\' (one object per application, "model_id" picks the '
        "template; a JSON list gives several); default: every --template once with its defaults",
    )  # fmt: skip
    templates.add_argument(
        "--negative-template-input", action="append", type=_json_inputs, metavar="JSON",
        help="template inputs for the negative CFG branch",
    )  # fmt: skip
    templates.add_argument(
        "--trust-code", action="store_true",
        help="allow running a seed-format template's model.py (arbitrary Python: inspect it first)",
    )  # fmt: skip
    templates.add_argument(
        "--code-sha256", action="append", metavar="HEX",
        help="SHA-256 pin of a seed-format model.py (one for all templates, or one per --template)",
    )  # fmt: skip


def _json_inputs(value: str) -> list[dict[str, object]]:
    """One ``--template-input``: a JSON object (or a list of objects)."""
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc}): {value!r}") from exc
    items = parsed if isinstance(parsed, list) else [parsed]
    if not items or not all(isinstance(item, dict) for item in items):
        raise argparse.ArgumentTypeError(f"template inputs must be a JSON object or a list of objects: {value!r}")
    return items


def _run_run(args: argparse.Namespace, runtime: Runtime) -> int:
    from diffstudio.run_api import run_cli

    return run_cli(args, runtime)


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    from diffstudio.train.config import add_arguments

    add_arguments(parser)


def _train_run(args: argparse.Namespace, runtime: Runtime) -> int:
    from diffstudio.train import config_from_args, train

    result = train(config_from_args(args), runtime=runtime)
    if result.losses:
        print(json.dumps({"steps": result.steps, "last_loss": result.losses[-1], "files": result.files[-3:]}))
    return 0


@hookimpl
def register_commands(register: Callable[[CommandSpec], None]) -> None:
    """Register ``plugins``, ``run`` and ``train``."""
    register(CommandSpec("plugins", "list installed plugins and their load status", _plugins_arguments, _plugins_run))
    register(CommandSpec("run", "generate images from a prompt or a job file", _run_arguments, _run_run))
    register(CommandSpec("train", "train a model, a LoRA or a template (accelerate)", _train_arguments, _train_run))
