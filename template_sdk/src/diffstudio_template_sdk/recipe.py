"""A template package's training recipe: ``diffstudio train`` arguments, installing weights, a small CLI.

A template package supplies what is its own (how its data rows are written, its template name, which of its
parameters train, its weights file name) and gets the rest from here: split training of the template on a base
model (``sft:data_process`` then ``sft:train``), the data-only output copied into the package, and a
``python -m PACKAGE.recipe data|train|install`` command line. No torch import until ``train`` runs.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from diffstudio._io import atomic_write

__all__ = ["TRAIN_TASKS", "DataRow", "install_weights", "recipe_main", "train_argv", "write_rows"]

TRAIN_TASKS = ("sft:data_process", "sft:train")
"""The two stages of split training, in order."""


@dataclass(frozen=True)
class DataRow:
    """One training row of a template's data folder.

    Attributes:
        image: The image's path relative to the data folder (``images/00001.png``).
        prompt: The caption.
        template_inputs: The template's inputs for this row (JSON-ready).
        draw: Writes the image (PNG bytes) to an open binary file; called only when the image file is missing.
    """

    image: str
    prompt: str
    template_inputs: Mapping[str, Any]
    draw: Callable[[IO[bytes]], None]


def write_rows(folder: str | Path, rows: Iterable[DataRow]) -> Path:
    """Write a template's training data: each row's image unless it exists, then ``metadata.jsonl``.

    Images and the metadata are written atomically (a killed run leaves no partial file under a final name), so
    an interrupted run continues where it stopped. Returns the ``metadata.jsonl`` path; its rows are
    ``{"image", "prompt", "template_inputs"}``, what :func:`train_argv`'s ``--extra_inputs template_inputs`` reads.

    Raises:
        ValueError: A row's image path is absolute or leaves the data folder.
    """
    root = Path(folder)
    lines = []
    for row in rows:
        relative = Path(row.image)
        if relative.is_absolute() or ".." in relative.parts:
            raise ValueError(f"image path {row.image!r} must be relative and stay inside {root}")
        path = root / relative
        if not path.is_file():
            with atomic_write(path) as handle:
                row.draw(handle)
        record = {"image": row.image, "prompt": row.prompt, "template_inputs": dict(row.template_inputs)}
        lines.append(json.dumps(record) + "\n")
    metadata = root / "metadata.jsonl"
    with atomic_write(metadata, "w") as handle:
        handle.write("".join(lines))
    return metadata


def train_argv(data: str | Path, output: str | Path, models: Sequence[str], tokenizer: str | Path, *,
               template: str, trainable: str = "template_model", task: str = "sft", steps: int = 2000,
               learning_rate: float = 2e-3, size: int = 128, max_sequence_length: int = 32) -> list[str]:  # fmt: skip
    """``diffstudio train`` arguments for one stage of a template's training.

    Args:
        data: Folder with ``metadata.jsonl`` rows ``{"image", "prompt", "template_inputs"}``.
        output: The trainer's output folder (``step-N/`` is the data-only template).
        models: The base model's files (``--model_paths``).
        tokenizer: The base model's tokenizer folder.
        template: Registered template name (``--template_model_id_or_path``).
        trainable: ``--trainable_models`` (``template_model`` or one of its sub-modules).
        task: ``sft``, ``sft:data_process`` or ``sft:train``.
        steps: ``--max_steps`` (also ``--save_steps``).
        learning_rate: AdamW learning rate (no weight decay).
        size: Training height and width.
        max_sequence_length: Text tokens per prompt (a fixed pipeline argument).
    """
    data = Path(data)
    return [
        "--dataset_base_path", str(data), "--dataset_metadata_path", str(data / "metadata.jsonl"),
        "--extra_inputs", "template_inputs", "--height", str(size), "--width", str(size),
        "--model_paths", json.dumps([str(m) for m in models]), "--tokenizer_path", str(tokenizer),
        "--template_model_id_or_path", template, "--trainable_models", trainable,
        "--remove_prefix_in_ckpt", "pipe.template_model.", "--learning_rate", str(learning_rate),
        "--weight_decay", "0", "--num_epochs", "100", "--max_steps", str(steps), "--save_steps", str(steps),
        "--batch_size", "1", "--caption_dropout", "0.1", "--output_path", str(output), "--task", task,
        "--pipeline_args", json.dumps({"max_sequence_length": max_sequence_length}),
    ]  # fmt: skip


def install_weights(folder: str | Path, target: Path) -> Path:
    """Copy a trained data-only template's ``model.safetensors`` to ``target`` (e.g. the package's ``weights/``).

    Raises:
        FileNotFoundError: ``folder`` is not a data-only template folder (``OUTPUT/step-N/``).
    """
    source = Path(folder) / "model.safetensors"
    if not source.is_file():
        raise FileNotFoundError(f"{source} does not exist: give the data-only folder the trainer wrote (step-N/)")
    with atomic_write(target) as handle, source.open("rb") as weights:
        while chunk := weights.read(1 << 20):
            handle.write(chunk)
    return target


def recipe_main(argv: Sequence[str] | None, *, prog: str, what: str,
                write_data: Callable[[str, int, int], Path], train_arguments: Callable[..., list[str]],
                model_files: Callable[[Path], Sequence[str]], install: Callable[[str], Path]) -> int:  # fmt: skip
    """Run a template package's recipe command line: ``data``, ``train`` and ``install``.

    ``data FOLDER [--count N] [--seed S]``, ``train DATA OUTPUT --weights W [--steps N] [--learning_rate R]``,
    ``install FOLDER``.

    Args:
        argv: Command-line arguments (None: ``sys.argv``).
        prog: The program name shown in ``--help``.
        what: The template's name in help texts (``brightness``).
        write_data: ``(folder, count, seed) -> metadata.jsonl``.
        train_arguments: The package's :func:`train_argv` (``data, output, models, tokenizer, *, task, steps,
            learning_rate``).
        model_files: The base model's files under a weights folder (``--weights``); its tokenizer is
            ``WEIGHTS/tokenizer``.
        install: ``data-only folder -> installed file``.
    """
    parser = argparse.ArgumentParser(prog=prog)
    commands = parser.add_subparsers(dest="command", required=True)
    data = commands.add_parser("data", help=f"write the {what} training data")
    data.add_argument("folder")
    data.add_argument("--count", type=int, default=2000)
    data.add_argument("--seed", type=int, default=0)
    train = commands.add_parser("train", help="split-train the template (both stages)")
    train.add_argument("data")
    train.add_argument("output")
    train.add_argument("--weights", required=True, help="the base model's weights folder")
    train.add_argument("--steps", type=int, default=2000)
    train.add_argument("--learning_rate", type=float, default=2e-3)
    put = commands.add_parser("install", help="copy trained weights into the package")
    put.add_argument("folder", help="the trainer's data-only output folder (OUTPUT/step-N)")
    args = parser.parse_args(argv)
    if args.command == "data":
        print(write_data(args.folder, args.count, args.seed))
    elif args.command == "train":
        from diffstudio.train import config_from_args
        from diffstudio.train import train as run_training

        weights = Path(args.weights)
        for task in TRAIN_TASKS:
            stage = train_arguments(args.data, args.output, model_files(weights), weights / "tokenizer",
                                    task=task, steps=args.steps, learning_rate=args.learning_rate)  # fmt: skip
            result = run_training(config_from_args(stage))
        print(json.dumps({"steps": result.steps, "losses": result.losses[-5:], "files": result.files}))
    else:
        print(install(args.folder))
    return 0
