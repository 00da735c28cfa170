"""Training Diffusion Templates with ``diffstudio train`` (the seed's template arguments).

``--template_model_id_or_path`` loads one template through the one trust rule of :mod:`diffstudio.templates`:
a registered name (an installed package), a data-only folder or repository (``template.json``), or a seed-format
folder (``model.py``, executed only with ``--trust_code``). A ModelScope id may end in ``:`` as in the seed's
scripts (``"DiffSynth-Studio/Template-KleinBase4B-Brightness:"``). The model is set as ``pipe.template_model``;
``--trainable_models template_model`` trains all of it, ``template_model.mlp,template_model.head`` only those
sub-modules (the rest stays frozen).

Per row (``--extra_inputs template_inputs``; the column holds a JSON object): the template's data processor (if
any) turns ``template_inputs`` into ``process_inputs`` arguments, ``process_inputs`` runs without gradients,
``forward`` with them, and the cache goes to the base pipeline as call inputs, so the template units
(``flux2_extensions``, ``medium_lora_side_paths``, ``medium_residual_hook``, ...) repackage it with gradients
intact. Batches hold one sample (``--batch_size 1``; use ``--gradient_accumulation_steps`` for more), since a
LoRA cache cannot differ per sample within one DiT call.

Split training: ``--task sft:data_process`` stores, besides the base pipeline's cached units (text and VAE
encoding), every row's ``process_inputs`` output under ``<output_path>/cache/template/``, and leaves out of the
unit cache every unit that reads the template's cache (found by running the template once). ``--task sft:train``
reads them back and runs only ``forward`` and those units, so the losses equal one-stage training's.

Saving: the trained tensors under ``pipe.template_model.<name>`` (strip it with ``--remove_prefix_in_ckpt
pipe.template_model.``; partial when only sub-modules are trained), which is what the seed's packaging steps
(``load_template_model`` + ``load_state_dict`` + ``save_file``) and :func:`~diffstudio.templates.apply_checkpoint`
read. When the template's class is registered by an installed package, a data-only template folder is also
written beside each weights file (``epoch-1.safetensors`` -> ``epoch-1/``: ``template.json`` + the full
``model.safetensors``), which loads through ``TemplatePipeline`` with no code execution.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffstudio.errors import TemplateCacheKeyError
from diffstudio.train.checkpoints import save_weights
from diffstudio.train.config import TrainConfig, TrainConfigError
from diffstudio.train.outputs import strip_prefix

TEMPLATE_SLOT = "template_model"
"""The name the template model has in ``--trainable_models`` and (as ``pipe.template_model``) on the pipeline."""
TEMPLATE_PREFIX = "pipe.template_model."
"""Prefix of the template's tensors in the saved weights (the seed's ``--remove_prefix_in_ckpt`` value)."""
TEMPLATE_COLUMN = "template_inputs"
"""The data-set column (``--extra_inputs template_inputs``)."""

__all__ = [
    "TEMPLATE_COLUMN",
    "TEMPLATE_PREFIX",
    "TEMPLATE_SLOT",
    "TemplateTraining",
    "base_trainable",
    "template_source",
    "template_units",
]


def _is_template(name: str) -> bool:
    return name == TEMPLATE_SLOT or name.startswith(TEMPLATE_SLOT + ".")


def base_trainable(names: Sequence[str]) -> list[str]:
    """``--trainable_models`` entries that name base-pipeline components (``template_model[.sub]`` removed)."""
    return [name for name in names if not _is_template(name)]


def template_source(value: str) -> str:
    """The template source of ``--template_model_id_or_path``: a folder, or an id (a trailing ``:`` dropped)."""
    if value.endswith(":") and not Path(value).exists():
        return value[:-1]
    return value


def template_units(pipe: Any, keys: Sequence[str]) -> set[str]:
    """Names of the units that read a template-cache key, directly or through another such unit's outputs."""
    tainted = set(keys) | {f"negative_{key}" for key in keys}
    found: set[str] = set()
    for unit in pipe.units:
        reads = {p.name for p in unit.inputs} | {p.key_for("negative") for p in unit.inputs if p.per_branch}
        if reads & tainted:
            found.add(unit.name)
            tainted.update(p.name for p in unit.outputs)
    return found


class TemplateTraining:
    """The template side of one training run: the model, its data processor, caches and saving.

    Args:
        config: The run's options.
        runtime: The plugin runtime (template registry, medium plugins).
        pipe: The base pipeline; the model becomes ``pipe.template_model``.

    Raises:
        TrainConfigError: Template arguments that do not fit together (see :meth:`from_config`).
    """

    def __init__(self, config: TrainConfig, runtime: Any, pipe: Any) -> None:
        from diffstudio.templates import load_template

        self.config = config
        self.runtime = runtime
        assert config.template_model_id_or_path is not None
        dtype = getattr(torch, config.torch_dtype)
        self.loaded = load_template(
            template_source(config.template_model_id_or_path), runtime=runtime, torch_dtype=dtype,
            device=str(pipe.device), trust_code=config.trust_code,
        )  # fmt: skip
        self.model: nn.Module = self.loaded.model
        self.name = self.loaded.name
        processor = self.loaded.data_processor
        self.processor = processor() if processor is not None else None
        self.parts = self._trained_parts([n for n in config.trainable_models if _is_template(n)])
        with torch.no_grad():  # own storage: loaded weights may share one buffer with the file
            for tensor in [*self.model.parameters(), *self.model.buffers()]:
                tensor.data = tensor.data.clone()
        self.model.requires_grad_(False)
        self.model.eval()
        for part in self.parts.values():
            part.requires_grad_(True)
            part.train(True)
        pipe.template_model = self.model
        self._checked = False

    @classmethod
    def from_config(cls, config: TrainConfig, runtime: Any, pipe: Any) -> TemplateTraining | None:
        """The template side of a run, or None when no ``--template_model_id_or_path`` is given."""
        named = [n for n in config.trainable_models if _is_template(n)]
        if config.template_model_id_or_path is None:
            if named or TEMPLATE_COLUMN in config.extra_inputs:
                raise TrainConfigError(
                    f"--trainable_models {','.join(named) or '(none)'} / --extra_inputs {TEMPLATE_COLUMN} need "
                    "--template_model_id_or_path (the template to train: an installed name or a folder)"
                )
            return None
        if config.batch_size != 1:
            raise TrainConfigError(
                f"template training runs one sample per DiT call (--batch_size 1, got {config.batch_size}): a "
                "LoRA cache cannot differ per sample; use --gradient_accumulation_steps for larger batches"
            )
        if config.lora_base_model:
            raise TrainConfigError("--lora_base_model cannot be combined with template training")
        if TEMPLATE_COLUMN not in config.extra_inputs:
            raise TrainConfigError(
                f"template training reads the {TEMPLATE_COLUMN!r} column of every row: add --extra_inputs "
                f"{TEMPLATE_COLUMN}"
            )
        return cls(config, runtime, pipe)

    def _trained_parts(self, names: Sequence[str]) -> dict[str, nn.Module]:
        parts: dict[str, nn.Module] = {}
        modules = dict(self.model.named_modules())
        for name in names:
            sub = name[len(TEMPLATE_SLOT) + 1 :] if name != TEMPLATE_SLOT else ""
            if sub not in modules:
                shown = sorted(n for n in modules if n and "." not in n)
                raise TrainConfigError(
                    f"--trainable_models {name}: the template {self.name!r} has no sub-module {sub!r}; its "
                    f"top-level modules: {', '.join(shown) or '(none)'} (or train all of it: {TEMPLATE_SLOT})"
                )
            parts[sub] = modules[sub]
        return parts

    # -- per sample ---------------------------------------------------------------------------------------------

    def template_kwargs(self, sample: dict[str, Any]) -> dict[str, Any]:
        """Pop ``template_inputs`` from a loaded sample; return ``process_inputs``' arguments (data processor)."""
        raw = sample.pop(TEMPLATE_COLUMN, None)
        if raw is None:
            raw = {}
        if isinstance(raw, list) and len(raw) == 1:
            raw = raw[0]
        if not isinstance(raw, Mapping):
            raise TrainConfigError(
                f"the {TEMPLATE_COLUMN!r} column must hold a JSON object of template inputs, got "
                f"{type(raw).__name__} ({raw!r})"
            )
        inputs = {k: v for k, v in raw.items() if k != "model_id"}
        if self.processor is None:
            return inputs
        processed = self.processor(**inputs)
        if not isinstance(processed, Mapping):
            raise TrainConfigError(f"the data processor of {self.name!r} returned {type(processed).__name__}")
        return dict(processed)

    def processed(self, pipe: Any, sample: dict[str, Any], row: int, cached: bool) -> dict[str, Any]:
        """``process_inputs``' output for a sample: computed (no gradients) or read from the stage-1 cache."""
        from diffstudio.templates import process_template_inputs

        if cached:
            sample.pop(TEMPLATE_COLUMN, None)
            return self._load(row, str(pipe.device))
        return process_template_inputs(self.model, self.template_kwargs(sample), pipe=pipe, name=self.name)

    def cache(self, pipe: Any, processed: Mapping[str, Any]) -> dict[str, Any]:
        """``forward`` under the caller's grad mode: the template cache (its keys checked once)."""
        from diffstudio.templates import forward_template, pipeline_cache_keys

        cache = forward_template(
            self.model, processed, pipe=pipe, use_gradient_checkpointing=self.config.use_gradient_checkpointing,
            use_gradient_checkpointing_offload=self.config.use_gradient_checkpointing_offload, name=self.name,
        )  # fmt: skip
        if not self._checked:
            accepted, _ = pipeline_cache_keys(pipe)
            for key in cache:
                if key not in accepted:
                    raise TemplateCacheKeyError(self.name, key, sorted(accepted))
            self._checked = True
        return cache

    def add_cache(self, pipe: Any, sample: dict[str, Any], row: int, cached: bool) -> None:
        """Replace a loaded sample's ``template_inputs`` by the template cache (the trainer's per-sample hook)."""
        sample.update(self.cache(pipe, self.processed(pipe, sample, row, cached)))

    # -- split training, stage 1 ----------------------------------------------------------------------------------

    def folder(self) -> Path:
        """``<output_path>/cache/template``: the stored ``process_inputs`` outputs."""
        return Path(self.config.output_path) / "cache" / "template"

    def cacheable_units(self, pipe: Any, units: list[str], sample: dict[str, Any]) -> list[str]:
        """``units`` without those that read the template's cache (keys found by running it on ``sample``)."""
        with torch.no_grad():
            keys = list(self.cache(pipe, self.processed(pipe, dict(sample), -1, cached=False)))
        skipped = template_units(pipe, keys)
        return [name for name in units if name not in skipped]

    def store(self, pipe: Any, sample: dict[str, Any], row: int) -> Path:
        """Pop a sample's ``template_inputs``; write its ``process_inputs`` output (tensors; JSON in metadata)."""
        processed = self.processed(pipe, sample, row, cached=False)
        tensors: dict[str, torch.Tensor] = {}
        values: dict[str, Any] = {}
        for key, value in processed.items():
            if isinstance(value, torch.Tensor):
                tensors[key] = value
                continue
            try:
                values[key] = json.loads(json.dumps(value))
            except (TypeError, ValueError) as exc:
                raise TrainConfigError(
                    f"split training stores process_inputs outputs as tensors or JSON values; {self.name!r} returned "
                    f"{type(value).__name__} for {key!r}. Train in one stage (--task sft) or return tensors."
                ) from exc
        return save_weights(self._path(row), tensors, {"diffstudio.values": json.dumps(values)})

    def _path(self, row: int) -> Path:
        return self.folder() / f"{row:08d}.safetensors"

    def _load(self, row: int, device: str) -> dict[str, Any]:
        from safetensors import safe_open

        path = self._path(row)
        if not path.is_file():
            raise TrainConfigError(
                f"the template cache {path} is missing; re-run --task sft:data_process with the template"
            )
        out: dict[str, Any] = {}
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                out[key] = handle.get_tensor(key).to(device)
            metadata = handle.metadata() or {}
        out.update(json.loads(metadata.get("diffstudio.values", "{}")))
        return out

    # -- saving ---------------------------------------------------------------------------------------------------

    def trained_state(self) -> dict[str, torch.Tensor]:
        """The template tensors being trained, by their names in the template's own state dict."""
        state = self.model.state_dict()
        prefixes = [f"{sub}." if sub else "" for sub in self.parts]
        return {k: v for k, v in state.items() if any(k.startswith(p) for p in prefixes)}

    def save(self, path: Path, trained: Mapping[str, nn.Module] | nn.ModuleDict) -> Path:
        """Write the trained weights to ``path`` (and a data-only template folder beside it when registered).

        Args:
            path: ``<output_path>/epoch-N.safetensors`` (or ``step-N``).
            trained: Base components trained too (saved under ``pipe.<slot>.``).
        """
        from diffstudio.templates import export_template

        tensors = {TEMPLATE_PREFIX + k: v for k, v in self.trained_state().items()}
        for slot, module in trained.items():
            tensors.update({f"pipe.{slot}.{k}": v for k, v in module.state_dict().items()})
        record = {"template": self.loaded.registered_name or self.name, "kind": self.loaded.kind,
                  "trained": sorted(TEMPLATE_SLOT + (f".{s}" if s else "") for s in self.parts)}  # fmt: skip
        out = save_weights(path, strip_prefix(tensors, self.config.remove_prefix_in_ckpt),
                           {"diffstudio.template": json.dumps(record)})  # fmt: skip
        if self.loaded.registered_name is not None:
            export_template(self.model, path.with_suffix(""), name=self.loaded.registered_name,
                            config=self.loaded.config, runtime=self.runtime,
                            description=f"trained by diffstudio train ({os.path.basename(path)})")  # fmt: skip
        return out
