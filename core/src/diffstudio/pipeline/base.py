"""``BasePipeline``: what every family pipeline shares; here, the component container and loading.

The class is read in three files of one idea each: this one (components, ``from_pretrained``, ``load_component``,
memory budgets, ``activate``), :mod:`diffstudio.pipeline.runner` (units: assembly, order, running one) and
:mod:`diffstudio.pipeline.sampling` (``prepare``, the denoising loop, ``generate``).

A family subclasses it, names its component slots, implements :meth:`BasePipeline.predict_velocity` (its
``model_fn``) and contributes its units through the ``pipeline_unit`` hook. The base class loads components
through ``load_model`` claims and ``vram_policy`` strategies, assembles and orders units, runs them (positive /
negative / shared branches for CFG), runs the denoising loop (Euler steps of the pipeline's scheduler,
callbacks, progress bar) and converts the result to the requested ``output_type``.

Every call is checked before any compute (:mod:`diffstudio.pipeline.validate`, limits in
:mod:`diffstudio.pipeline.limits`); the latents are checked for NaN/Inf after the first and the last denoising
step. The diffusers names of arguments and methods are mapped once, here, for every family
(:mod:`diffstudio.pipeline.diffusers_api`): a family's ``__call__`` is wrapped when its class is defined.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from diffstudio.config import ModelConfig
from diffstudio.errors import ConfigError, NoPipelineError, PipelineInputError
from diffstudio.identify import identify, pipeline_for
from diffstudio.pipeline import pretrained
from diffstudio.pipeline.diffusers_api import DiffusersApi, wrap_call
from diffstudio.pipeline.limits import Limits
from diffstudio.pipeline.sampling import RunInfo, SamplingLoop, is_main_process
from diffstudio.pipeline.units import PipelineUnit
from diffstudio.pipeline.validate import OUTPUT_TYPES
from diffstudio.runtime import Runtime
from diffstudio.types import LoadRequest, MemoryBudget, ModelClaim, VramStrategy

__all__ = ["OUTPUT_TYPES", "BasePipeline", "LoadedComponent", "RunInfo", "WrongFamilyError", "is_main_process"]


class WrongFamilyError(PipelineInputError):
    """A checkpoint belongs to another family than the pipeline it was given to."""


@dataclass
class LoadedComponent:
    """A component in a pipeline slot, with where it came from (for metadata) and its memory strategy."""

    name: str
    module: Any
    strategy: VramStrategy | None = None
    claim: ModelClaim | None = None
    files: tuple[str, ...] = ()


def default_device() -> str:
    """Return ``"cuda"`` when a GPU is usable, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


class BasePipeline(SamplingLoop, DiffusersApi):
    """Base class of family pipelines.

    Class attributes set by families:
        family: Family name (matches ``ModelClaim.family``).
        pipeline_name: Registered pipeline name.
        slots: Component slot names with a description each.
        denoise_components: Slots used inside the denoising loop (onloaded for it).
        size_multiple: Height and width must be multiples of this.
        plugin_inputs: Call arguments served by optional plugins, mapped to the distribution to install.
        extension_inputs: Branch-state keys that :meth:`predict_velocity` hands to the denoiser's extension
            points (e.g. ``kv_extension``, ``dit_deltas``, ``block_residual``). Adapter and template-medium
            plugins contribute units that write these keys only to pipelines that list them, so a family opts
            in to a medium by honouring the key and naming it here.
        shared_families: Other claim families whose components this pipeline also takes (a shared encoder slot
            such as ``diffstudio-qwen-vl``'s ``"qwen-vl"``, or a sibling family's VAE); default none.

    Attributes:
        limits: This pipeline's size limits (:class:`~diffstudio.pipeline.limits.Limits`, read from the
            environment when the pipeline is created; set its fields to change them).
    """

    family: ClassVar[str] = ""
    pipeline_name: ClassVar[str] = ""
    slots: ClassVar[Mapping[str, str]] = {}
    denoise_components: ClassVar[tuple[str, ...]] = ("dit",)
    size_multiple: ClassVar[int] = 16
    plugin_inputs: ClassVar[Mapping[str, str]] = {}
    extension_inputs: ClassVar[frozenset[str]] = frozenset()
    shared_families: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        *,
        device: str | torch.device | None = None,
        torch_dtype: torch.dtype | str | None = torch.float32,
        runtime: Runtime | None = None,
        scheduler: Any = None,
        vram_prefetch: int = 1,
    ) -> None:
        dtype, checked = pretrained.check_dtype_device(torch_dtype, device)
        self.runtime = runtime if runtime is not None else Runtime()
        self.device = checked or default_device()
        self.torch_dtype = dtype
        self.limits = Limits.from_env()
        self.loaded: dict[str, LoadedComponent] = {}
        self.scheduler = scheduler if scheduler is not None else self.default_scheduler()
        self.vram_limit: float | None = None
        self.vram_prefetch = int(vram_prefetch)
        self._vram_ledgers: dict[str, Any] = {}
        self.progress_bar_config: dict[str, Any] = {}
        self.last_run = RunInfo()
        self._units: list[PipelineUnit] | None = None
        self._unit_owners: dict[str, str] = {}

    # ----------------------------------------------------------------------------------------------------------
    # components
    # ----------------------------------------------------------------------------------------------------------

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Wrap a family's own ``__call__`` with the argument checks and diffusers names (once per class)."""
        super().__init_subclass__(**kwargs)
        call = cls.__dict__.get("__call__")
        if call is not None:
            cls.__call__ = wrap_call(call)  # type: ignore[method-assign]

    def default_scheduler(self) -> Any:
        """Return the family's default scheduler (families override)."""
        return None

    def __getattr__(self, name: str) -> Any:
        loaded = self.__dict__.get("loaded")
        if loaded is not None and name in type(self).slots:
            component = loaded.get(name)
            return None if component is None else component.module
        raise AttributeError(f"{type(self).__name__!s} has no attribute {name!r}")

    def has(self, slot: str) -> bool:
        """True when the slot holds a component."""
        return slot in self.loaded

    def set_component(
        self,
        slot: str,
        module: Any,
        *,
        strategy: VramStrategy | None = None,
        claim: ModelClaim | None = None,
        files: Sequence[str] = (),
    ) -> None:
        """Put ``module`` into ``slot`` (replacing what was there) and reassemble units."""
        if slot not in type(self).slots:
            raise PipelineInputError(
                f"{type(self).__name__} has no component slot {slot!r}; slots: {', '.join(type(self).slots)}"
            )
        self.loaded[slot] = LoadedComponent(slot, module, strategy, claim, tuple(files))
        self._units = None

    @classmethod
    def from_pretrained(
        cls,
        *args: Any,
        torch_dtype: torch.dtype | str | None = None,
        device: str | torch.device | None = None,
        model_configs: Iterable[ModelConfig] = (),
        tokenizer_config: ModelConfig | None = None,
        vram_limit: float | None = None,
        runtime: Runtime | None = None,
        **kwargs: Any,
    ) -> BasePipeline:
        """Load a pipeline from a repository and/or ``ModelConfig`` entries (one per model file set).

        Args:
            *args: Optionally the repository first, as in diffusers: a diffusers folder (``model_index.json``
                and component folders), a checkpoint file or component folder, or a model id (see
                :mod:`diffstudio.pipeline.pretrained`); the seed's positional ``torch_dtype, device,
                model_configs`` are also accepted.
            torch_dtype: Computation dtype of the pipeline: a floating ``torch.dtype`` or its name
                (``"bfloat16"``, ``"fp16"``); default ``torch.bfloat16``.
            device: Computation device, a string or ``torch.device`` (default: CUDA if available, else CPU).
            model_configs: One config per component; each checkpoint is identified by the installed families.
                Loaded after the repository's components (a component given here replaces the repository's).
            tokenizer_config: The tokenizer folder, for families that need one.
            vram_limit: Memory budget on the computation device, in GiB (None: no limit). It is this pipeline's
                own budget, shared by its models and accounted by their memory strategies.
            runtime: The plugin runtime to use (default: a new one reading the installed plugins).
            **kwargs: Family-specific options; ``vram_prefetch=N`` sets how many streamed units are copied
                ahead on CUDA (default 1).

        Raises:
            ConfigError: A wrong ``torch_dtype`` / ``device`` / ``model_configs`` / option, or a repository that
                is neither a path nor a model id.
        """
        named: dict[str, Any] = {"torch_dtype": torch_dtype, "device": device, "model_configs": model_configs}
        repo = pretrained.split_positional(args, named, {"torch_dtype": None, "device": None, "model_configs": ()})
        configs = pretrained.check_model_configs(named["model_configs"])
        if tokenizer_config is not None and not isinstance(tokenizer_config, ModelConfig):
            raise ConfigError(f"tokenizer_config is a {type(tokenizer_config).__name__}, not a ModelConfig")
        unknown = sorted(set(kwargs) - pretrained.init_options(cls, BasePipeline))
        if unknown:
            raise ConfigError(
                f"{cls.__name__}.from_pretrained() got unknown argument(s) {unknown}; accepted: torch_dtype, device, "
                f"model_configs, tokenizer_config, vram_limit, runtime, "
                f"{', '.join(sorted(pretrained.init_options(cls, BasePipeline)))}"
            )
        if vram_limit is not None and (isinstance(vram_limit, bool) or not isinstance(vram_limit, (int, float))):
            raise PipelineInputError(f"vram_limit={vram_limit!r} is not a number of GiB; pass e.g. 8.0, or None")
        if vram_limit is not None and not 0 <= vram_limit < float("inf"):
            raise PipelineInputError(f"vram_limit={vram_limit} GiB must be a finite number >= 0 (or None for no limit)")
        pipe = cls(device=named["device"], torch_dtype=named["torch_dtype"], runtime=runtime, **kwargs)
        pipe.vram_limit = vram_limit
        if repo is not None:
            configs = pretrained.repository_configs(repo, pipe.runtime) + configs
        for config in configs:
            pipe.load_component(config)
        if tokenizer_config is not None:
            pipe.load_tokenizer(tokenizer_config)
        return pipe

    def load_component(self, config: ModelConfig) -> ModelClaim:
        """Load one checkpoint into the slot its family claim names, under the chosen memory strategy.

        The checkpoint is identified once (or taken from an enclosing :func:`diffstudio.identify.identified`
        block) and closed once its module is built; the module's tensors keep their own memory maps.
        """
        checkpoint, claim = identify(self.runtime, config)
        with checkpoint:
            if claim.family != self.family and claim.family not in type(self).shared_families:
                raise WrongFamilyError(
                    f"{checkpoint.source} is a {claim.model_type} checkpoint of the {claim.family!r} family "
                    f"(claimed by plugin {claim.plugin!r}); {type(self).__name__} runs {self.family!r} models. "
                    f"{self._serving(claim)}"
                )
            budget = self.memory_budget(config)
            if budget.managed:  # as stored (file dtypes, memory-mapped on CPU): the strategy places every tensor
                request = LoadRequest(config, None, "cpu")
            else:
                request = LoadRequest(config, budget.computation_dtype, budget.computation_device)
            module = claim.load(checkpoint, request)
        strategy = self.runtime.hooks.vram_policy(module, claim.component, budget, self)
        module = strategy.apply(module)
        self.set_component(
            claim.component, module, strategy=strategy, claim=claim, files=[str(f) for f in checkpoint.files]
        )
        return claim

    def _serving(self, claim: ModelClaim) -> str:
        """Advice naming the pipeline that serves ``claim`` (the answer ``diffstudio run`` uses too)."""
        try:
            spec = pipeline_for(self.runtime, claim)
        except NoPipelineError:
            return f"No installed pipeline runs it; install the {claim.family} family's plugin."
        return f"Use the {claim.family} pipeline for it ({spec.name!r}: {spec.factory().__name__}.from_pretrained)."

    def memory_budget(self, config: ModelConfig) -> MemoryBudget:
        """Build the ``vram_policy`` budget from a config's memory fields and the pipeline's defaults."""
        memory = config.memory_config()
        device = str(memory.get("computation_device") or self.device)
        dtype = memory.get("computation_dtype") or self.torch_dtype
        limit = None if self.vram_limit is None else int(self.vram_limit * 1024**3)

        def pick(key: str, fallback: Any) -> Any:
            value = memory.get(key)
            return fallback if value is None else value

        return MemoryBudget(
            offload_device=str(pick("offload_device", device)),
            offload_dtype=pick("offload_dtype", dtype),
            onload_device=str(pick("onload_device", device)),
            onload_dtype=pick("onload_dtype", dtype),
            preparing_device=str(pick("preparing_device", device)),
            preparing_dtype=pick("preparing_dtype", dtype),
            computation_device=device,
            computation_dtype=dtype,
            vram_limit_bytes=limit,
            managed=config.has_memory_fields,
            prefetch_depth=self.vram_prefetch,
        )

    def vram_ledger(self, device: str) -> Any:
        """The budget ledger of ``device`` shared by this pipeline's memory strategies (created on first use)."""
        from diffstudio.vram.ledger import DeviceLedger

        key = str(torch.device(device))
        ledger = self._vram_ledgers.get(key)
        if ledger is None:
            limit = None if self.vram_limit is None else int(self.vram_limit * 1024**3)
            ledger = self._vram_ledgers[key] = DeviceLedger(key, limit)
        return ledger

    def vram_report(self) -> dict[str, dict[str, Any]]:
        """What each component's memory strategy placed where, as plain data (``{slot: report dict}``).

        Components without a reporting strategy are described by their tensors' devices, dtypes and bytes.
        """
        reports: dict[str, dict[str, Any]] = {}
        for name, component in self.loaded.items():
            report = getattr(component.strategy, "report", None)
            if callable(report):
                reports[name] = report().as_dict()
                continue
            module = component.module
            tensors = list(module.parameters()) + list(module.buffers()) if isinstance(module, torch.nn.Module) else []
            places = sorted({f"{t.device}/{str(t.dtype).removeprefix('torch.')}" for t in tensors})
            reports[name] = {
                "component": name,
                "strategy": getattr(component.strategy, "name", "none"),
                "onloaded": True,
                "computation": "+".join(places),
                "resident_bytes": sum(t.numel() * t.element_size() for t in tensors),
            }
        return reports

    def load_tokenizer(self, config: ModelConfig) -> None:
        """Load the tokenizer(s) named by ``tokenizer_config`` (families that use one override this)."""
        raise PipelineInputError(f"{type(self).__name__} takes no tokenizer_config")

    def activate(self, slots: Iterable[str]) -> None:
        """Onload the components in ``slots`` and offload every other (memory strategies decide how)."""
        wanted = set(slots)
        strategies = [(name, c.strategy) for name, c in self.loaded.items() if c.strategy is not None]
        for name, strategy in strategies:  # release first, so the budget is free for what comes next
            if name not in wanted:
                strategy.offload()
        for name, strategy in strategies:
            if name in wanted:
                strategy.onload()
