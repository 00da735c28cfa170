"""``BasePipeline``: what every family pipeline shares.

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

import os
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from diffstudio.config import ModelConfig
from diffstudio.errors import ConfigError, MissingPluginError, NoPipelineError, PipelineInputError, UnitGraphError
from diffstudio.identify import identify, pipeline_for
from diffstudio.pipeline import pretrained
from diffstudio.pipeline.diffusers_api import DiffusersApi, wrap_call
from diffstudio.pipeline.limits import Limits
from diffstudio.pipeline.state import PipelineState
from diffstudio.pipeline.units import Branch, PipelineUnit, order_units
from diffstudio.pipeline.validate import OUTPUT_TYPES, check_callback_updates, check_values, ensure_finite
from diffstudio.runtime import Runtime
from diffstudio.types import LoadRequest, MemoryBudget, ModelClaim, VramStrategy

__all__ = ["OUTPUT_TYPES", "BasePipeline", "LoadedComponent", "RunInfo", "WrongFamilyError"]


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


@dataclass
class RunInfo:
    """What the last call used: per-image seeds and the effective arguments (for metadata)."""

    seeds: list[int] = field(default_factory=list)
    arguments: dict[str, Any] = field(default_factory=dict)


def default_device() -> str:
    """Return ``"cuda"`` when a GPU is usable, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def is_main_process() -> bool:
    """True unless this process is a non-zero rank of a distributed launch (``RANK`` / ``LOCAL_RANK``)."""
    return os.environ.get("RANK", "0") in ("", "0") and os.environ.get("LOCAL_RANK", "0") in ("", "0")


class BasePipeline(DiffusersApi):
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
            if claim.family != self.family:
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

    # ----------------------------------------------------------------------------------------------------------
    # units
    # ----------------------------------------------------------------------------------------------------------

    @property
    def units(self) -> list[PipelineUnit]:
        """The ordered units of this pipeline (assembled through ``pipeline_unit`` on first use)."""
        if self._units is None:
            contributed = self.runtime.hooks.pipeline_units(self)
            self._unit_owners = {unit.name: owner for owner, unit in contributed}
            self._units = order_units([unit for _, unit in contributed])
        return self._units

    def unit_owner(self, name: str) -> str:
        """Return the plugin that contributed unit ``name``."""
        _ = self.units
        return self._unit_owners[name]

    def accepted_inputs(self) -> set[str]:
        """Names of every call argument some unit declares (positive and negative forms)."""
        names: set[str] = set()
        for unit in self.units:
            for param in unit.inputs:
                names.add(param.name)
                if param.per_branch:
                    names.add(param.key_for("negative"))
        return names

    def check_inputs(self, inputs: Mapping[str, Any], fixed: Iterable[str] = ()) -> None:
        """Reject call arguments that no unit reads; name the plugin to install for known adapter inputs."""
        accepted = self.accepted_inputs() | set(fixed)
        for key, value in inputs.items():
            if key in accepted:
                continue
            if key in type(self).plugin_inputs:
                if value is None:
                    continue
                raise MissingPluginError(f"The argument {key!r}", type(self).plugin_inputs[key])
            raise PipelineInputError(
                f"{type(self).__name__} got an unknown argument {key!r}. Accepted: {', '.join(sorted(accepted))}."
            )

    def run_unit(self, unit: PipelineUnit, state: PipelineState, cfg: bool, **extra: Any) -> None:
        """Run one unit on the shared state or on each branch, and check its declared outputs."""
        missing = [c for c in unit.components if c not in self.loaded and c not in unit.optional_components]
        if missing:
            raise UnitGraphError(
                f"unit {unit.name!r} needs the component(s) {missing}, which are not loaded; add a ModelConfig "
                f"for them to from_pretrained"
            )
        if unit.components:
            self.activate(unit.components)
        branches: tuple[Branch, ...] = ("shared",)
        if unit.per_branch:
            branches = ("positive", "negative") if cfg else ("positive",)
        for branch in branches:
            kwargs: dict[str, Any] = {}
            source = state.shared if branch == "shared" else state.view(branch)
            for param in unit.inputs:
                key = param.key_for(branch)
                if branch != "shared" and not param.per_branch:
                    value = state.shared.get(key)
                else:
                    value = source.get(key)
                if value is None and param.required:
                    raise UnitGraphError(
                        f"unit {unit.name!r} needs the input {key!r}, which no call argument or earlier unit provided"
                    )
                kwargs[param.name] = value
            result = unit.process(self, **kwargs, **extra)
            declared = {p.name for p in unit.outputs}
            undeclared = set(result) - declared
            if undeclared:
                raise UnitGraphError(f"unit {unit.name!r} wrote undeclared outputs {sorted(undeclared)}")
            not_written = [p.name for p in unit.outputs if not p.optional and p.name not in result]
            if not_written:
                raise UnitGraphError(f"unit {unit.name!r} did not write its declared outputs {not_written}")
            state.branch(branch).update(result)

    # ----------------------------------------------------------------------------------------------------------
    # generation
    # ----------------------------------------------------------------------------------------------------------

    def check_size(self, height: int, width: int) -> None:
        """Raise ``PipelineInputError`` unless both sides are positive multiples of ``size_multiple``."""
        m = type(self).size_multiple
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value <= 0 or value % m:
                lower = max(m, (int(value) // m) * m) if isinstance(value, int) else m
                raise PipelineInputError(
                    f"{name}={value!r} is not a positive multiple of {m}; use e.g. {lower} or {lower + m}"
                )

    @staticmethod
    def seeds_for(seed: int | None, batch: int) -> list[int]:
        """Per-image seeds: ``seed + i``; a random base seed (recorded) when ``seed`` is None."""
        base = random.SystemRandom().randrange(0, 2**31) if seed is None else int(seed)
        return [base + i for i in range(batch)]

    def generate_noise(
        self,
        shape: Sequence[int],
        seeds: Sequence[int],
        rand_device: str = "cpu",
        rand_dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Draw one noise tensor per seed and stack them.

        Args:
            shape: Shape of one image's noise (no batch axis).
            seeds: One seed per image.
            rand_device: Where the generator runs; ``"cpu"`` gives the same noise on every device.
            rand_dtype: Dtype the noise is drawn in.

        Returns:
            ``(len(seeds), *shape)`` on the pipeline device, in the pipeline dtype.
        """
        draws = []
        for s in seeds:
            generator = torch.Generator(rand_device).manual_seed(int(s))
            draws.append(torch.randn(tuple(shape), generator=generator, device=rand_device, dtype=rand_dtype))
        return torch.stack(draws).to(device=self.device, dtype=self.torch_dtype)

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        """Configure the progress bar like diffusers (``disable=True``, ``desc=...``, any tqdm argument)."""
        self.progress_bar_config.update(kwargs)

    def progress(self, iterable: Sequence[Any], progress_bar_cmd: Callable[..., Any] | None) -> Iterable[Any]:
        """Wrap the denoising loop in a progress bar (tqdm by default; main process only)."""
        if progress_bar_cmd is None:
            from tqdm.auto import tqdm

            progress_bar_cmd = tqdm
        config = dict(self.progress_bar_config)
        config.setdefault("disable", not is_main_process())
        if progress_bar_cmd.__module__.startswith("tqdm"):
            result: Iterable[Any] = progress_bar_cmd(iterable, **config)
            return result
        return progress_bar_cmd(iterable)  # type: ignore[no-any-return]

    def call_inputs(self, prompt: Any, **kwargs: Any) -> dict[str, Any]:
        """Turn call arguments into the state inputs that :meth:`generate` runs (the trainer's entry too).

        Families implement it with the seed's argument names and defaults; their ``__call__`` is
        ``self.generate(self.call_inputs(prompt, **kwargs))``. The trainer calls it with one prompt, the
        training image as ``input_image`` and ``denoising_strength=1`` to get a complete set of inputs.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement call_inputs()")

    def predict_velocity(self, inputs: Mapping[str, Any], step_index: int, timestep: torch.Tensor) -> torch.Tensor:
        """Run the denoiser for one branch (the family's ``model_fn``).

        Args:
            inputs: The branch's view of the state (branch outputs over shared values).
            step_index: Index of the denoising step.
            timestep: The scheduler's timestep for this step.

        Returns:
            The predicted velocity, same shape as ``inputs["latents"]``.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement predict_velocity()")

    def guidance(self, positive: torch.Tensor, negative: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        """Classifier-free guidance: ``negative + cfg_scale * (positive - negative)``."""
        return negative + cfg_scale * (positive - negative)

    def denoise(
        self,
        state: PipelineState,
        *,
        cfg: bool,
        progress_bar_cmd: Callable[..., Any] | None = None,
        callback_on_step_end: Callable[..., Any] | None = None,
    ) -> None:
        """The denoising loop: step units, model calls per branch, CFG, Euler step, callbacks."""
        timesteps = state.shared["timesteps"]
        step_units = [u for u in self.units if u.stage == "step"]
        cfg_scale = float(state.shared.get("cfg_scale") or 1.0)
        self.activate(self.denoise_components)
        for index in self.progress(range(len(timesteps)), progress_bar_cmd):
            timestep = timesteps[index]
            for unit in step_units:
                self.run_unit(unit, state, cfg, step_index=index, timestep=timestep)
            velocity = self.predict_velocity(state.view("positive"), index, timestep)
            if cfg:
                negative = self.predict_velocity(state.view("negative"), index, timestep)
                velocity = self.guidance(velocity, negative, cfg_scale)
            velocity = self.blend_inpaint(state, velocity, index)
            state.shared["latents"] = self.scheduler.step(velocity, index, state.shared["latents"])
            if index == 0 or index == len(timesteps) - 1:
                ensure_finite(state.shared["latents"], f"in the latents after denoising step {index + 1}")
            if callback_on_step_end is not None:
                updates = callback_on_step_end(self, index, timestep, {"latents": state.shared["latents"]})
                if updates:
                    state.shared.update(check_callback_updates(updates, state.shared["latents"]))
        self.activate(())

    def blend_inpaint(self, state: PipelineState, velocity: torch.Tensor, index: int) -> torch.Tensor:
        """Keep the unmasked region on the input image's trajectory (when ``inpaint_mask`` is set).

        ``inpaint_mask`` is ``(B, L, 1)`` in token layout, 1 where the image is repainted.
        """
        mask = state.shared.get("inpaint_mask")
        original = state.shared.get("input_latents")
        if mask is None or original is None:
            return velocity
        sigma = self.scheduler.sigmas[index]
        towards_input = (state.shared["latents"] - original) / sigma
        blended: torch.Tensor = mask * velocity + (1 - mask) * towards_input
        return blended

    def prepare(
        self,
        inputs: Mapping[str, Any],
        *,
        cfg: bool = False,
        skip: Iterable[str] = (),
        state: PipelineState | None = None,
    ) -> PipelineState:
        """Run the ``prepare``-stage units on ``inputs`` and return the state (the trainer's entry too).

        Runs under the caller's grad mode (``generate`` wraps it in ``no_grad``). With ``input_image`` and
        ``denoising_strength=1`` a family's input-image unit writes the clean latents as ``input_latents``
        ``(B, L, C)``; the conditioning is in ``state.view("positive")``.

        Args:
            inputs: Call arguments.
            cfg: Also run per-branch units on the negative branch.
            skip: Names of units not to run (e.g. those whose outputs a split-training cache already holds).
            state: Continue from this state instead of a new one (its shared values are updated by ``inputs``).
        """
        if state is None:
            state = PipelineState(shared=dict(inputs))
        else:
            state.shared.update(inputs)
        skipped = set(skip)
        for unit in self.units:
            if unit.stage == "prepare" and unit.name not in skipped:
                self.run_unit(unit, state, cfg)
        return state

    def generate(
        self,
        inputs: dict[str, Any],
        *,
        progress_bar_cmd: Callable[..., Any] | None = None,
        callback_on_step_end: Callable[..., Any] | None = None,
    ) -> Any:
        """Run every unit and the denoising loop on ``inputs``; return ``state.shared["output"]``.

        Families call this from their ``__call__`` after validating arguments.
        """
        output_type = inputs.get("output_type", "pil")
        if output_type not in OUTPUT_TYPES:
            raise PipelineInputError(f"output_type={output_type!r}; expected one of {OUTPUT_TYPES}")
        check_values(inputs, self.limits)
        cfg_scale = inputs.get("cfg_scale")
        cfg = cfg_scale is not None and float(cfg_scale) != 1.0
        with torch.no_grad():
            state = self.prepare(inputs, cfg=cfg)
            self.denoise(state, cfg=cfg, progress_bar_cmd=progress_bar_cmd, callback_on_step_end=callback_on_step_end)
            for unit in self.units:
                if unit.stage == "finish":
                    self.run_unit(unit, state, cfg)
            self.activate(())
        self.last_run = RunInfo(seeds=list(state.shared.get("seeds") or []), arguments=dict(inputs))
        return state.shared.get("output")
