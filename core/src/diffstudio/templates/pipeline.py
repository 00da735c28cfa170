"""``TemplatePipeline``: runs several template models and hands their merged cache to a base pipeline.

Each template-input dict goes to one template (``model_id`` routes it: an index into ``model_configs`` or the
template's ``model_id`` / name; default 0). The template turns it into a **cache**: a dict whose keys are inputs
of the base pipeline. Caches of several templates are merged per key through the ``template_cache_merge`` hook
(KV caches along tokens, LoRA along rank, residuals summed: each medium plugin owns its keys); negative caches
(from ``negative_template_inputs``) go to the negative CFG branch as ``negative_<key>``. A key the base pipeline
does not declare is a :class:`~diffstudio.errors.TemplateCacheKeyError` naming the template, the key and the
accepted keys; nothing is silently dropped.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from diffstudio.config import ModelConfig
from diffstudio.errors import CacheMergeError, TemplateCacheKeyError, TemplateError, TemplateInputError
from diffstudio.templates.geometry import check_geometry
from diffstudio.templates.loading import LoadedTemplate, load_template
from diffstudio.templates.protocol import forward_template, process_template_inputs
from diffstudio.templates.trust import check_trust_flag, require_pin

if TYPE_CHECKING:
    import torch

    from diffstudio.pipeline.base import BasePipeline
    from diffstudio.runtime import Runtime

__all__ = ["TemplatePipeline", "pipeline_cache_keys"]


def pipeline_cache_keys(pipe: BasePipeline) -> tuple[set[str], dict[str, str]]:
    """What a template cache may name for ``pipe``.

    Returns:
        ``(positive, negative_of)``: every input the pipeline accepts (call-signature arguments and unit inputs),
        and for inputs that exist per CFG branch, the key their negative form is passed as (``kv_cache`` ->
        ``negative_kv_cache``).
    """
    positive = set(pipe.accepted_inputs())
    signature = inspect.signature(type(pipe).__call__)
    positive |= {
        name
        for name, p in signature.parameters.items()
        if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    }
    negative_of: dict[str, str] = {}
    for unit in pipe.units:
        for param in unit.inputs:
            if param.per_branch:
                negative_of[param.name] = param.key_for("negative")
    for name in positive:
        if name not in negative_of and f"negative_{name}" in positive:
            negative_of[name] = f"negative_{name}"
    return positive, negative_of


def _to_device(value: Any, device: str) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_to_device(v, device) for v in value)
    if isinstance(value, list):
        return [_to_device(v, device) for v in value]
    return value


class TemplatePipeline:
    """Loads template models and runs a base pipeline with their merged caches.

    Args:
        templates: Loaded templates, or ``ModelConfig`` entries to load on first use (``lazy_loading``).
        runtime: The plugin runtime (template registry); default: a new one.
        torch_dtype: Dtype of lazily loaded templates.
        device: Device of lazily loaded templates.
        trust_code: Per-template opt-in to execute seed-format ``model.py`` (lazy loading).
        code_sha256: Per-template SHA-256 pins (lazy loading).
    """

    def __init__(
        self,
        templates: Sequence[LoadedTemplate | ModelConfig],
        *,
        runtime: Runtime | None = None,
        torch_dtype: torch.dtype | None = None,
        device: str = "cpu",
        trust_code: bool = False,
        code_sha256: Sequence[str | None] | None = None,
    ) -> None:
        from diffstudio.runtime import Runtime

        self.trust_code = check_trust_flag(trust_code)
        if not templates:
            raise TemplateError("TemplatePipeline needs at least one template (model_configs=[ModelConfig(...)])")
        if isinstance(code_sha256, str):
            code_sha256 = [code_sha256] * len(templates)
        elif code_sha256 is not None and not isinstance(code_sha256, (list, tuple)):
            require_pin(code_sha256)
        self._pins: list[str | None] = (
            [require_pin(pin, f"code_sha256[{i}]") for i, pin in enumerate(code_sha256)]
            if code_sha256 is not None
            else [None] * len(templates)
        )
        if len(self._pins) != len(templates):
            raise TemplateError(f"code_sha256 has {len(self._pins)} entries for {len(templates)} templates")
        self.runtime = runtime if runtime is not None else Runtime()
        self.torch_dtype = torch_dtype
        self.device = device
        self._entries: list[LoadedTemplate | ModelConfig] = list(templates)
        self._sources = list(templates)
        self.lazy_loading = False
        self.last_templates: list[tuple[str, dict[str, Any]]] = []

    @classmethod
    def from_pretrained(
        cls,
        torch_dtype: torch.dtype | None = None,
        device: str | None = None,
        model_configs: Sequence[ModelConfig | str | os.PathLike[str]] = (),
        *,
        trust_code: bool = False,
        code_sha256: str | Sequence[str | None] | None = None,
        lazy_loading: bool = False,
        runtime: Runtime | None = None,
    ) -> TemplatePipeline:
        """Load templates (installed names, data-only folders, or trusted seed-format folders).

        Args:
            torch_dtype: Dtype of the templates' floating-point weights.
            device: Where the templates run (default: CUDA when available).
            model_configs: One entry per template: ``ModelConfig(model_id=...)`` (a registered template name or a
                repository in the local caches), ``ModelConfig(path=folder)``, or a name / folder directly.
            trust_code: Allow executing seed-format ``model.py`` files (see :mod:`diffstudio.templates.trust`).
            code_sha256: SHA-256 pin of each ``model.py`` (one string for a single template, or one per config).
            lazy_loading: Load each template when its inputs first arrive, keeping one in memory at a time.
            runtime: The plugin runtime.
        """
        from diffstudio.pipeline.base import default_device
        from diffstudio.runtime import Runtime

        check_trust_flag(trust_code)
        check_trust_flag(lazy_loading, "lazy_loading")
        if code_sha256 is not None and not isinstance(code_sha256, (str, list, tuple)):
            require_pin(code_sha256)
        runtime = runtime if runtime is not None else Runtime()
        device = device or default_device()
        if isinstance(model_configs, (str, os.PathLike, ModelConfig)):
            model_configs = [model_configs]
        configs = [c if isinstance(c, ModelConfig) else _as_config(c) for c in model_configs]
        pins = [code_sha256] * len(configs) if isinstance(code_sha256, str) or code_sha256 is None else code_sha256
        if len(pins) != len(configs):
            raise TemplateError(f"code_sha256 has {len(pins)} entries for {len(configs)} model_configs")
        pipeline = cls(configs, runtime=runtime, torch_dtype=torch_dtype, device=device, trust_code=trust_code,
                       code_sha256=list(pins))  # fmt: skip
        pipeline.lazy_loading = lazy_loading
        if not lazy_loading:
            for index in range(len(configs)):
                pipeline.fetch(index)
        return pipeline

    # ------------------------------------------------------------------------------------------------------
    # templates
    # ------------------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._entries)

    def fetch(self, index: int) -> LoadedTemplate:
        """Return template ``index``, loading it if needed (lazy entries release the previously loaded one)."""
        entry = self._entries[index]
        if isinstance(entry, LoadedTemplate):
            return entry
        if self.lazy_loading:  # keep one lazily loaded template in memory
            for other, source in enumerate(self._sources):
                if other != index and isinstance(source, ModelConfig):
                    self._entries[other] = source
        loaded = load_template(entry, runtime=self.runtime, torch_dtype=self.torch_dtype, device=self.device,
                               trust_code=self.trust_code, code_sha256=self._pins[index])  # fmt: skip
        self._entries[index] = loaded
        return loaded

    @property
    def templates(self) -> list[LoadedTemplate]:
        """Every template, loaded."""
        return [self.fetch(i) for i in range(len(self._entries))]

    def _names(self, index: int) -> set[str]:
        entry = self._entries[index]
        if isinstance(entry, ModelConfig):
            return {n for n in (entry.model_id, entry.describe()) if n}
        return {n for n in (entry.model_id, entry.name, entry.registered_name, entry.source) if n}

    def route(self, inputs: Mapping[str, Any]) -> int:
        """Index of the template a template-input dict goes to (its ``model_id``; default 0)."""
        model_id = inputs.get("model_id", 0)
        count = len(self._entries)
        if isinstance(model_id, int) and not isinstance(model_id, bool):
            if 0 <= model_id < count:
                return model_id
            raise TemplateInputError(f"model_id={model_id} but {count} template(s) are loaded (indices 0..{count - 1})")
        if isinstance(model_id, str):
            for index in range(count):
                if model_id in self._names(index):
                    return index
        known = [sorted(self._names(i)) for i in range(count)]
        raise TemplateInputError(f"model_id={model_id!r} names no loaded template; use an index or one of {known}")

    # ------------------------------------------------------------------------------------------------------
    # caches
    # ------------------------------------------------------------------------------------------------------

    def template_caches(
        self, pipe: BasePipeline | None, template_inputs: Sequence[Mapping[str, Any]]
    ) -> list[tuple[str, dict[str, Any]]]:
        """Run every template-input dict through its template: ``[(template name, cache), ...]``.

        Runs under the caller's grad mode (``__call__`` disables gradients; a trainer may keep them).

        Raises:
            TemplateGeometryError: A template was made for a DiT of another geometry than ``pipe``'s.
        """
        caches: list[tuple[str, dict[str, Any]]] = []
        for position, inputs in enumerate(template_inputs):
            if not isinstance(inputs, Mapping):
                raise TemplateInputError(
                    f"template_inputs[{position}] is {type(inputs).__name__}; pass one dict per template"
                )
            template = self.fetch(self.route(inputs))
            check_geometry(template.name, template.dit_geometry, pipe)
            processed = process_template_inputs(template.model, inputs, pipe=pipe, name=template.name)
            cache = forward_template(template.model, processed, pipe=pipe, name=template.name)
            caches.append((template.name, cache))
        return caches

    def merge(self, pipe: BasePipeline, caches: Sequence[tuple[str, Mapping[str, Any]]]) -> dict[str, Any]:
        """Merge caches per key with the ``template_cache_merge`` hook (one value passes through)."""
        grouped: dict[str, list[tuple[str, Any]]] = {}
        for name, cache in caches:
            for key, value in cache.items():
                grouped.setdefault(key, []).append((name, value))
        merged: dict[str, Any] = {}
        for key, values in grouped.items():
            if len(values) == 1:
                merged[key] = values[0][1]
                continue
            try:
                merged[key] = pipe.runtime.hooks.template_cache_merge(key, [v for _, v in values], pipe)
            except CacheMergeError as exc:
                names = [n for n, _ in values]
                raise CacheMergeError(f"merging {key!r} from the templates {names} failed: {exc}") from exc
        return merged

    def pipeline_inputs(
        self,
        pipe: BasePipeline,
        template_inputs: Sequence[Mapping[str, Any]] | None = None,
        negative_template_inputs: Sequence[Mapping[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """The base-pipeline keyword arguments the templates produce (negative ones as ``negative_<key>``).

        Raises:
            TemplateCacheKeyError: A cache names an input the base pipeline does not declare.
            CacheMergeError: Two templates' values for one key cannot be merged.
        """
        positive, negative_of = pipeline_cache_keys(pipe)
        out: dict[str, Any] = {}
        for branch, inputs in (("positive", template_inputs), ("negative", negative_template_inputs)):
            if not inputs:
                continue
            caches = self.template_caches(pipe, inputs)
            for name, cache in caches:
                for key in cache:
                    if branch == "positive" and key not in positive:
                        raise TemplateCacheKeyError(name, key, sorted(positive))
                    if branch == "negative" and key not in negative_of:
                        raise TemplateCacheKeyError(name, key, sorted(negative_of), branch="negative")
            merged = self.merge(pipe, caches)
            for key, value in merged.items():
                out[key if branch == "positive" else negative_of[key]] = _to_device(value, str(pipe.device))
        return out

    def __call__(
        self,
        pipe: BasePipeline,
        *args: Any,
        template_inputs: Sequence[Mapping[str, Any]] | None = None,
        negative_template_inputs: Sequence[Mapping[str, Any]] | None = None,
        **pipe_kwargs: Any,
    ) -> Any:
        """Run the templates (without gradients), then ``pipe(*args, **pipe_kwargs, **caches)``.

        Args:
            pipe: The base pipeline (e.g. ``Flux2ImagePipeline``).
            *args: Positional arguments of the base pipeline (the prompt).
            template_inputs: One dict per template application (``model_id`` routes it).
            negative_template_inputs: The same for the negative CFG branch.
            **pipe_kwargs: Every other base-pipeline argument (``prompt``, ``seed``, ``cfg_scale``, ...).

        Returns:
            What the base pipeline returns.

        Raises:
            TemplateError: Also when a cache key collides with an argument given explicitly.
        """
        import torch

        with torch.no_grad():
            extra = self.pipeline_inputs(pipe, template_inputs, negative_template_inputs)
        clash = sorted(set(extra) & set(pipe_kwargs))
        if clash:
            raise TemplateError(f"the templates produce {clash}, which are also passed explicitly; pass them once")
        self.last_templates = [
            (self.fetch(self.route(i)).name, {k: v for k, v in i.items()}) for i in (template_inputs or [])
        ]
        call: Any = pipe
        return call(*args, **pipe_kwargs, **extra)


def _as_config(source: str | os.PathLike[str]) -> ModelConfig:
    from pathlib import Path

    if not isinstance(source, (str, os.PathLike)):
        raise TemplateError(
            f"model_configs entries must be ModelConfig, a registered template name or a folder; got "
            f"{type(source).__name__}"
        )
    if isinstance(source, str) and not Path(source).exists():
        return ModelConfig(model_id=source)
    return ModelConfig(path=os.fspath(source))
