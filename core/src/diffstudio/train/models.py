"""The models a training run loads, and how their memory is managed.

``--model_paths`` entries are paths (a file, a folder, a list of shards) or JSON objects with ``ModelConfig``
fields (``{"path": "dit.safetensors", "offload_device": "cpu"}``); ``--model_id_with_origin_paths`` entries are
``model_id:origin_pattern``. Frozen components can be kept small through the same layer-wise ``vram_policy``
that inference uses:

* ``--fp8_models``: the weights rest, onload and are staged in ``float8_e4m3fn`` and every layer casts them to
  the computation dtype inside its own forward (tensors the family keeps in high precision, such as norms,
  stay in the computation dtype). Entries are component names (``dit``, ``text_encoder``) or the same strings
  as in ``--model_paths`` / ``--model_id_with_origin_paths`` (the seed's form).
* ``--offload_models``: the weights rest on the CPU and are copied to the computation device when their stage
  starts (text encoding, VAE encoding, the DiT), then dropped again.

Both only apply to frozen components: a trained component's parameters must be real tensors the optimizer
updates, so naming one is an error (train a LoRA on it instead). A LoRA base may be float8 or offloaded: the
LoRA side paths are separate parameters in the computation dtype.
"""

from __future__ import annotations

import json
from dataclasses import fields
from typing import Any

import torch
from torch import nn

from diffstudio.config import ModelConfig
from diffstudio.pipeline.base import BasePipeline
from diffstudio.runtime import Runtime
from diffstudio.train.config import TrainConfig, TrainConfigError

FP8 = torch.float8_e4m3fn
"""Storage dtype of ``--fp8_models``."""

_CONFIG_FIELDS = {f.name for f in fields(ModelConfig)}


def model_entries(config: TrainConfig) -> list[tuple[str, ModelConfig]]:
    """``(argument string, ModelConfig)`` for every ``--model_paths`` and ``--model_id_with_origin_paths`` entry."""
    entries: list[tuple[str, ModelConfig]] = []
    for value in config.model_paths:
        if isinstance(value, dict):
            unknown = sorted(set(value) - _CONFIG_FIELDS)
            if unknown:
                raise TrainConfigError(
                    f"--model_paths entry {json.dumps(value)} has unknown field(s) {unknown}; ModelConfig fields "
                    f"are {', '.join(sorted(_CONFIG_FIELDS))}"
                )
            label = value.get("path") or value.get("model_id") or json.dumps(value)
            entries.append((label if isinstance(label, str) else json.dumps(label), ModelConfig(**value)))
        else:
            entries.append((value if isinstance(value, str) else json.dumps(value), ModelConfig(path=value)))
    for entry in config.model_id_with_origin_paths:
        model_id, sep, pattern = entry.partition(":")
        if not sep or not model_id or not pattern:
            raise TrainConfigError(f"--model_id_with_origin_paths entry {entry!r} is not model_id:origin_pattern")
        entries.append((entry, ModelConfig(model_id=model_id, origin_file_pattern=pattern)))
    return entries


def model_configs(config: TrainConfig) -> list[ModelConfig]:
    """``ModelConfig`` entries from ``--model_paths`` and ``--model_id_with_origin_paths``."""
    return [model for _, model in model_entries(config)]


def training_dtype(config: TrainConfig) -> torch.dtype:
    """The ``--torch_dtype`` the models compute in."""
    dtype = getattr(torch, config.torch_dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise TrainConfigError(f"--torch_dtype {config.torch_dtype!r} is not a torch dtype")
    return dtype


def load_training_pipeline(config: TrainConfig, runtime: Runtime, device: str) -> BasePipeline:
    """Load the family pipeline for the models; ``--fp8_models`` / ``--offload_models`` ones are managed."""
    from diffstudio.identify import identified, pipeline_for

    entries = model_entries(config)
    dtype = training_dtype(config)
    fp8, offload = set(config.fp8_models), set(config.offload_models)
    trained = set(config.trainable_models)
    managed = [index for index, (_, model) in enumerate(entries) if fp8 or offload or model.has_memory_fields]
    asked = sorted({0, *managed})  # the first names the pipeline; managed ones need their component's name
    with identified(runtime, [entries[i][1] for i in asked]) as found:
        models = dict(zip(asked, found))
        cls = pipeline_for(runtime, models[0].claim).factory()
        configs, matched = [], set()
        for index, (label, model) in enumerate(entries):
            if index in managed:
                component = models[index].claim.component
                wants_fp8 = bool({component, label} & fp8)
                wants_offload = bool({component, label} & offload)
                matched |= {component, label} & (fp8 | offload)
                if component in trained and (wants_fp8 or wants_offload or model.has_memory_fields):
                    raise TrainConfigError(
                        f"{component!r} is trained (--trainable_models) but float8 storage or offloading was asked "
                        "for it; only frozen components (or a LoRA's base model) can be stored in float8 or "
                        f"offloaded. Train a LoRA on it instead (--lora_base_model {component})."
                    )
                if wants_fp8:
                    model = models[index].with_memory(offload_dtype=FP8, onload_dtype=FP8, preparing_dtype=FP8,
                                                      computation_dtype=model.computation_dtype or dtype)  # fmt: skip
                if wants_offload:
                    model = models[index].with_memory(offload_device="cpu")
            configs.append(model)
        kwargs: dict[str, Any] = {}
        if config.tokenizer_path:
            kwargs["tokenizer_config"] = ModelConfig(path=config.tokenizer_path)
        pipe: BasePipeline = cls.from_pretrained(
            torch_dtype=dtype, device=device, model_configs=configs, runtime=runtime, **kwargs
        )
    for option, names in (("--fp8_models", fp8), ("--offload_models", offload)):
        unknown = names - matched
        if unknown:
            raise TrainConfigError(
                f"{option} names {sorted(unknown)}, which match no loaded component or model entry; loaded: "
                f"{sorted(pipe.loaded)}"
            )
    return pipe


def own_memory(module: nn.Module) -> None:
    """Give every tensor of a trained module its own storage.

    Loaded weights are views of the memory-mapped checkpoint (one shared storage); updating them in place
    would touch file-backed pages, and checkpoint writers would see them as one shared tensor.
    """
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            tensor.data = tensor.data.clone()


def stored_dtypes(pipe: BasePipeline, slot: str) -> set[torch.dtype]:
    """The dtypes a component's weights rest in (its memory strategy's stores, else its tensors)."""
    strategy = pipe.loaded[slot].strategy
    units = getattr(strategy, "units", None)
    if units is not None:
        return {t.offload.dtype for unit in units for t in unit.tensors}
    module = pipe.loaded[slot].module
    return {t.dtype for t in module.state_dict().values()} if isinstance(module, nn.Module) else set()
