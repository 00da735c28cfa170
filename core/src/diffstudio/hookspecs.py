"""Every hook diffstudio calls, grouped by phase.

Plugins implement these with ``from diffstudio import hookimpl``. Core calls them only through the typed facade
in :mod:`diffstudio._hooks`, never through ``pm.hook`` directly. Hooks run at assembly time (when a runtime
starts, a checkpoint is loaded or a pipeline is built), never per layer: what a hook chooses is installed as a
plain object that runs the inner loop.

Hooks evolve only by adding arguments; pluggy lets an implementation accept any subset of a hook's arguments.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from diffstudio._markers import hookspec

if TYPE_CHECKING:
    from diffstudio.config import ModelConfig
    from diffstudio.loading.checkpoint import Checkpoint
    from diffstudio.loading.convert import Converter
    from diffstudio.pipeline.units import PipelineUnit
    from diffstudio.types import (
        CommandSpec,
        EmbeddedModel,
        LoraFormat,
        MemoryBudget,
        ModelClaim,
        PipelineLike,
        PipelineSpec,
        SchedulerSpec,
        TemplateSpec,
        VramStrategy,
    )

# --------------------------------------------------------------------------------------------------------------
# registration (called once per runtime, the first time the registry is needed)
# --------------------------------------------------------------------------------------------------------------


@hookspec
def register_pipelines(register: Callable[[PipelineSpec], None]) -> None:
    """Offer pipeline classes.

    Called by :class:`diffstudio.Runtime` once, the first time the pipeline registry is read (``diffstudio run``,
    ``diffstudio plugins``). A family plugin calls ``register(PipelineSpec(...))`` for each pipeline it provides;
    the class itself is imported lazily through ``PipelineSpec.factory``.

    :param register: Adds one spec; a name already registered raises ``DuplicateRegistrationError`` naming both
        owners.
    :return: Nothing. All results are collected (and ignored). Wrappers are not used.
    """


@hookspec
def register_embedded_models(register: Callable[[EmbeddedModel], None]) -> None:
    """Offer models shipped inside installed packages (e.g. ``diffstudio/shapes``).

    Called once per runtime, the first time a ``model_id`` is resolved. Embedded models resolve offline to the
    package's data folder, before any cache is probed.

    :param register: Adds one embedded model; duplicate ``model_id`` values are an error.
    :return: Nothing. All results are collected (and ignored). Wrappers are not used.
    """


@hookspec
def register_schedulers(register: Callable[[SchedulerSpec], None]) -> None:
    """Offer named noise schedules.

    Called once per runtime, the first time the scheduler registry is read. Core registers the flow-matching
    schedules (``flux1``, ``flux2``, ``static``) through its builtin plugin.

    :param register: Adds one scheduler spec; duplicate names are an error.
    :return: Nothing. All results are collected (and ignored). Wrappers are not used.
    """


@hookspec
def register_lora_formats(register: Callable[[LoraFormat], None]) -> None:
    """Offer LoRA file layouts (diffusers/PEFT, kohya, BFL/ComfyUI, ...) for a family.

    Called once per runtime, the first time a LoRA file is loaded. The loader asks every format of the target
    family whether it recognises the tensor names; exactly one must.

    :param register: Adds one format; duplicate names are an error.
    :return: Nothing. All results are collected (and ignored). Wrappers are not used.
    """


@hookspec
def register_converters(register: Callable[[Converter], None]) -> None:
    """Offer named state-dict converters (``convert_<source>_to_<target>``).

    Called once per runtime, the first time a converter is looked up by name (tools, training's
    ``--align_to_opensource_format``, tests).

    :param register: Adds one converter; duplicate names are an error.
    :return: Nothing. All results are collected (and ignored). Wrappers are not used.
    """


@hookspec
def register_commands(register: Callable[[CommandSpec], None]) -> None:
    """Offer ``diffstudio`` sub-commands (``train``, ``template``, ...).

    Called once when the command line starts. Core's own commands (``plugins``, ``run``) come through its
    builtin plugin, the same way.

    :param register: Adds one command; duplicate names are an error.
    :return: Nothing. All results are collected (and ignored). Wrappers are not used.
    """


@hookspec
def register_templates(register: Callable[[TemplateSpec], None]) -> None:
    """Offer Diffusion Template model classes from an installed (hence trusted) package.

    Called once per runtime, the first time a template is looked up by name, e.g. from a data-only template
    folder whose ``template.json`` names the class.

    :param register: Adds one template spec; duplicate names are an error.
    :return: Nothing. All results are collected (and ignored). Wrappers are not used.
    """


# --------------------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------------------


@hookspec
def load_model(checkpoint: Checkpoint, config: ModelConfig) -> ModelClaim | None:
    """Claim a checkpoint: say what model it is and how to build it.

    Called by core once per resolved checkpoint while a pipeline is loaded (``from_pretrained``), before any
    tensor data is read. Implementations inspect ``checkpoint`` (tensor names, shapes, dtypes, metadata: headers
    only) and decide by key patterns and shapes, never by a hash table. Core requires exactly one claim: zero is
    an ``UnknownCheckpointError`` naming the file, its telling keys and every family asked; two or more is an
    ``AmbiguousCheckpointError`` naming the claimants.

    :param checkpoint: The lazy view of the file(s).
    :param config: The user's ModelConfig (memory fields, origin pattern) for context.
    :return: A :class:`~diffstudio.types.ModelClaim`, or None for "not mine". All results are collected.
        Wrappers are not used.
    """


# --------------------------------------------------------------------------------------------------------------
# pipeline assembly
# --------------------------------------------------------------------------------------------------------------


@hookspec
def pipeline_unit(pipeline: PipelineLike) -> Sequence[PipelineUnit] | None:
    """Contribute units to a pipeline being assembled.

    Called when the pipeline's units are first needed (``pipe.units``: the first call, ``accepted_inputs``) and
    again after every ``set_component`` (a new component may change which units apply). A family plugin returns
    its own units for its pipelines; an adapter plugin returns the units that turn its inputs
    (``controlnet_inputs``, ...) into extension objects for the family's DiT. Units are ordered by their named
    anchors (``after=``, ``before=``, ``stage=``), never by registration order; the runner checks each unit's
    declared outputs.

    :param pipeline: The pipeline being assembled; check ``pipeline.family`` and return None (or an empty list)
        for pipelines you do not serve.
    :return: A list of unit instances, or None. All results are collected. Wrappers are not used.
    """


@hookspec(firstresult=True)
def template_cache_merge(key: str, values: Sequence[Any], pipeline: PipelineLike) -> Any | None:
    """Merge the caches that several templates produced for one pipeline input.

    Called by the TemplatePipeline once per cache key per generation, when more than one template produced a
    value for ``key``. Each medium plugin owns its keys: KV caches are concatenated along tokens, LoRA tensors
    along rank, residuals summed. Core's fallback (``trylast``) accepts values that are all equal and rejects
    anything else with a ``CacheMergeError``.

    :param key: The pipeline input name, e.g. ``"kv_cache"``.
    :param values: The values, in template order (at least two).
    :param pipeline: The base pipeline the merged value is for.
    :return: The merged value. Stops at first non-None result; return None to mean *not mine*.
        Wrappers are not used.
    """


@hookspec(firstresult=True)
def vram_policy(model: Any, component: str, budget: MemoryBudget, pipeline: PipelineLike) -> VramStrategy | None:
    """Choose where one model's weights live and in which dtype.

    Called once per model while a pipeline is loaded, after the model was built (as stored, memory-mapped on
    CPU, when ``budget.managed``). The returned strategy is a plain object: it installs its own interceptors in
    ``apply`` and the runner calls its ``onload``/``offload`` at stage boundaries. Core's builtin layer-wise
    policy answers for managed models (the seed's offload/onload/preparing/computation semantics per layer);
    its ``trylast`` fallback keeps every other model resident on the computation device, unwrapped.

    :param model: The built module (declares ``repeated_blocks``, ``memory_leaves`` and
        ``keep_in_high_precision``; see :mod:`diffstudio.vram.metadata`).
    :param component: Its slot name in the pipeline (``"dit"``, ``"vae"``, ...).
    :param budget: The user's offload/onload/preparing/computation settings and ``vram_limit``.
    :param pipeline: The pipeline being loaded.
    :return: A :class:`~diffstudio.types.VramStrategy`.
        Stops at first non-None result; return None to mean *not mine*. Wrappers are not used.
    """


HOOK_NAMES: tuple[str, ...] = (
    "register_pipelines",
    "register_embedded_models",
    "register_schedulers",
    "register_lora_formats",
    "register_converters",
    "register_commands",
    "register_templates",
    "load_model",
    "pipeline_unit",
    "template_cache_merge",
    "vram_policy",
)
