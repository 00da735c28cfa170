"""The loaded side of :func:`diffstudio.run`: pipelines, LoRAs, templates, schedules and input images per job.

A :class:`Session` keeps one pipeline (and its template pipelines) loaded while consecutive jobs share a model,
dtype and fp8 setting; it applies each job's LoRAs (removing the previous job's), swaps the noise schedule for
jobs that name one, opens the input images, generates each image on its own and saves it with its record.
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from diffstudio._io import file_sha256
from diffstudio.errors import DiffstudioError, PipelineInputError
from diffstudio.jobs import CALL_FIELDS
from diffstudio.run_models import ModelPlan, PlannedJob, check_complete, explain_load_error
from diffstudio.runtime import Runtime

logger = logging.getLogger("diffstudio.run")
#: Pipeline call arguments that take edit / reference images, by family convention.
_EDIT_ARGUMENTS = ("edit_image", "kontext_images")


def load_plan(
    runtime: Runtime, plan: ModelPlan, *, device: str, torch_dtype: Any, vram_limit: float | None = None
) -> Any:
    """Load the pipeline for a resolved model plan and check that nothing it needs is missing.

    Raises:
        ModelArgumentError, MissingComponentsError: The model entries name nothing loadable, or lack parts.
        DiffstudioError: Any other load error (unknown checkpoint, corrupt file...).
    """
    from diffstudio.identify import identified, pipeline_for

    try:
        with identified(runtime, [] if plan.embedded is not None else plan.configs[:1]) as found:
            if plan.embedded is not None:
                spec = pipeline_for(runtime, name=plan.embedded.pipeline)
            else:
                spec = pipeline_for(runtime, found[0].claim)
            cls = spec.factory()
            parameters = inspect.signature(cls.from_pretrained).parameters
            kwargs: dict[str, Any] = {}
            if "tokenizer_config" in parameters and plan.tokenizers:
                kwargs["tokenizer_config"] = plan.tokenizers[0]
            elif "tokenizer_1_config" in parameters:
                for index, config in enumerate(plan.tokenizers[:2], start=1):
                    kwargs[f"tokenizer_{index}_config"] = config
            if vram_limit is not None:
                kwargs["vram_limit"] = vram_limit
            pipe = cls.from_pretrained(
                torch_dtype=torch_dtype, device=device, model_configs=plan.configs, runtime=runtime, **kwargs
            )
    except DiffstudioError as exc:
        better = explain_load_error(exc, plan)
        if better is exc:
            raise
        raise better from exc
    check_complete(pipe, plan)
    return pipe


def _accepts(pipe: Any, name: str) -> bool:
    for method in (getattr(pipe, "call_inputs", None), type(pipe).__call__):
        try:
            if method is not None and name in inspect.signature(method).parameters:
                return True
        except (TypeError, ValueError):
            continue
    try:
        return name in pipe.accepted_inputs()
    except Exception:  # a pipeline without units
        return False


def _open_image(path: str, flag: str, mode: str) -> Any:
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            converted = image.convert(mode)
    except Exception as exc:  # OSError, UnidentifiedImageError, DecompressionBombError
        raise PipelineInputError(f"{flag} {path}: cannot read the image ({type(exc).__name__}: {exc})") from None
    if converted.width == 0 or converted.height == 0:
        raise PipelineInputError(f"{flag} {path}: the image is empty (0 pixels)")
    return converted


class Session:
    """Generates planned jobs, keeping what consecutive jobs share loaded."""

    def __init__(
        self,
        runtime: Runtime,
        *,
        device: str,
        vram_limit: float | None,
        progress: bool,
        trust_code: bool,
        code_sha256: Any,
        memory: Mapping[str, Any] | None = None,
        config_templates: Sequence[Any] = (),
        hash_files: bool | None = None,
    ) -> None:
        self.runtime, self.device, self.vram_limit, self.progress = runtime, device, vram_limit, progress
        self.trust_code, self.code_sha256, self.config_templates = trust_code, code_sha256, list(config_templates)
        if hash_files is None:
            hash_files = os.environ.get("DIFFSTUDIO_HASH_FILES", "1").strip().lower() not in ("0", "false", "no")
        self.hash_files = hash_files
        self.memory = {**(memory or {}), **({"vram_limit_gib": vram_limit} if vram_limit is not None else {})}
        self._key: tuple[Any, ...] | None = None
        self._pipe: Any = None
        self._templates: dict[tuple[str, ...], Any] = {}
        self._loras: list[tuple[str, float]] = []
        self._hashes: dict[str, str | None] = {}
        self.reports: dict[Path, dict[str, Any]] = {}  # image path -> step-cache figures of the result row

    # ------------------------------------------------------------------------------------------------------
    # what stays loaded
    # ------------------------------------------------------------------------------------------------------

    def pipeline(self, item: PlannedJob) -> Any:
        """The pipeline for ``item`` (the previous one is released when the model or dtype changes)."""
        from diffstudio.devices import compute_line, parse_dtype

        if self._key != item.pipe_key:
            self._pipe, self._templates, self._loras = None, {}, []
            self._pipe = load_plan(self.runtime, item.plan, device=self.device,
                                   torch_dtype=parse_dtype(item.row["dtype"], name="dtype"),
                                   vram_limit=self.vram_limit)  # fmt: skip
            if not self.progress:
                self._pipe.set_progress_bar_config(disable=True)
            else:
                print(f"diffstudio: {compute_line(self.device, item.row['dtype'])}", file=sys.stderr)
            self._default_scheduler = self._pipe.scheduler
            self._key = item.pipe_key
        return self._pipe

    def template_pipeline(self, item: PlannedJob, pipe: Any) -> Any:
        """The template pipeline for the job's templates, or None without templates."""
        names = tuple(item.row.get("templates", ()))
        if not names and not self.config_templates:
            return None
        if names not in self._templates:
            from diffstudio.templates import TemplatePipeline

            self._templates[names] = TemplatePipeline.from_pretrained(
                torch_dtype=pipe.torch_dtype, device=str(pipe.device), model_configs=[*names, *self.config_templates],
                trust_code=self.trust_code, code_sha256=self.code_sha256, runtime=self.runtime,
            )  # fmt: skip
        return self._templates[names]

    def apply_loras(self, pipe: Any, loras: Sequence[Mapping[str, Any]]) -> list[tuple[str, str | None, float]]:
        """Make ``loras`` the pipeline's applied LoRAs; return ``(name, sha256, scale)`` for the record."""
        wanted = [(str(lora["path"]), float(lora["scale"])) for lora in loras]
        if wanted != self._loras:
            if not hasattr(pipe, "load_lora"):
                raise PipelineInputError(f"the {type(pipe).__name__} pipeline does not take LoRAs (--lora)")
            if self._loras:
                pipe.unload_lora()
            self._loras = []
            takes_config = "lora_config" in inspect.signature(pipe.load_lora).parameters
            for index, (path, scale) in enumerate(wanted):
                if not Path(path).is_file():
                    raise PipelineInputError(f"--lora {path}: no such file")
                name = f"lora{index}-{Path(path).stem}"
                if takes_config:
                    pipe.load_lora(lora_config=path, alpha=scale, name=name)
                else:
                    pipe.load_lora(path, scale, name=name)
                self._loras.append((path, scale))
        return [(Path(path).stem, self.sha256(path), scale) for path, scale in wanted]

    def sha256(self, path: str) -> str | None:
        """The file's SHA-256 (cached; None when hashing is off or the file cannot be read)."""
        if not self.hash_files:
            return None
        if path not in self._hashes:
            try:
                self._hashes[path] = file_sha256(path)
            except OSError:
                self._hashes[path] = None
        return self._hashes[path]

    # ------------------------------------------------------------------------------------------------------
    # one job
    # ------------------------------------------------------------------------------------------------------

    def check_hashes(self, item: PlannedJob) -> None:
        """Warn for every file whose SHA-256 differs from the one the job (a replayed record) expects."""
        for path, expected in (item.settings.get("sha256") or {}).items():
            if not Path(path).is_file():
                logger.warning("diffstudio: warning: %s: the recorded file %s is missing", item.job.where, path)
                continue
            actual = file_sha256(path)
            if actual != expected:
                logger.warning(
                    "diffstudio: warning: %s: %s has SHA-256 %s, the record says %s; the image will differ",
                    item.job.where, path, actual[:12], expected[:12],
                )  # fmt: skip

    def arguments(self, item: PlannedJob, pipe: Any, extra: Mapping[str, Any]) -> dict[str, Any]:
        """The pipeline call arguments of a job: its options, its images opened, and the Python extras."""
        settings = item.settings
        arguments = {k: v for k, v in settings.items() if k in CALL_FIELDS}
        if "input_image" in settings:
            arguments["input_image"] = _open_image(settings["input_image"], "--image", "RGB")
        if "inpaint_mask" in settings:
            arguments["inpaint_mask"] = _open_image(settings["inpaint_mask"], "--mask", "L")
        if "edit_image" in settings:
            name = next((n for n in _EDIT_ARGUMENTS if _accepts(pipe, n)), None)
            if name is None:
                raise PipelineInputError(f"the {type(pipe).__name__} pipeline takes no edit or reference images")
            arguments[name] = [_open_image(p, "--edit-image", "RGB") for p in settings["edit_image"]]
        if "embedded_guidance" in arguments and not _accepts(pipe, "embedded_guidance"):
            raise PipelineInputError(f"the {type(pipe).__name__} pipeline takes no distilled guidance (--guidance)")
        arguments.update(extra)
        return arguments

    def schedule(self, item: PlannedJob, pipe: Any) -> None:
        """Give the pipeline the job's noise schedule (or its default one)."""
        name, shift = item.settings.get("scheduler"), item.settings.get("shift")
        if name is None and shift is None:
            pipe.scheduler = self._default_scheduler
            return
        spec = self.runtime.hooks.schedulers().get(name or "static")
        pipe.scheduler = spec.factory(**({} if shift is None else {"shift": shift}))

    def generate(self, item: PlannedJob, extra: Mapping[str, Any], *, metadata: bool) -> None:
        """Generate and save the images of one job that are still to do."""
        from diffstudio.devices import compute_record
        from diffstudio.outputs import record_for, save_image

        pipe = self.pipeline(item)
        self.check_hashes(item)
        lora_records = self.apply_loras(pipe, item.row.get("loras", []))
        templates = self.template_pipeline(item, pipe)
        positive = item.settings.get("template_inputs")
        negative = item.settings.get("negative_template_inputs")
        if templates is None and (positive or negative):
            raise PipelineInputError(
                f"{item.job.where}: template inputs were given but no templates are loaded (add --template / "
                f"templates=)"
            )
        self.schedule(item, pipe)
        arguments = self.arguments(item, pipe, extra)
        files = [f for component in pipe.loaded.values() for f in component.files]
        files += [lora["path"] for lora in item.row.get("loras", [])] + list(item.row.get("edit_image", []))
        files += [item.row[k] for k in ("input_image", "inpaint_mask") if k in item.row]
        hashes = {f: h for f in files if (h := self.sha256(f)) is not None}
        for seed, path in item.todo:
            used: list[tuple[str, dict[str, Any]]] = []
            if templates is not None:
                images = templates(pipe, [item.job.prompt], seed=seed, template_inputs=positive,
                                   negative_template_inputs=negative, **arguments)  # fmt: skip
                used = templates.last_templates
            else:
                images = pipe([item.job.prompt], seed=seed, **arguments)
            image = images[0]
            job = {**item.row, "seed": seed, "num_images": 1, **({"sha256": hashes} if hashes else {})}
            record = record_for(pipe, prompt=item.job.prompt, seed=seed, image=image, arguments=arguments,
                                loras=lora_records, templates=used, hash_files=self.hash_files, job=job,
                                job_hash=item.digest)  # fmt: skip
            if self.memory:
                record.extra["memory"] = self.memory
            record.extra["compute"] = compute_record(self.device, item.row["dtype"])
            report = getattr(getattr(pipe, "last_run", None), "step_cache", None)
            if report:  # what the step cache did (--cache): in the record and in the result row
                record.extra["step_cache"] = report
                self.reports[path] = {"step_cache": report["cache"], "steps": report["steps"],
                                      "computed_steps": report["computed_steps"]}  # fmt: skip
            save_image(image, path, record, metadata=metadata)
