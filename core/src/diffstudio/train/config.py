"""``diffstudio train`` arguments: the seed trainers' names and meanings, plus what they lack.

The seed's arguments keep their names (``--dataset_base_path``, ``--model_paths``, ``--trainable_models``,
``--lora_rank``, ...). Added here: ``--batch_size`` (with size buckets), ``--resume``, ``--lora_format``,
``--seed``, ``--mixed_precision``, ``--lr_scheduler`` / ``--lr_warmup_steps``,
``--validation_prompt`` / ``--validation_steps``, ``--pipeline_args``
(fixed pipeline call arguments such as ``{"max_sequence_length": 32}``), ``--timestep_sampling`` /
``--loss_weighting``, ``--max_steps``, ``--checkpoint_steps``, ``--caption_dropout``, ``--ema_decay``,
``--offload_models``, ``--distill_steps``, ``--cache_memory_mb`` and ``--allow_outside_dataset``.

Every option also accepts its kebab-case spelling (``--dataset-base-path``), as ``diffstudio run``'s options
are spelt; ``--help`` shows the seed's snake_case names.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from diffstudio.errors import ConfigError

TASKS = ("sft", "sft:data_process", "sft:train", "direct_distill")
LR_SCHEDULERS = ("constant", "cosine", "linear")
LORA_FORMATS = ("diffusers", "comfy", "kohya")


class TrainConfigError(ConfigError):
    """A training argument is invalid."""


@dataclass
class TrainConfig:
    """Every training option (see ``diffstudio train --help`` for each one's meaning)."""

    dataset_base_path: str = ""
    dataset_metadata_path: str = ""
    data_file_keys: list[str] = field(default_factory=lambda: ["image"])
    max_pixels: int = 1024 * 1024
    height: int | None = None
    width: int | None = None
    dataset_repeat: int = 1
    dataset_num_workers: int = 0
    allow_outside_dataset: bool = False
    extra_inputs: list[str] = field(default_factory=list)
    model_paths: list[Any] = field(default_factory=list)
    model_id_with_origin_paths: list[str] = field(default_factory=list)
    tokenizer_path: str | None = None
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    weight_decay: float = 0.01
    num_epochs: int = 1
    max_steps: int | None = None
    gradient_accumulation_steps: int = 1
    batch_size: int = 1
    trainable_models: list[str] = field(default_factory=list)
    lora_base_model: str | None = None
    lora_target_modules: list[str] = field(default_factory=list)
    lora_rank: int = 32
    lora_alpha: float | None = None
    lora_checkpoint: str | None = None
    preset_lora_path: str | None = None
    preset_lora_model: str | None = None
    use_gradient_checkpointing: bool = False
    use_gradient_checkpointing_offload: bool = False
    fp8_models: list[str] = field(default_factory=list)
    offload_models: list[str] = field(default_factory=list)
    task: str = "sft"
    remove_prefix_in_ckpt: str | None = None
    output_path: str = "models/train"
    save_steps: int | None = None
    checkpoint_steps: int | None = None
    align_to_opensource_format: bool = False
    find_unused_parameters: bool = False
    lora_format: str = "diffusers"
    resume: bool = False
    seed: int = 0
    mixed_precision: str = "no"
    torch_dtype: str = "float32"
    pipeline_args: dict[str, Any] = field(default_factory=dict)
    timestep_sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    loss_weighting: str = "bump"
    validation_prompt: str | None = None
    validation_steps: int | None = None
    distill_steps: int = 4
    template_model_id_or_path: str | None = None
    trust_code: bool = False
    caption_dropout: float = 0.0
    ema_decay: float | None = None
    cache_memory_mb: int = 1024
    log_every: int = 10

    def __post_init__(self) -> None:
        self.validate()

    @property
    def lora(self) -> bool:
        """True when a LoRA is trained (``--lora_base_model``)."""
        return self.lora_base_model is not None

    def validate(self) -> None:
        """Raise :class:`TrainConfigError` naming the first invalid argument."""
        if self.task not in TASKS:
            raise TrainConfigError(f"--task {self.task!r} is not one of {', '.join(TASKS)}")
        if self.lora_format not in LORA_FORMATS:
            raise TrainConfigError(f"--lora_format {self.lora_format!r} is not one of {', '.join(LORA_FORMATS)}")
        for name in ("learning_rate", "num_epochs", "gradient_accumulation_steps", "batch_size", "lora_rank"):
            if not getattr(self, name) > 0:
                raise TrainConfigError(f"--{name} must be > 0, got {getattr(self, name)!r}")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise TrainConfigError(f"--lr_scheduler {self.lr_scheduler!r} is not one of {', '.join(LR_SCHEDULERS)}")
        for name in ("max_steps", "save_steps", "checkpoint_steps", "validation_steps"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise TrainConfigError(f"--{name} must be an integer >= 1 when given, got {value!r}")
        if self.lr_warmup_steps < 0:
            raise TrainConfigError(f"--lr_warmup_steps must be >= 0, got {self.lr_warmup_steps}")
        if self.lr_scheduler != "constant" and self.max_steps is None:
            raise TrainConfigError(f"--lr_scheduler {self.lr_scheduler} decays to 0 at --max_steps; give --max_steps")
        if not self.logit_std > 0:
            raise TrainConfigError(f"--logit_std must be > 0, got {self.logit_std}")
        if self.weight_decay < 0:
            raise TrainConfigError(f"--weight_decay must be >= 0, got {self.weight_decay}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise TrainConfigError(f"--mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}")
        if self.lora and self.lora_base_model in self.trainable_models:
            raise TrainConfigError(
                f"--lora_base_model {self.lora_base_model!r} is also in --trainable_models; train either the "
                "whole model or a LoRA on it"
            )
        if not self.lora and not self.trainable_models and self.task not in ("sft:data_process",):
            raise TrainConfigError("nothing to train: give --trainable_models or --lora_base_model")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise TrainConfigError(f"--caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if self.cache_memory_mb < 0:
            raise TrainConfigError(
                f"--cache_memory_mb must be >= 0 (0 reads every row from disk), got {self.cache_memory_mb}"
            )
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise TrainConfigError(f"--ema_decay must be in (0, 1), got {self.ema_decay}")
        if self.preset_lora_path and not self.preset_lora_model:
            raise TrainConfigError("--preset_lora_path needs --preset_lora_model (the model it applies to)")
        if self.distill_steps < 1:
            raise TrainConfigError(f"--distill_steps must be >= 1, got {self.distill_steps}")
        if self.dataset_num_workers < 0:
            raise TrainConfigError(f"--dataset_num_workers must be >= 0, got {self.dataset_num_workers}")
        if self.use_gradient_checkpointing_offload and not self.use_gradient_checkpointing:
            self.use_gradient_checkpointing = True  # the seed's offload flag implies checkpointing
        if not self.model_paths and not self.model_id_with_origin_paths:
            raise TrainConfigError("no model given: pass --model_paths or --model_id_with_origin_paths")


def _csv(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def _json_list(value: str) -> list[Any]:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"--model_paths must be a JSON list of paths: {exc}") from exc
    if not isinstance(parsed, list):
        raise argparse.ArgumentTypeError("--model_paths must be a JSON list of paths (or lists of shard paths)")
    return parsed


def _json_object(value: str) -> dict[str, Any]:
    parsed = json.loads(value)
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError("--pipeline_args must be a JSON object")
    return parsed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every :class:`TrainConfig` option to ``parser`` (seed names, seed meanings, kebab-case aliases)."""
    before = list(parser._actions)
    _add_arguments(parser)
    add_kebab_aliases(parser, [a for a in parser._actions if a not in before])
    note = "Every option also accepts its kebab-case spelling (--dataset-base-path for --dataset_base_path)."
    parser.epilog = f"{parser.epilog}\n\n{note}" if parser.epilog else note


def add_kebab_aliases(parser: argparse.ArgumentParser, actions: Sequence[argparse.Action]) -> None:
    """Let each ``--snake_case`` option of ``actions`` also be spelt ``--kebab-case`` (not shown in ``--help``).

    The alias is registered with the parser's option table only, so ``--help`` lists the primary names.
    """
    table = parser._option_string_actions
    for action in actions:
        for option in list(action.option_strings):
            alias = option.replace("_", "-")
            if option.startswith("--") and alias != option and alias not in table:
                table[alias] = action


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    data = parser.add_argument_group("data")
    data.add_argument("--dataset_base_path", required=True, help="folder the metadata's file paths are relative to")
    data.add_argument("--dataset_metadata_path", required=True, help="metadata file: .csv, .json or .jsonl")
    data.add_argument("--data_file_keys", type=_csv, default=["image"], help="comma-separated image columns")
    data.add_argument("--max_pixels", type=int, default=1024 * 1024, help="pixel budget without --height/--width")
    data.add_argument("--height", type=int, default=None, help="fixed training height (with --width)")
    data.add_argument("--width", type=int, default=None, help="fixed training width (with --height)")
    data.add_argument("--dataset_repeat", type=int, default=1, help="repeat the rows this many times per epoch")
    data.add_argument("--dataset_num_workers", type=int, default=0, help="data loading worker processes")
    data.add_argument("--extra_inputs", type=_csv, default=[], help="comma-separated extra pipeline inputs")
    data.add_argument(
        "--allow_outside_dataset", action="store_true",
        help="accept metadata file paths that resolve outside --dataset_base_path ('..', absolute paths, symbolic "
        "links to elsewhere); refused by default",
    )  # fmt: skip
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model_paths", type=_json_list, default=[], help="JSON list of model files (or ModelConfig objects)"
    )
    model.add_argument(
        "--model_id_with_origin_paths", type=_csv, default=[], help="comma-separated model_id:origin_pattern"
    )
    model.add_argument("--tokenizer_path", default=None, help="tokenizer folder")
    model.add_argument("--trainable_models", type=_csv, default=[], help="comma-separated components to train")
    model.add_argument(
        "--fp8_models", type=_csv, default=[],
        help="frozen components stored in float8 (names like dit, or the --model_paths / model_id:pattern strings)",
    )  # fmt: skip
    model.add_argument(
        "--offload_models", type=_csv, default=[], help="frozen components whose weights rest on the CPU"
    )
    model.add_argument("--template_model_id_or_path", default=None, help="template model to load (templates)")
    model.add_argument("--trust_code", action="store_true", help="allow running a seed-format template's model.py")
    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--lora_base_model", default=None, help="component the LoRA is added to (e.g. dit)")
    lora.add_argument("--lora_target_modules", type=_csv, default=[], help="comma-separated module name patterns")
    lora.add_argument("--lora_rank", type=int, default=32)
    lora.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    lora.add_argument("--lora_checkpoint", default=None, help="LoRA file to continue training from")
    lora.add_argument("--preset_lora_path", default=None, help="LoRA fused into the base before training")
    lora.add_argument("--preset_lora_model", default=None, help="component the preset LoRA applies to")
    lora.add_argument("--lora_format", choices=LORA_FORMATS, default="diffusers", help="layout of saved LoRAs")
    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--learning_rate", type=float, default=1e-4)
    opt.add_argument(
        "--lr_scheduler", choices=LR_SCHEDULERS, default="constant",
        help="learning-rate schedule after warm-up: constant, or cosine / linear decay to 0 at --max_steps",
    )  # fmt: skip
    opt.add_argument("--lr_warmup_steps", type=int, default=0, help="linear warm-up from 0 over this many steps")
    opt.add_argument("--weight_decay", type=float, default=0.01)
    opt.add_argument("--num_epochs", type=int, default=1)
    opt.add_argument("--max_steps", type=int, default=None, help="stop after this many optimizer steps")
    opt.add_argument("--gradient_accumulation_steps", type=int, default=1)
    opt.add_argument("--batch_size", type=int, default=1, help="samples per process and micro-step")
    opt.add_argument("--use_gradient_checkpointing", action="store_true")
    opt.add_argument("--use_gradient_checkpointing_offload", action="store_true")
    opt.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default="no")
    opt.add_argument("--torch_dtype", default="float32", help="dtype the models are loaded in")
    opt.add_argument("--seed", type=int, default=0)
    opt.add_argument("--timestep_sampling", choices=("uniform", "logit_normal", "mode"), default="uniform")
    opt.add_argument("--logit_mean", type=float, default=0.0, help="logit_normal: mean (< 0 favours high noise)")
    opt.add_argument("--logit_std", type=float, default=1.0, help="logit_normal: standard deviation")
    opt.add_argument("--mode_scale", type=float, default=1.29, help="mode sampling: scale")
    opt.add_argument("--loss_weighting", choices=("bump", "none"), default="bump")
    opt.add_argument("--find_unused_parameters", action="store_true")
    opt.add_argument("--caption_dropout", type=float, default=0.0, help="share of samples trained unconditioned")
    opt.add_argument("--ema_decay", type=float, default=None, help="keep an EMA of the weights; save it")
    run = parser.add_argument_group("task and output")
    run.add_argument("--task", choices=TASKS, default="sft")
    run.add_argument("--distill_steps", type=int, default=4, help="sampling steps unrolled by direct_distill")
    run.add_argument("--output_path", default="models/train")
    run.add_argument(
        "--save_steps", type=int, default=None, help="save the trained weights every N steps (no resumable checkpoint)"
    )
    run.add_argument(
        "--checkpoint_steps", type=int, default=None,
        help="write a resumable checkpoint (checkpoints/step-N) every N steps and at each epoch's end; without it "
        "(and without --resume) no checkpoint is written",
    )  # fmt: skip
    run.add_argument("--remove_prefix_in_ckpt", default=None, help="strip this prefix from saved keys")
    run.add_argument(
        "--align_to_opensource_format", action="store_true", help="save LoRAs in the kohya layout (--lora_format kohya)"
    )
    run.add_argument(
        "--resume", action="store_true",
        help="continue from the newest usable checkpoint in --output_path (older ones when it is damaged); "
        "checkpoints are then also written at each epoch's end",
    )  # fmt: skip
    run.add_argument(
        "--cache_memory_mb",
        type=int,
        default=1024,
        help="sft:train: hold the stage-1 cache in memory when its files total at most this many MiB (0: never)",
    )
    run.add_argument("--pipeline_args", type=_json_object, default={}, help="JSON object of pipeline arguments")
    run.add_argument("--validation_prompt", default=None, help="render this prompt every --validation_steps")
    run.add_argument("--validation_steps", type=int, default=None)
    add("--log_every", type=int, default=10, help=argparse.SUPPRESS)


def config_from_args(args: argparse.Namespace | Sequence[str]) -> TrainConfig:
    """Build a :class:`TrainConfig` from parsed arguments (or an argv list)."""
    if not isinstance(args, argparse.Namespace):
        parser = argparse.ArgumentParser(prog="diffstudio train")
        add_arguments(parser)
        args = parser.parse_args(list(args))
    names = {f.name for f in fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    return TrainConfig(**values)
