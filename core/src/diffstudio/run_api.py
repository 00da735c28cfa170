"""``diffstudio.run``: the one-call entry for scripts, and what backs ``diffstudio run``.

A run is a list of jobs (one prompt each, with options; see :mod:`diffstudio.jobs`). Each image's file name is
fixed before anything loads::

    {job index:05d}-{first 40 characters of the prompt, slugged}-s{the image's own seed}-{job hash}.png

The job hash is the first :data:`HASH_LENGTH` hex digits of the SHA-256 of the whole job: the prompt and every
option (defaults of the embedded model included), the model's entries and the identity (absolute path, size,
modification time) of every file the job reads (model files, tokenizer, LoRAs, template folders, input
images), the LoRA scales, templates and their inputs, the dtype and fp8 storage. Anything that changes the
pixels changes the name, so a re-run skips exactly the images whose identical job already wrote them
(``overwrite=True`` / ``--overwrite`` regenerates them). A job's own ``output`` name is kept as given (image i
of several gets ``-s{seed}`` before the extension); it is skipped when the existing file's record carries the
same job hash.

Every image is generated on its own (batch of one), so each image's record (the JSON chunk of the PNG, see
:mod:`diffstudio.outputs`) holds a job that reproduces it bit for bit on the same machine: ``diffstudio run
--from IMAGE.png`` (``run(from_images=[...])``) re-runs it, warning when a file's SHA-256 differs from the
recorded one. Under ``accelerate launch`` the jobs are split across processes (``jobs[rank::world_size]``) and
only the main process prints the summary.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from diffstudio.config import ModelConfig
from diffstudio.errors import PipelineInputError
from diffstudio.jobs import (
    FIELDS,
    Job,
    JobFileError,
    check_field,
    contained,
    load_jobs,
    rows_from_images,
    validate_row,
)
from diffstudio.run_models import (
    DEFAULT_MODEL_ID,
    ModelPlan,
    PlannedJob,
    file_identity,
    memory_fields,
    plan_model,
)
from diffstudio.runtime import Runtime

__all__ = ["DEFAULT_MODEL_ID", "HASH_LENGTH", "Job", "JobFileError", "load_jobs", "load_pipeline", "run", "run_cli"]

#: Hex digits of the job hash in output file names.
HASH_LENGTH = 10
logger = logging.getLogger("diffstudio.run")


def _slug(text: str, limit: int = 40) -> str:
    slug = re.sub(r"[^a-zA-Z0-9]+", "-", text).strip("-").lower()
    return slug[:limit].rstrip("-") or "image"


def make_job(index: int, row: Mapping[str, Any], *, where: str = "") -> Job:
    """Validate one job row (see :func:`diffstudio.jobs.validate_row`)."""
    return validate_row(dict(row), index, source=where.rstrip(": ") or None)


# ----------------------------------------------------------------------------------------------------------
# one planned job
# ----------------------------------------------------------------------------------------------------------


_Planned = PlannedJob  # the earlier private name


def _absolute(value: str) -> str:
    path = Path(value).expanduser()
    return str(path.resolve()) if path.exists() else value


def _canonical(job: Job, plan: ModelPlan, settings: dict[str, Any], dtype: str) -> dict[str, Any]:
    """The job row recorded in each PNG and hashed into its name (paths absolute, model as resolved)."""
    row: dict[str, Any] = {"prompt": job.prompt}
    for key, value in settings.items():
        if key in ("sha256", "model", "tokenizer", "dtype"):
            continue
        if key in ("templates", "edit_image"):
            value = [_absolute(v) for v in value]
        elif key in ("input_image", "inpaint_mask"):
            value = _absolute(value)
        elif key == "loras":
            value = [{"path": _absolute(lora["path"]), "scale": lora["scale"]} for lora in value]
        row[key] = value
    row["model"] = list(plan.names)
    if "tokenizer" in settings:
        row["tokenizer"] = [_absolute(t) for t in settings["tokenizer"]]
    row["dtype"] = dtype
    return row


def _referenced_files(row: Mapping[str, Any], plan: ModelPlan) -> list[str]:
    files = [str(p) for p in plan.files] + list(row.get("tokenizer", []))
    files += [lora["path"] for lora in row.get("loras", [])] + list(row.get("edit_image", []))
    files += [t for t in row.get("templates", []) if Path(t).exists()]
    files += [row[k] for k in ("input_image", "inpaint_mask") if k in row]
    return files


def _content_identity(value: Any) -> Any:
    """Identity of a Python call argument (images and tensors by content) for the job hash."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _content_identity(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_content_identity(v) for v in value]
    if hasattr(value, "tobytes") and hasattr(value, "mode"):  # PIL
        return ["image", value.mode, list(value.size), hashlib.sha256(value.tobytes()).hexdigest()]
    if hasattr(value, "detach") and hasattr(value, "shape"):  # torch tensor
        data = value.detach().cpu().contiguous()
        return [
            "tensor",
            str(data.dtype),
            list(data.shape),
            hashlib.sha256(data.view(-1).numpy().tobytes()).hexdigest(),
        ]
    return repr(value)


def job_hash(row: Mapping[str, Any], plan: ModelPlan, extra: Mapping[str, Any] | None = None) -> str:
    """The short hash naming a job's outputs (see the module docstring); the seed is not part of it."""
    body = {k: v for k, v in row.items() if k not in ("seed", "num_images", "sha256")}
    identity = {"job": body, "files": file_identity(_referenced_files(row, plan)), "options": extra or {}}
    text = json.dumps(_content_identity(identity), sort_keys=True, ensure_ascii=True, default=repr)
    return hashlib.sha256(text.encode("ascii")).hexdigest()[:HASH_LENGTH]


def _recorded_hash(path: Path) -> str | None:
    from diffstudio.outputs import read_image_metadata

    try:
        _, record = read_image_metadata(path)
    except Exception:  # not an image we wrote: never skipped
        return None
    value = record.get("job_hash") if record else None
    return value if isinstance(value, str) else None


def _image_paths(job: Job, folder: Path, digest: str) -> list[tuple[int, Path]]:
    if job.output is None:
        stem = f"{job.index:05d}-{_slug(job.prompt)}"
        return [(s, contained(folder, f"{stem}-s{s}-{digest}.png")) for s in job.seeds]
    if job.num_images == 1:
        return [(job.seed, contained(folder, job.output))]
    path = Path(job.output)
    return [(s, contained(folder, str(path.with_name(f"{path.stem}-s{s}{path.suffix}")))) for s in job.seeds]


# ----------------------------------------------------------------------------------------------------------
# settings given to run() itself
# ----------------------------------------------------------------------------------------------------------


def _run_settings(explicit: Mapping[str, Any]) -> dict[str, Any]:
    """Check the job-shaped arguments of :func:`run` with the job field rules; return them canonical."""
    checked: dict[str, Any] = {}
    for name, value in explicit.items():
        if value is None:
            continue
        if name == "loras":
            value = [
                {"path": str(v[0]), "scale": v[1]}
                if isinstance(v, tuple)
                else str(v)
                if isinstance(v, os.PathLike)
                else v
                for v in ([value] if isinstance(value, (str, tuple, dict)) else list(value))
            ]
        elif name in ("model", "tokenizer", "templates", "edit_image") and not isinstance(value, str):
            value = [os.fspath(v) if isinstance(v, os.PathLike) else v for v in value]
        elif isinstance(value, os.PathLike):
            value = os.fspath(value)
        flag = _FLAGS.get(name)
        checked[name] = check_field(name, value, f"{flag} ({name}=)" if flag else f"{name}=")
    return checked


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def run(
    prompt: str | Sequence[str] | None = None,
    *,
    jobs: str | Path | Iterable[Mapping[str, Any]] | None = None,
    from_images: Sequence[str | os.PathLike[str]] | None = None,
    model: str | Sequence[str] | None = None,
    out: str | Path = "outputs",
    seed: int | None = None,
    num_images: int = 1,
    metadata: bool = True,
    overwrite: bool = False,
    dry_run: bool = False,
    runtime: Runtime | None = None,
    device: str | None = None,
    torch_dtype: Any = None,
    progress: bool = True,
    templates: Sequence[ModelConfig | str] | None = None,
    template_inputs: Sequence[Mapping[str, Any]] | None = None,
    negative_template_inputs: Sequence[Mapping[str, Any]] | None = None,
    trust_code: bool = False,
    code_sha256: str | Sequence[str | None] | None = None,
    loras: Sequence[str | tuple[str, float] | Mapping[str, Any]] | None = None,
    tokenizer: str | Sequence[str] | None = None,
    vram_limit: float | None = None,
    offload: str | None = None,
    fp8: bool | None = None,
    scheduler: str | None = None,
    shift: float | None = None,
    **options: Any,
) -> list[dict[str, Any]]:
    """Generate images for a prompt, a list of prompts, a job file or recorded images; save PNGs with records.

    Args:
        prompt: One prompt or a list (prompt i uses seed ``seed + i``); ignored when ``jobs`` is given.
        jobs: A JSON/JSONL job file, or job dicts (see :mod:`diffstudio.jobs` for the fields).
        from_images: PNGs written by ``run``: their recorded jobs are run again (the arguments given here
            override the recorded values).
        model: Checkpoint path(s), component or diffusers repository folder, glob, model id or embedded model
            id; None: the embedded default. A job's ``model`` wins.
        out: Output folder.
        seed: Base seed for prompts given directly; job files carry their own (default: the job index).
        num_images: Images per prompt given directly (image i uses ``seed + i``).
        metadata: Write generation parameters into each PNG.
        overwrite: Regenerate images whose files exist.
        dry_run: Only plan: return each image's file (``skipped``: it exists) without loading any model.
        runtime: Plugin runtime (default: a new one).
        device: Computation device (default cuda when available); checked to exist.
        torch_dtype: Computation dtype (name or torch.dtype; default float32 on CPU, bfloat16 on CUDA).
        progress: Show progress bars (main process only).
        templates: Diffusion Templates (registered names, folders or ``ModelConfig`` entries); jobs then run
            through a :class:`~diffstudio.templates.TemplatePipeline`.
        template_inputs: Template inputs for every job (a job's own ``template_inputs`` wins).
        negative_template_inputs: The same for the negative CFG branch.
        trust_code: Allow running seed-format template ``model.py`` files (see :mod:`diffstudio.templates.trust`).
        code_sha256: SHA-256 pin(s) of those files.
        loras: LoRA files: ``"FILE[:SCALE]"``, ``(file, scale)`` or ``{"path", "scale"}``.
        tokenizer: Tokenizer folder(s) for models whose files do not include one.
        vram_limit: Memory budget on the computation device in GiB (implies ``offload="cpu"`` when not set).
        offload: ``"cpu"`` or ``"disk"``: keep weights there between uses and stream them in layer by layer.
        fp8: Store weights as float8 (computed in ``torch_dtype``).
        scheduler: A registered noise schedule (``flux1``, ``flux2``, ``static``).
        shift: Schedule shift (with no ``scheduler``: the static schedule with this shift).
        **options: Pipeline arguments for every job (``num_inference_steps``, ``cfg_scale``, ``height``,
            ``input_image``, adapter inputs...). Job fields are checked with the job rules.

    Returns:
        One dict per image of this process: ``{"prompt", "seed", "path", "skipped", "job", "hash"}``.
    """
    from diffstudio.run_models import check_device, torch_dtype_for
    from diffstudio.templates.trust import check_trust_flag, require_pin

    check_trust_flag(trust_code)
    for pin in [code_sha256] if code_sha256 is None or isinstance(code_sha256, str) else list(code_sha256):
        require_pin(pin)
    runtime = runtime if runtime is not None else Runtime()
    if vram_limit is not None and offload is None:
        offload = "cpu"
    memory = memory_fields(offload, False)
    extra = {k: v for k, v in options.items() if k not in FIELDS}
    named = {k: v for k, v in options.items() if k in FIELDS}
    template_names = [os.fspath(t) if isinstance(t, os.PathLike) else t for t in templates or []]
    explicit: dict[str, Any] = {
        **named, "model": [model] if isinstance(model, str) else model, "loras": loras,
        "tokenizer": [tokenizer] if isinstance(tokenizer, str) else tokenizer, "scheduler": scheduler, "shift": shift,
        "template_inputs": template_inputs, "negative_template_inputs": negative_template_inputs,
        "fp8": fp8 or None, "dtype": None if torch_dtype is None else _dtype_name(torch_dtype),
        "templates": [t for t in template_names if isinstance(t, str)] or None,
    }  # fmt: skip
    given = _run_settings(explicit)
    config_templates = [t for t in template_names if not isinstance(t, str)]
    job_list = _jobs(prompt, jobs, from_images, given, seed, num_images)
    device = check_device(device)
    folder = Path(out)
    plans: dict[tuple[Any, ...], ModelPlan] = {}
    planned: list[_Planned] = []
    for job in job_list:
        settings = {**given, **job.fields}
        key = (tuple(settings.get("model") or ()), tuple(settings.get("tokenizer") or ()), bool(settings.get("fp8")))
        if key not in plans:
            job_memory = memory_fields(offload, bool(settings.get("fp8")))
            plans[key] = plan_model(
                runtime, settings.get("model"), tokenizers=settings.get("tokenizer"), memory=job_memory
            )
        plan = plans[key]
        settings = {**plan.defaults, **settings}
        dtype = _dtype_name(torch_dtype_for(settings.get("dtype"), device))
        row = _canonical(job, plan, settings, dtype)
        digest = job_hash(row, plan, {"options": extra, "templates": [repr(t) for t in config_templates]})
        item = _Planned(job, plan, settings, row, digest, _image_paths(job, folder, digest))
        for seed_i, path in item.images:
            fresh = overwrite or not path.exists() or (job.output is not None and _recorded_hash(path) != digest)
            if fresh:
                item.todo.append((seed_i, path))
        planned.append(item)
    rank, world, state = _process_split()
    mine = planned[rank::world]
    results: list[dict[str, Any]] = []
    todo = [item for item in mine if item.todo]
    reports: dict[Path, dict[str, Any]] = {}
    if todo and not dry_run:
        from diffstudio.run_session import Session

        session = Session(runtime, device=device, vram_limit=vram_limit, progress=progress and rank == 0,
                          trust_code=trust_code, code_sha256=code_sha256, memory=memory,
                          config_templates=config_templates)  # fmt: skip
        for item in sorted(todo, key=lambda i: list(dict.fromkeys(p.pipe_key for p in todo)).index(i.pipe_key)):
            session.generate(item, extra, metadata=metadata)
        reports = session.reports
    for item in mine:
        written = {p for _, p in item.todo}
        results.extend(
            {"prompt": item.job.prompt, "seed": s, "path": str(p), "skipped": p not in written,
             "job": item.job.index, "hash": item.digest, **reports.get(p, {})}
            for s, p in item.images
        )  # fmt: skip
    if state is not None:
        state.wait_for_everyone()
    return results


def _jobs(
    prompt: str | Sequence[str] | None,
    jobs: str | Path | Iterable[Mapping[str, Any]] | None,
    from_images: Sequence[str | os.PathLike[str]] | None,
    given: Mapping[str, Any],
    seed: int | None,
    num_images: int,
) -> list[Job]:
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise PipelineInputError(f"seed={seed!r} must be a non-negative integer")
    if from_images:
        rows = rows_from_images(from_images)
        override = {**given, **({} if seed is None else {"seed": seed})}
        return [
            validate_row({**row, **override}, i, source=os.fspath(p))
            for i, (row, p) in enumerate(zip(rows, from_images))
        ]
    if jobs is not None:
        if seed is not None:
            raise PipelineInputError(
                f"--seed {seed} does not apply to --jobs: each job row carries its own seed (default: the job's "
                'index); put "seed" in the rows instead'
            )
        if isinstance(jobs, (str, Path)):
            return load_jobs(jobs)
        return [validate_row(dict(row), i) for i, row in enumerate(jobs)]
    if prompt is None:
        raise PipelineInputError("give a prompt, a job file (--jobs) or recorded images (--from)")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    base = 0 if seed is None else seed
    return [validate_row({"prompt": p, "seed": base + i, "num_images": num_images}, i) for i, p in enumerate(prompts)]


def _process_split() -> tuple[int, int, Any]:
    """Return (rank, world size, accelerate state or None); accelerate is used only under a launcher."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, None
    import torch
    from accelerate import PartialState

    # Without CUDA, accelerate only joins the process group (gloo) when told to run on the CPU.
    state = PartialState(cpu=not torch.cuda.is_available())
    return int(state.process_index), int(state.num_processes), state


def load_pipeline(
    runtime: Runtime,
    model: str | Sequence[str] | None,
    *,
    device: str | None = None,
    torch_dtype: Any = None,
    tokenizer: Sequence[str] | None = None,
    vram_limit: float | None = None,
    memory: Mapping[str, Any] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Load the pipeline that serves ``model``; returns (pipeline, default call arguments)."""
    from diffstudio.run_models import check_device, torch_dtype_for
    from diffstudio.run_session import load_plan

    names = [model] if isinstance(model, str) else (list(model) if model else None)
    plan = plan_model(runtime, names, tokenizers=tokenizer, memory=memory)
    device = check_device(device)
    dtype = torch_dtype_for(torch_dtype, device)
    return load_plan(runtime, plan, device=device, torch_dtype=dtype, vram_limit=vram_limit), plan.defaults


# ----------------------------------------------------------------------------------------------------------
# the command line
# ----------------------------------------------------------------------------------------------------------


def _template_options(args: argparse.Namespace) -> dict[str, Any]:
    """``--template``, ``--template-input``, ``--negative-template-input``, ``--trust-code``, ``--code-sha256``."""
    templates = list(getattr(args, "template", None) or [])
    positive = [item for group in getattr(args, "template_input", None) or [] for item in group]
    negative = [item for group in getattr(args, "negative_template_input", None) or [] for item in group]
    pins = list(getattr(args, "code_sha256", None) or [])
    if templates and not positive and args.jobs is None and not getattr(args, "from_images", None):
        positive = [{"model_id": index} for index in range(len(templates))]  # each template once, defaults
    if len(pins) > 1 and len(pins) != len(templates):
        raise PipelineInputError(f"{len(pins)} --code-sha256 pins for {len(templates)} --template entries")
    options: dict[str, Any] = {"templates": templates or None, "trust_code": bool(getattr(args, "trust_code", False))}
    options["template_inputs"] = positive or None
    options["negative_template_inputs"] = negative or None
    options["code_sha256"] = pins[0] if len(pins) == 1 else (pins or None)
    return options


#: ``diffstudio run`` flags that are pipeline arguments: (attribute, job field).
_CLI_FIELDS = (
    ("steps", "num_inference_steps"), ("cfg_scale", "cfg_scale"), ("height", "height"), ("width", "width"),
    ("negative_prompt", "negative_prompt"), ("guidance", "embedded_guidance"), ("image", "input_image"),
    ("mask", "inpaint_mask"), ("denoising_strength", "denoising_strength"), ("edit_image", "edit_image"),
    ("max_sequence_length", "max_sequence_length"), ("cache", "step_cache"),
)  # fmt: skip


#: The flag of each job field, for messages.
_FLAGS = {
    **{name: "--" + key.replace("_", "-") for key, name in _CLI_FIELDS},
    "dtype": "--dtype", "loras": "--lora", "model": "--model", "tokenizer": "--tokenizer", "templates": "--template",
    "template_inputs": "--template-input", "negative_template_inputs": "--negative-template-input",
    "scheduler": "--scheduler", "shift": "--shift", "fp8": "--fp8",
}  # fmt: skip


def run_cli(args: argparse.Namespace, runtime: Runtime) -> int:
    """``diffstudio run``: map command-line arguments onto :func:`run`."""
    options = {name: getattr(args, key) for key, name in _CLI_FIELDS if getattr(args, key, None) is not None}
    from_images = getattr(args, "from_images", None)
    if args.prompt is None and args.jobs is None and not from_images:
        raise PipelineInputError("give a PROMPT, --jobs FILE or --from IMAGE.png")
    if sum(x is not None and x != [] for x in (args.prompt, args.jobs, from_images)) > 1:
        raise PipelineInputError("give only one of PROMPT, --jobs FILE and --from IMAGE.png")
    results = run(
        args.prompt, jobs=args.jobs, from_images=from_images, model=args.model, out=args.out, seed=args.seed,
        num_images=args.num_images, metadata=not args.no_metadata, overwrite=args.overwrite,
        dry_run=args.dry_run, runtime=runtime,
        device=args.device, torch_dtype=args.dtype, loras=args.lora, tokenizer=args.tokenizer,
        vram_limit=args.vram_limit, offload=args.offload, fp8=args.fp8 or None, scheduler=args.scheduler,
        shift=args.shift, **_template_options(args), **options,
    )  # fmt: skip
    rank, _, _ = _process_split()
    if rank == 0 or args.format == "json":
        for row in results:
            if args.format == "json":
                _write_line_atomically(json.dumps(row))
            else:
                state = "exists, skipped" if row["skipped"] else ("to write" if args.dry_run else "written")
                if "computed_steps" in row:
                    state += f", {row['computed_steps']}/{row['steps']} steps computed ({row['step_cache']})"
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
