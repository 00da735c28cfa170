"""``diffstudio.run``: the one-call entry for scripts, and what backs ``diffstudio run``.

A run is a list of jobs (one prompt each, with options). Each job's output file name is fixed before it runs,
so a re-run skips jobs whose images exist. Under ``accelerate launch`` the jobs are split across processes
(``jobs[rank::world_size]``) and only the main process prints the summary.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffstudio.config import ModelConfig
from diffstudio.errors import DiffstudioError, PipelineInputError
from diffstudio.runtime import Runtime

DEFAULT_MODEL_ID = "diffstudio/shapes"

#: Job keys and the pipeline argument each one feeds.
_JOB_ALIASES = {"steps": "num_inference_steps", "cfg": "cfg_scale", "negative": "negative_prompt"}
_JOB_FIELDS = {"prompt", "negative_prompt", "seed", "output", "num_images"}


class JobFileError(DiffstudioError, ValueError):
    """A job file cannot be read, or a row in it is invalid."""


@dataclass
class Job:
    """One prompt to render, with its options.

    Attributes:
        prompt: The prompt.
        seed: Base seed (image i uses ``seed + i``); defaults to the job's index so re-runs are reproducible.
        output: File name (relative to the output folder); default from index, prompt and seed.
        num_images: Images for this prompt.
        options: Further pipeline arguments (``num_inference_steps``, ``cfg_scale``, ``negative_prompt``, ...).
    """

    prompt: str
    seed: int
    output: str
    num_images: int = 1
    options: dict[str, Any] = field(default_factory=dict)

    def outputs(self, folder: Path) -> list[Path]:
        """The files this job writes."""
        path = folder / self.output
        if self.num_images == 1:
            return [path]
        return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(self.num_images)]


def _slug(text: str, limit: int = 40) -> str:
    slug = re.sub(r"[^a-zA-Z0-9]+", "-", text).strip("-").lower()
    return slug[:limit].rstrip("-") or "image"


def make_job(index: int, row: Mapping[str, Any], *, where: str = "") -> Job:
    """Validate one job row (``prompt`` required) and fix its seed and output name."""
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise JobFileError(f"{where}job {index} has no prompt (a non-empty string under the key 'prompt')")
    options = {_JOB_ALIASES.get(k, k): v for k, v in row.items() if k not in _JOB_FIELDS}
    if row.get("negative_prompt") is not None:
        options["negative_prompt"] = row["negative_prompt"]
    seed = row.get("seed", index)
    if not isinstance(seed, int):
        raise JobFileError(f"{where}job {index}: seed must be an integer, got {seed!r}")
    output = row.get("output") or f"{index:05d}-{_slug(prompt)}-s{seed}.png"
    num_images = int(row.get("num_images", 1))
    return Job(prompt=prompt, seed=seed, output=str(output), num_images=num_images, options=options)


def load_jobs(path: str | Path) -> list[Job]:
    """Read a JSON list or JSONL file of job objects."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise JobFileError(f"cannot read the job file {path}: {exc}") from exc
    rows: list[Any]
    stripped = text.lstrip()
    try:
        if stripped.startswith("["):
            rows = json.loads(text)
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise JobFileError(f"{path} is neither a JSON list nor JSON lines: {exc}") from exc
    jobs = []
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise JobFileError(f"{path}: job {index} is {type(row).__name__}, expected an object with a prompt")
        jobs.append(make_job(index, row, where=f"{path}: "))
    if not jobs:
        raise JobFileError(f"{path} holds no jobs")
    return jobs


def _process_split() -> tuple[int, int, Any]:
    """Return (rank, world size, accelerate state or None); accelerate is used only under a launcher."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, None
    import torch
    from accelerate import PartialState

    # Without CUDA, accelerate only joins the process group (gloo) when told to run on the CPU.
    state = PartialState(cpu=not torch.cuda.is_available())
    return int(state.process_index), int(state.num_processes), state


def _model_configs(runtime: Runtime, model: str | Sequence[str] | None) -> tuple[list[ModelConfig], Any, Any]:
    """Return (configs, tokenizer config, embedded model or None) for ``model``."""
    embedded = {m.model_id: m for m in runtime.hooks.embedded_models()}
    if model is None:
        if DEFAULT_MODEL_ID not in embedded:
            raise DiffstudioError(
                f"No model given and the embedded default model {DEFAULT_MODEL_ID!r} is not installed. "
                f"Install it (pip install -e plugins/shapes) or pass --model PATH to a checkpoint."
            )
        model = DEFAULT_MODEL_ID
    names = [model] if isinstance(model, str) else list(model)
    if len(names) == 1 and names[0] in embedded:
        spec = embedded[names[0]]
        configs = [ModelConfig(model_id=spec.model_id, origin_file_pattern=p) for p in spec.model_configs]
        tokenizer = (
            ModelConfig(model_id=spec.model_id, origin_file_pattern=spec.tokenizer_pattern)
            if spec.tokenizer_pattern
            else None
        )
        return configs, tokenizer, spec
    configs = [
        ModelConfig(path=n) if Path(n).exists() or any(c in n for c in "*?[") else ModelConfig(model_id=n)
        for n in names
    ]
    return configs, None, None


def load_pipeline(
    runtime: Runtime,
    model: str | Sequence[str] | None,
    *,
    device: str | None = None,
    torch_dtype: Any = None,
) -> tuple[Any, dict[str, Any]]:
    """Load the pipeline that serves ``model``; returns (pipeline, default call arguments)."""
    import torch

    from diffstudio.identify import identify
    from diffstudio.pipeline.base import default_device

    configs, tokenizer, embedded = _model_configs(runtime, model)
    if embedded is not None:
        spec = runtime.hooks.pipelines().get(embedded.pipeline)
        defaults = dict(embedded.defaults)
    else:
        _, claim = identify(runtime, configs[0])
        matching = [s for s in runtime.hooks.pipelines() if s.family == claim.family]
        if not matching:
            raise DiffstudioError(f"no installed pipeline runs {claim.family!r} models ({claim.describe()})")
        spec, defaults = matching[0], {}
    device = device or default_device()
    if torch_dtype is None:
        torch_dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    elif isinstance(torch_dtype, str):
        torch_dtype = getattr(torch, torch_dtype)
    cls = spec.factory()
    pipe = cls.from_pretrained(
        torch_dtype=torch_dtype, device=device, model_configs=configs, tokenizer_config=tokenizer, runtime=runtime
    )
    return pipe, defaults


def run(
    prompt: str | Sequence[str] | None = None,
    *,
    jobs: str | Path | Iterable[Mapping[str, Any]] | None = None,
    model: str | Sequence[str] | None = None,
    out: str | Path = "outputs",
    seed: int | None = None,
    metadata: bool = True,
    runtime: Runtime | None = None,
    device: str | None = None,
    torch_dtype: Any = None,
    progress: bool = True,
    templates: Sequence[ModelConfig | str] | None = None,
    template_inputs: Sequence[Mapping[str, Any]] | None = None,
    negative_template_inputs: Sequence[Mapping[str, Any]] | None = None,
    trust_code: bool = False,
    code_sha256: str | Sequence[str | None] | None = None,
    **options: Any,
) -> list[dict[str, Any]]:
    """Generate images for a prompt, a list of prompts, or a job file; save them as PNGs with metadata.

    Args:
        prompt: One prompt or a list (ignored when ``jobs`` is given).
        jobs: A JSON/JSONL job file, or job dicts (``prompt`` plus options).
        model: Checkpoint path(s), glob, model id or embedded model id; None: the embedded default.
        out: Output folder.
        seed: Base seed for prompts given directly (prompt i uses ``seed + i``); job files carry their own.
        metadata: Write generation parameters into each PNG.
        runtime: Plugin runtime (default: a new one).
        device: Computation device.
        torch_dtype: Computation dtype (default float32 on CPU, bfloat16 on CUDA).
        progress: Show progress bars (main process only).
        templates: Diffusion Templates to load (registered names, folders or ``ModelConfig`` entries); every job then
            runs through a :class:`~diffstudio.templates.TemplatePipeline`.
        template_inputs: Template inputs for every job (a job's own ``template_inputs`` key wins).
        negative_template_inputs: The same for the negative CFG branch.
        trust_code: Allow running seed-format template ``model.py`` files (see :mod:`diffstudio.templates.trust`).
        code_sha256: SHA-256 pin(s) of those files.
        **options: Pipeline arguments applied to every job (``num_inference_steps``, ``cfg_scale``, ``height``...).

    Returns:
        One dict per image of this process: ``{"prompt", "seed", "path", "skipped"}``.
    """
    from diffstudio.outputs import save_image

    runtime = runtime if runtime is not None else Runtime()
    if jobs is not None:
        job_list = (
            load_jobs(jobs) if isinstance(jobs, (str, Path)) else [make_job(i, row) for i, row in enumerate(jobs)]
        )
    elif prompt is not None:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        base = 0 if seed is None else seed
        job_list = [make_job(i, {"prompt": p, "seed": base + i}) for i, p in enumerate(prompts)]
    else:
        raise PipelineInputError("give a prompt or a job file")
    folder = Path(out)
    rank, world, state = _process_split()
    mine = job_list[rank::world]
    results: list[dict[str, Any]] = []
    todo = []
    for job in mine:
        paths = job.outputs(folder)
        if all(p.exists() for p in paths):
            results.extend(
                {"prompt": job.prompt, "seed": job.seed + i, "path": str(p), "skipped": True}
                for i, p in enumerate(paths)
            )
        else:
            todo.append(job)
    if todo:
        pipe, defaults = load_pipeline(runtime, model, device=device, torch_dtype=torch_dtype)
        if not progress or rank != 0:
            pipe.set_progress_bar_config(disable=True)
        template_pipeline = None
        if templates:
            from diffstudio.templates import TemplatePipeline

            template_pipeline = TemplatePipeline.from_pretrained(
                torch_dtype=pipe.torch_dtype, device=str(pipe.device), model_configs=list(templates),
                trust_code=trust_code, code_sha256=code_sha256, runtime=runtime,
            )  # fmt: skip
        for job in todo:
            arguments = {**defaults, **options, **job.options}
            positive = arguments.pop("template_inputs", template_inputs)
            negative = arguments.pop("negative_template_inputs", negative_template_inputs)
            used: list[tuple[str, dict[str, Any]]] = []
            if template_pipeline is not None:
                images = template_pipeline(pipe, [job.prompt] * job.num_images, seed=job.seed,
                                           template_inputs=positive, negative_template_inputs=negative,
                                           **arguments)  # fmt: skip
                used = template_pipeline.last_templates
            elif positive or negative:
                raise PipelineInputError("template_inputs were given but no templates are loaded (pass templates=)")
            else:
                images = pipe([job.prompt] * job.num_images, seed=job.seed, **arguments)
            for i, (image, path) in enumerate(zip(images, job.outputs(folder))):
                record = _record(pipe, job, i, image, arguments, used)
                save_image(image, path, record, metadata=metadata)
                results.append({"prompt": job.prompt, "seed": job.seed + i, "path": str(path), "skipped": False})
    if state is not None:
        state.wait_for_everyone()
    return results


def _record(
    pipe: Any,
    job: Job,
    index: int,
    image: Any,
    arguments: Mapping[str, Any],
    templates: Sequence[tuple[str, Mapping[str, Any]]] = (),
) -> Any:
    from diffstudio.outputs import record_for

    return record_for(
        pipe, prompt=job.prompt, seed=job.seed + index, image=image, arguments=arguments, templates=templates
    )


def _template_options(args: argparse.Namespace) -> dict[str, Any]:
    """``--template``, ``--template-input``, ``--negative-template-input``, ``--trust-code``, ``--code-sha256``."""
    templates = list(getattr(args, "template", None) or [])
    positive = [item for group in getattr(args, "template_input", None) or [] for item in group]
    negative = [item for group in getattr(args, "negative_template_input", None) or [] for item in group]
    pins = list(getattr(args, "code_sha256", None) or [])
    if templates and not positive and args.jobs is None:
        positive = [{"model_id": index} for index in range(len(templates))]  # each template once, defaults
    if len(pins) > 1 and len(pins) != len(templates):
        raise PipelineInputError(f"{len(pins)} --code-sha256 pins for {len(templates)} --template entries")
    options: dict[str, Any] = {"templates": templates or None, "trust_code": bool(getattr(args, "trust_code", False))}
    options["template_inputs"] = positive or None
    options["negative_template_inputs"] = negative or None
    options["code_sha256"] = pins[0] if len(pins) == 1 else (pins or None)
    return options


def run_cli(args: argparse.Namespace, runtime: Runtime) -> int:
    """``diffstudio run``: map command-line arguments onto :func:`run`."""
    options: dict[str, Any] = {}
    for key, name in (
        ("steps", "num_inference_steps"),
        ("cfg_scale", "cfg_scale"),
        ("height", "height"),
        ("width", "width"),
        ("negative_prompt", "negative_prompt"),
    ):
        value = getattr(args, key)
        if value is not None:
            options[name] = value
    if args.prompt is None and args.jobs is None:
        raise PipelineInputError("give a PROMPT or --jobs FILE")
    jobs: Any = args.jobs
    if jobs is None and args.num_images > 1:
        jobs = [{"prompt": args.prompt, "seed": args.seed or 0, "num_images": args.num_images}]
    results = run(
        args.prompt,
        jobs=jobs,
        model=args.model,
        out=args.out,
        seed=args.seed,
        metadata=not args.no_metadata,
        runtime=runtime,
        device=args.device,
        torch_dtype=args.dtype,
        **_template_options(args),
        **options,
    )
    rank, _, _ = _process_split()
    if rank == 0 or args.format == "json":
        for row in results:
            if args.format == "json":
                _write_line_atomically(json.dumps(row))
            else:
                state = "exists, skipped" if row["skipped"] else "written"
                print(f"{row['path']}  (seed {row['seed']}, {state})", file=sys.stdout)
    return 0


def _write_line_atomically(line: str) -> None:
    """Write ``line`` and its newline to stdout in one ``write(2)``.

    Under ``accelerate launch`` every rank shares one stdout pipe; a single write of at most
    ``PIPE_BUF`` (4096) bytes is never interleaved with another process's, so JSON rows stay one per line.
    """
    sys.stdout.flush()
    data = (line + "\n").encode("utf-8")
    try:
        descriptor = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # replaced stdout (pytest capture, notebooks)
        sys.stdout.write(line + "\n")
        return
    while data:
        written = os.write(descriptor, data)
        data = data[written:]
