"""The ``shapes-data`` and ``shapes-score`` sub-commands (numpy and PIL load only when a command runs)."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import TYPE_CHECKING

from diffstudio.errors import ConfigError

from diffstudio_shapes.layouts import LAYOUTS

if TYPE_CHECKING:
    from diffstudio.runtime import Runtime

_BASE = "circle,square,triangle,star"


def data_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``diffstudio shapes-data``."""
    parser.add_argument("out", help="output folder (images/, metadata.csv, specs.jsonl, dataset.json)")
    parser.add_argument("--count", type=int, default=1000, help="number of images (default: 1000)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default: 64)")
    parser.add_argument("--seed", type=int, default=0, help="base seed (default: 0)")
    parser.add_argument(
        "--split", choices=("train", "heldout"), default="train", help="colour/shape combinations to draw from"
    )
    parser.add_argument("--shapes", default=_BASE, help=f"comma-separated shapes (default: {_BASE}; also zigzag)")
    parser.add_argument("--position-rate", type=float, default=0.5, help="share of captions naming a position")
    parser.add_argument("--size-rate", type=float, default=0.5, help="share of captions naming a size")
    parser.add_argument(
        "--rotation-jitter", type=float, default=None, help="max rotation in degrees, not circles (layout's default)"
    )
    parser.add_argument(
        "--position-jitter",
        type=float,
        default=None,
        help="anchored layout: largest move of a centre from its anchor, fraction of the side (default: 0.01)",
    )
    parser.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="anchored",
        help="anchored: fixed place per position word (the model's data); scattered: generator v1's placement",
    )
    parser.add_argument("--format", choices=("text", "json"), default="text", help="output format")


def data_run(args: argparse.Namespace, runtime: Runtime) -> int:
    """Write the data set described by ``args``; return the exit code."""
    from diffstudio_shapes.data import write_dataset

    shapes = tuple(name.strip() for name in args.shapes.split(",") if name.strip())
    report = write_dataset(
        args.out,
        args.count,
        args.seed,
        args.size,
        shapes=shapes,
        split=args.split,
        position_rate=args.position_rate,
        size_rate=args.size_rate,
        rotation_jitter=args.rotation_jitter,
        layout=args.layout,
        position_jitter=args.position_jitter,
    )
    if args.format == "json":
        summary = {"folder": str(report.folder), "count": report.count, "written": report.written}
        print(json.dumps({**summary, "skipped": report.skipped, "metadata": str(report.metadata)}))
    else:
        print(
            f"{report.count} images in {report.folder} ({report.written} drawn, {report.skipped} already there); "
            f"metadata: {report.metadata}"
        )
    return 0


def score_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``diffstudio shapes-score``."""
    parser.add_argument("folder", help="folder with a metadata.csv (columns image,prompt) and the images it names")
    parser.add_argument("--metadata", default="metadata.csv", help="CSV file inside the folder (default: metadata.csv)")
    parser.add_argument("--out", default=None, help="also write the full result (JSON) to this file")
    parser.add_argument("--format", choices=("text", "json"), default="text", help="output format")


def score_run(args: argparse.Namespace, runtime: Runtime) -> int:
    """Score the images of a folder against their prompts; return the exit code."""
    from PIL import Image

    from diffstudio_shapes.analyse import score

    folder = Path(args.folder)
    table = folder / args.metadata
    if not table.is_file():
        raise ConfigError(f"{table} not found; shapes-score needs a CSV with columns image,prompt.")
    with open(table, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or not {"image", "prompt"} <= set(rows[0]):
        raise ConfigError(f"{table} has no rows with the columns image,prompt.")
    images = []
    for row in rows:
        with Image.open(folder / row["image"]) as image:
            images.append(image.convert("RGB"))
    result = score([row["prompt"] for row in rows], images)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if args.format == "json":
        print(json.dumps(result))
    else:
        for key, value in result["accuracy"].items():
            shown = "-" if value is None else f"{value:.3f}"
            print(f"{key:<10} {shown:>6}  ({result['counted'][key]} images)")
    return 0


STAGES = ("text", "vae", "dit-init", "install")


def build_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``diffstudio shapes-build``."""
    parser.add_argument("stage", choices=STAGES, help="recipe stage (see plugins/shapes/README.md)")
    parser.add_argument("root", help="build folder (the stages read and write their files there)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the stage (default: 0)")
    parser.add_argument("--vae-steps", type=int, default=None, help="VAE optimizer steps (default: the recipe's)")
    parser.add_argument("--dit", default=None, help="install: the trained DiT file (default: ROOT/train/last)")
    parser.add_argument("--target", default=None, help="install: where the weights go (default: the package)")


def build_run(args: argparse.Namespace, runtime: Runtime) -> int:
    """Run one recipe stage; return the exit code."""
    root = Path(args.root)
    if args.stage == "text":
        from diffstudio_shapes.recipe.text import build_text

        print(json.dumps({"stage": "text", **build_text(root, seed=args.seed)}))
    elif args.stage == "vae":
        from dataclasses import replace

        from diffstudio_shapes.recipe.vae import VaeTraining, build_vae

        cfg = VaeTraining(seed=args.seed)
        if args.vae_steps is not None:
            cfg = replace(cfg, steps=args.vae_steps)
        build_vae(root, cfg)
    elif args.stage == "dit-init":
        from diffstudio_shapes.recipe.dit import write_random_dit

        target = root / "dit-init.safetensors"
        if not target.exists():
            write_random_dit(target, seed=args.seed)
        print(json.dumps({"stage": "dit-init", "file": str(target)}))
    else:
        from diffstudio_shapes.recipe.install import install

        print(json.dumps({"stage": "install", **install(root, args.dit, args.target)}))
    return 0


def eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``diffstudio eval-shapes``."""
    parser.add_argument("--count", type=int, default=200, help="held-out captions to render (default: 200)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the caption draw and of the images")
    parser.add_argument(
        "--model",
        action="append",
        default=None,
        help="a model file (repeat for each) or a folder laid out like the embedded weights (default: embedded)",
    )
    parser.add_argument("--lora", default=None, help="a LoRA file applied to the DiT (side path)")
    parser.add_argument("--shapes", default=_BASE, help=f"shapes of the captions (default: {_BASE})")
    parser.add_argument("--split", choices=("train", "heldout"), default="heldout", help="caption combinations")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    parser.add_argument("--cfg-scale", type=float, default=None, help="CFG scale (default: the model's)")
    parser.add_argument("--batch", type=int, default=16, help="images per pipeline call")
    parser.add_argument("--out", default=None, help="also save the images and a metadata.csv here")
    parser.add_argument(
        "--variety",
        type=int,
        default=0,
        help="also render this many captions --variety-seeds times each and "
        "report the mean pairwise pixel distance (default: 0, off)",
    )
    parser.add_argument("--variety-seeds", type=int, default=4, help="images per caption for --variety (default: 4)")


def model_arguments(paths: list[str] | None) -> list[str] | None:
    """``--model`` values, each folder replaced by its DiT, VAE and text encoder files (the embedded layout).

    Raises:
        ConfigError: A folder lacks one of the files of that layout.
    """
    from diffstudio_shapes.model import DIT_FILE, TEXT_ENCODER_FILE, TOKENIZER_FOLDER, VAE_FILE, installed, model_files

    if not paths:
        return None
    files: list[str] = []
    for path in paths:
        if not Path(path).is_dir():
            files.append(path)
        elif installed(Path(path)):
            files.extend(model_files(path))
        else:
            layout = f"{DIT_FILE}, {VAE_FILE}, {TEXT_ENCODER_FILE} and {TOKENIZER_FOLDER}tokenizer.json"
            raise ConfigError(f"--model {path} is a folder without the shapes model's layout ({layout}); "
                              "give the model files instead, one --model each")  # fmt: skip
    return files


def eval_run(args: argparse.Namespace, runtime: Runtime) -> int:
    """Render held-out captions with the model and print the analyser's accuracies (JSON)."""
    from diffstudio_shapes.evaluate import evaluate

    shapes = tuple(name.strip() for name in args.shapes.split(",") if name.strip())
    options = {}
    if args.steps is not None:
        options["num_inference_steps"] = args.steps
    if args.cfg_scale is not None:
        options["cfg_scale"] = args.cfg_scale
    result = evaluate(
        runtime,
        count=args.count,
        seed=args.seed,
        model=model_arguments(args.model),
        lora=args.lora,
        shapes=shapes,
        split=args.split,
        batch=args.batch,
        out=args.out,
        variety=args.variety,
        variety_seeds=args.variety_seeds,
        **options,
    )
    print(json.dumps(result))
    return 0
