"""Plain data types exchanged between core and plugins through the hooks.

Nothing here imports torch at import time; tensor-typed fields use ``Any`` or ``TYPE_CHECKING`` imports so that
plugin entry modules stay cheap to import.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from diffstudio.config import ModelConfig
    from diffstudio.loading.checkpoint import Checkpoint


@dataclass(frozen=True)
class LoadRequest:
    """What the caller wants a claimed checkpoint turned into.

    Attributes:
        config: The user's ModelConfig for this file set.
        torch_dtype: The pipeline's dtype (e.g. ``torch.bfloat16``); the family may keep parts in float32.
            None means *as stored*: keep the file's dtypes (zero-copy memory-mapped tensors). Core asks for
            that, with ``device="cpu"``, when the config has memory fields, because the memory strategy then
            places and casts every tensor itself (per layer, never a whole state dict at once).
        device: The computation device string (``"cpu"``, ``"cuda"``).
    """

    config: ModelConfig
    torch_dtype: Any
    device: str


@dataclass(frozen=True)
class ModelClaim:
    """A family plugin's answer to ``load_model``: "this checkpoint is mine, and here is how to build it".

    Attributes:
        family: Family name, e.g. ``"flux2"``; also the pipeline family that can use the model.
        model_type: What the checkpoint is, e.g. ``"flux2-dit/klein-4b"``, ``"flux2-vae"``.
        component: The pipeline slot it fills, e.g. ``"dit"``, ``"vae"``, ``"text_encoder"``.
        source_format: The on-disk layout, e.g. ``"bfl"``, ``"diffusers"``.
        load: Builds the module from the checkpoint (on the meta device, then assigning memory-mapped tensors).
        plugin: Name of the plugin that made the claim (filled in by core).
    """

    family: str
    model_type: str
    component: str
    source_format: str
    load: Callable[[Checkpoint, LoadRequest], Any]
    plugin: str = ""

    def describe(self) -> str:
        """Return a one-line description used in messages."""
        owner = f" (plugin {self.plugin})" if self.plugin else ""
        return f"{self.model_type} [{self.source_format}] for slot {self.component!r}{owner}"


@dataclass(frozen=True)
class PipelineSpec:
    """A pipeline class offered by a family plugin (``register_pipelines``).

    Attributes:
        name: Registry name, e.g. ``"flux2"``.
        family: The family whose checkpoints this pipeline runs.
        factory: Returns the pipeline class (imported lazily).
        description: One line for ``diffstudio plugins``.
    """

    name: str
    family: str
    factory: Callable[[], type[Any]]
    description: str


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped inside an installed package (``register_embedded_models``).

    Attributes:
        model_id: The id users pass as ``ModelConfig(model_id=...)``, e.g. ``"diffstudio/shapes"``.
        root: Folder holding the files in the official on-disk layout.
        pipeline: Name of the registered pipeline that runs it.
        description: One line for listings.
        model_configs: ``(origin_file_pattern, ...)`` patterns that make up the model, relative to ``root``.
        tokenizer_pattern: Pattern of the tokenizer folder, if any.
        defaults: Default call arguments (steps, cfg_scale, size, ...).
    """

    model_id: str
    root: Path
    pipeline: str
    description: str
    model_configs: tuple[str, ...] = ()
    tokenizer_pattern: str | None = None
    defaults: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SchedulerSpec:
    """A named noise schedule (``register_schedulers``)."""

    name: str
    factory: Callable[..., Any]
    description: str


@dataclass(frozen=True)
class LoraFormat:
    """A LoRA file layout a family can read (``register_lora_formats``).

    Attributes:
        name: e.g. ``"flux2/kohya"``.
        family: The family whose modules the LoRA targets.
        detect: True when the tensor names look like this layout.
        to_canonical: Converts the state dict into the family's canonical form, a
            ``diffstudio.lora.CanonicalLora`` (module path of a ``DeltaLinear`` -> ``LoraWeights``).
        from_canonical: Writes a canonical LoRA back in this layout: returns the state dict and the safetensors
            metadata (None when the layout is read-only). Used by trainers (``--lora_format``).
    """

    name: str
    family: str
    detect: Callable[[Sequence[str]], bool]
    to_canonical: Callable[[Mapping[str, Any]], Any]
    from_canonical: Callable[[Mapping[str, Any]], tuple[dict[str, Any], dict[str, str]]] | None = None


@dataclass(frozen=True)
class CommandSpec:
    """A ``diffstudio`` sub-command (``register_commands``).

    Attributes:
        name: The sub-command, e.g. ``"train"``.
        help: One line for ``diffstudio --help``.
        add_arguments: Adds the command's arguments to its argparse parser.
        run: Runs the command with the parsed arguments and the :class:`diffstudio.runtime.Runtime` that found it
            (typed ``Any`` here so that this contract module names no machinery); returns the process exit code.
    """

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, Any], int]


@dataclass(frozen=True)
class TemplateSpec:
    """A Diffusion Template model class offered by an installed package (``register_templates``).

    Attributes:
        name: Registry name, e.g. ``"diffstudio-example/brightness"``. ``ModelConfig(model_id=name)`` loads the
            installed template itself; a data-only folder's ``template.json`` names the class by it.
        factory: Returns the template model class (an ``nn.Module`` with ``process_inputs`` and ``forward``),
            imported lazily.
        description: One line for listings.
        base_pipeline: The registered pipeline the template's cache is made for.
        config: Constructor keyword arguments used when the installed template is loaded by name.
        weights: Returns the safetensors file(s) shipped with the package for loading by name (None: the
            class's own initialisation).
        data_processor: Returns the data-processor class used by trainers (None: template inputs pass as they
            are).
        target_model: The model it was made for (``"diffstudio/shapes"``, a repository id), for listings.
        dit_geometry: The DiT geometry it was made for (``{"double_blocks", "single_blocks", "heads",
            "head_dim"}``); a pipeline whose DiT differs is refused before the template runs.
    """

    name: str
    factory: Callable[[], type[Any]]
    description: str
    base_pipeline: str = "flux2"
    config: Mapping[str, Any] = field(default_factory=dict)
    weights: Callable[[], Sequence[Path]] | None = None
    data_processor: Callable[[], type[Any]] | None = None
    target_model: str | None = None
    dit_geometry: Mapping[str, int] | None = None


@dataclass(frozen=True)
class MemoryBudget:
    """The user's memory settings for one model, given to ``vram_policy``.

    Attributes:
        offload_device: Where weights rest between uses (``"cpu"``, ``"disk"``, a device string).
        offload_dtype: Their dtype at rest.
        onload_device: Where they go when their stage starts.
        onload_dtype: Their dtype there.
        preparing_device: Where they are cast right before a layer runs.
        preparing_dtype: The dtype of that cast.
        computation_device: Where the layer computes.
        computation_dtype: The dtype it computes in.
        vram_limit_bytes: The pipeline's budget on the computation device, or None for no limit.
        managed: The user set an offload, onload or preparing field; False means "not wrapped at all" (the
            builtin layer-wise policy declines and the model stays resident).
        prefetch_depth: Units streamed ahead of the running one on CUDA (``from_pretrained(vram_prefetch=)``).
    """

    offload_device: str
    offload_dtype: Any
    onload_device: str
    onload_dtype: Any
    preparing_device: str
    preparing_dtype: Any
    computation_device: str
    computation_dtype: Any
    vram_limit_bytes: int | None = None
    managed: bool = False
    prefetch_depth: int = 1


@runtime_checkable
class VramStrategy(Protocol):
    """Decides where one model's weights live; built once per model by ``vram_policy``.

    The pipeline runner calls :meth:`onload` when a stage that uses the model starts and :meth:`offload` when
    the model is not needed; per-layer work happens inside interceptors the strategy installed in
    :meth:`apply`, never through hooks.
    """

    name: str

    def apply(self, module: Any) -> Any:
        """Install the strategy on ``module`` (move it, wrap layers); return the module to use."""
        ...

    def onload(self) -> None:
        """Make the model ready for computation."""
        ...

    def offload(self) -> None:
        """Release the computation device."""
        ...


@dataclass
class PluginStatus:
    """What happened to one plugin during loading; shown by ``diffstudio plugins``.

    Attributes:
        name: Plugin name (entry-point name, or the builtin's module name).
        distribution: Distribution that provides it (``diffstudio-core`` for builtins).
        version: That distribution's version.
        module: The module registered.
        status: ``"loaded"``, ``"builtin"``, ``"failed"``, ``"blocked"`` or ``"not allowed"``.
        error: The one-line reason when it failed or was skipped.
        hooks: Names of the hooks it implements.
    """

    name: str
    distribution: str
    version: str
    module: str
    status: str
    error: str | None = None
    hooks: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict."""
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "module": self.module,
            "status": self.status,
            "error": self.error,
            "hooks": list(self.hooks),
        }


class PipelineLike(Protocol):
    """What the hooks may rely on in the ``pipeline`` they are given.

    :class:`~diffstudio.pipeline.base.BasePipeline` satisfies it. The hook contract (``hookspecs``, the ``Hooks``
    facade, ``PipelineUnit``) names this protocol rather than the class, so that the contract depends on no
    machinery and the import graph has no cycle.

    Attributes:
        device: The computation device string.
        torch_dtype: The computation dtype.
        runtime: The plugin runtime the pipeline loads through.
    """

    device: str
    torch_dtype: Any
    runtime: Any

    @property
    def family(self) -> str:
        """The family name (matches ``ModelClaim.family``)."""
        ...

    @property
    def extension_inputs(self) -> frozenset[str]:
        """Branch-state keys the pipeline's denoiser honours (adapters contribute units only for these)."""
        ...

    def has(self, slot: str) -> bool:
        """True when the component slot holds a model."""
        ...

    def vram_ledger(self, device: str) -> Any:
        """The memory budget ledger of ``device`` shared by the pipeline's memory strategies."""
        ...
