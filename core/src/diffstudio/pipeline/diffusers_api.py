"""The diffusers names of a pipeline call and of pipeline methods, mapped once for every family.

The seed's API stays the primary one (``seed=``, ``cfg_scale=``, ``embedded_guidance=``, ``load_lora``); these
names are accepted beside it where they cost nothing. Giving an alias together with its primary name is a
:class:`~diffstudio.errors.PipelineInputError`.

Call arguments (translated by :func:`translate_call` before the family's ``__call__`` binds them):

- ``generator=torch.Generator(...).manual_seed(n)``: the same as ``seed=n`` (its ``initial_seed()``), with the
  noise drawn on the generator's device (``rand_device``) unless ``rand_device`` is given. The generator's state
  is neither read beyond its seed nor advanced, so a call with it is reproduced by ``seed=n``, which is what the
  image's record holds. A list of generators is refused (images use ``seed + i``).
- ``guidance_scale=``: the family's :meth:`DiffusersApi.guidance_scale_target`: FLUX.1 maps it to
  ``embedded_guidance`` (diffusers' ``FluxPipeline``; ``true_cfg_scale`` maps to ``cfg_scale``); FLUX.2 maps it
  to ``embedded_guidance`` for dev (diffusers' ``Flux2Pipeline``) and to ``cfg_scale`` (real CFG) for klein
  (``Flux2KleinPipeline``; a step-distilled klein should keep 1). ``strength=`` is ``denoising_strength``.
- ``num_images_per_prompt=n``: each prompt repeated ``n`` times (``[p0, p0, p1, p1]`` as in diffusers); the
  result is then always a list.
- ``return_dict=True``: a :class:`PipelineOutput` with ``.images`` (always a batch: a list of PIL images, or the
  ``np`` / ``pt`` / ``latent`` array); ``return_dict=False``: the tuple ``(images,)``. Without ``return_dict``
  the call returns what the seed returns (one image for one prompt string, else a list).
- ``callback_on_step_end(pipe, step_index, timestep, callback_kwargs) -> dict``: the native signature;
  ``callback_on_step_end_tensor_inputs`` may only name ``"latents"`` (the tensor passed and replaceable).

Methods (:class:`DiffusersApi`, a base of every pipeline): ``to(device, dtype)``, ``load_lora_weights``,
``set_adapters``, ``fuse_lora`` / ``unfuse_lora``, ``unload_lora_weights``, ``delete_adapters``,
``get_active_adapters``, ``get_list_adapters``.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from diffstudio.errors import ConfigError, PipelineInputError
from diffstudio.pipeline.limits import Limits
from diffstudio.pipeline.validate import check_prompts, check_values

#: Arguments a diffusers user passes that only change how the call is made or returned.
TENSOR_INPUTS = ("latents",)


@dataclass
class PipelineOutput:
    """What a call returns with ``return_dict=True`` (diffusers' ``FluxPipelineOutput`` shape).

    Attributes:
        images: The batch: a list of PIL images, a ``(B, H, W, 3)`` array, a ``(B, 3, H, W)`` tensor, or the
            latents for ``output_type="latent"``.
        seeds: The seed of each image (``seed + i``).
    """

    images: Any
    seeds: list[int] = field(default_factory=list)

    def __getitem__(self, key: int | str) -> Any:
        """``output[0]`` and ``output["images"]`` are the images, as with diffusers' outputs."""
        if key in (0, "images"):
            return self.images
        raise KeyError(key)

    def to_tuple(self) -> tuple[Any]:
        """``(images,)``."""
        return (self.images,)


@functools.lru_cache(maxsize=256)
def _positional_names(call: Callable[..., Any]) -> tuple[list[str], set[str], bool]:
    signature = inspect.signature(call)
    names, keywords, var_keyword = [], set(), False
    for index, param in enumerate(signature.parameters.values()):
        if index == 0:
            continue  # self
        if param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
            names.append(param.name)
        if param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY):
            keywords.add(param.name)
        var_keyword = var_keyword or param.kind == param.VAR_KEYWORD
    return names, keywords, var_keyword


def translate_call(
    pipe: Any, call: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any]
) -> tuple[dict[str, Any], bool | None]:
    """Turn one call's arguments into the family's keyword arguments, checked (see the module docstring).

    Returns:
        ``(keyword arguments for call, return_dict)``.

    Raises:
        PipelineInputError, LimitExceededError: A wrong argument (see :mod:`diffstudio.pipeline.validate`).
    """
    names, keywords, var_keyword = _positional_names(call)
    names, keywords = list(names), set(keywords)
    if len(args) > len(names):
        raise PipelineInputError(
            f"{type(pipe).__name__}() takes {len(names)} positional argument(s) ({', '.join(names)}) but got "
            f"{len(args)}; pass the others by name"
        )
    given = dict(zip(names, args))
    for key, value in kwargs.items():
        if key in given:
            raise PipelineInputError(f"{key!r} was given both by position and by name; pass it once")
        given[key] = value
    return_dict = given.pop("return_dict", None)
    if return_dict is not None and not isinstance(return_dict, bool):
        raise PipelineInputError(f"return_dict={return_dict!r}; pass True, False or leave it out")
    _tensor_inputs(given.pop("callback_on_step_end_tensor_inputs", None))
    aliases = {"guidance_scale": pipe.guidance_scale_target(), **type(pipe).call_aliases}
    for alias, primary in aliases.items():
        if alias not in given:
            continue
        if primary in given:
            raise PipelineInputError(f"{alias}= is the diffusers name of {primary}=; pass only one of them")
        given[primary] = given.pop(alias)
    _generator(given)
    limits = getattr(pipe, "limits", None) or Limits.from_env()
    copies = _images_per_prompt(given.pop("num_images_per_prompt", None), limits)
    if "prompt" in names or "prompt" in keywords:
        if "prompt" not in given:
            raise PipelineInputError(f"{type(pipe).__name__}() needs a prompt: pass a str or a list of str")
        prompt, negative = check_prompts(given["prompt"], given.get("negative_prompt"), limits)
        if copies > 1:
            prompts = [prompt] if isinstance(prompt, str) else prompt
            limits.check("max_batch", len(prompts) * copies, "the number of images (prompts x num_images_per_prompt)")
            prompt = [p for p in prompts for _ in range(copies)]
            if not isinstance(negative, str):
                negative = [n for n in negative for _ in range(copies)]
        given["prompt"] = prompt
        if "negative_prompt" in given:
            given["negative_prompt"] = negative
    elif copies > 1:
        raise PipelineInputError(f"{type(pipe).__name__} takes no prompt, so num_images_per_prompt does not apply")
    callback = given.get("callback_on_step_end")
    if callback is not None and not callable(callback):
        raise PipelineInputError(
            f"callback_on_step_end={callback!r} is not callable; pass fn(pipe, step_index, timestep, "
            f"callback_kwargs) -> dict"
        )
    check_values(given, limits)
    if not var_keyword:
        unknown = sorted(set(given) - keywords)
        if unknown:
            raise PipelineInputError(f"{type(pipe).__name__}() got unknown argument(s) {unknown}")
    return given, return_dict


def _tensor_inputs(names: Any) -> None:
    if names is None:
        return
    if isinstance(names, str) or not isinstance(names, (list, tuple)) or not set(names) <= set(TENSOR_INPUTS):
        raise PipelineInputError(
            f"callback_on_step_end_tensor_inputs={names!r}; this pipeline passes {list(TENSOR_INPUTS)} to the "
            f"callback (a list naming some of them)"
        )


def _generator(given: dict[str, Any]) -> None:
    generator = given.pop("generator", None)
    if generator is None:
        return
    if isinstance(generator, (list, tuple)):
        raise PipelineInputError("generator= is a list; pass one torch.Generator (image i uses its seed + i) or seed=N")
    if not isinstance(generator, torch.Generator):
        raise PipelineInputError(f"generator={generator!r} is not a torch.Generator; pass one, or seed=N")
    if given.get("seed") is not None:
        raise PipelineInputError("pass seed= or generator=, not both (generator=g means seed=g.initial_seed())")
    given["seed"] = int(generator.initial_seed())
    given.setdefault("rand_device", str(generator.device))


def _images_per_prompt(value: Any, limits: Limits) -> int:
    if value is None:
        return 1
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PipelineInputError(f"num_images_per_prompt={value!r} is not an int >= 1")
    limits.check("max_batch", value, "num_images_per_prompt")
    return value


def as_output(result: Any, return_dict: bool | None, seeds: Sequence[int]) -> Any:
    """Wrap a call's result for ``return_dict`` (see the module docstring); ``None`` returns it unchanged."""
    if return_dict is None:
        return result
    from PIL import Image

    images = [result] if isinstance(result, Image.Image) else result
    output = PipelineOutput(images=images, seeds=list(seeds))
    return output if return_dict else output.to_tuple()


def wrap_call(call: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a family's ``__call__`` with :func:`translate_call` and :func:`as_output` (done by the base class)."""
    if getattr(call, "_diffstudio_call_api", False):
        return call

    @functools.wraps(call)
    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        given, return_dict = translate_call(self, call, args, kwargs)
        result = call(self, **given)
        last = getattr(self, "last_run", None)
        return as_output(result, return_dict, getattr(last, "seeds", []))

    __call__._diffstudio_call_api = True  # type: ignore[attr-defined]
    return __call__


class DiffusersApi:
    """diffusers method names on every pipeline (see the module docstring); mixed into ``BasePipeline``.

    Families provide :meth:`apply_lora_source` and ``unload_lora(name)``; the rest is shared.

    Attributes:
        call_aliases: Diffusers call-argument names of this pipeline and the seed names they stand for
            (``guidance_scale`` is :meth:`guidance_scale_target`).
    """

    call_aliases: ClassVar[Mapping[str, str]] = {"strength": "denoising_strength"}
    loaded: dict[str, Any]
    device: str
    torch_dtype: torch.dtype
    set_component: Callable[..., None]  # BasePipeline's

    def guidance_scale_target(self) -> str:
        """The argument diffusers' ``guidance_scale`` stands for in this pipeline (default ``cfg_scale``)."""
        return "cfg_scale"

    # ------------------------------------------------------------------------------------------------------
    # devices
    # ------------------------------------------------------------------------------------------------------

    def to(self, *args: Any, **kwargs: Any) -> Any:
        """Move every component to a device and/or dtype, like ``DiffusionPipeline.to``; returns the pipeline.

        Accepts ``pipe.to("cuda")``, ``pipe.to(torch.float16)``, ``pipe.to("cuda", torch.bfloat16)`` and the
        keywords ``device=``, ``dtype=`` / ``torch_dtype=``. Components under a memory strategy other than the
        resident one (``vram_limit``, offload settings) place their weights themselves: move those by loading
        the pipeline again with another ``device``.

        Raises:
            ConfigError: An unknown device or dtype, a device this machine lacks, or a managed component.
        """
        from diffstudio.builtin.fallbacks import ResidentStrategy
        from diffstudio.devices import check_device_available, parse_device, parse_dtype

        device: Any = kwargs.pop("device", None)
        dtype: Any = kwargs.pop("dtype", None)
        if "torch_dtype" in kwargs:
            if dtype is not None:
                raise ConfigError("pass dtype= or torch_dtype=, not both")
            dtype = kwargs.pop("torch_dtype")
        if kwargs:
            raise ConfigError(f"to() got unknown argument(s) {sorted(kwargs)}; accepted: device, dtype")
        for arg in args:
            if isinstance(arg, torch.dtype) and dtype is None:
                dtype = arg
            elif isinstance(arg, (str, torch.device)) and device is None:
                device = arg
            else:
                raise ConfigError(f"to({arg!r}): pass a device ('cuda', 'cpu', torch.device) and/or a torch.dtype")
        target = None if device is None else check_device_available(parse_device(device, name="device"), "device")
        new_dtype = None if dtype is None else parse_dtype(dtype, name="dtype")
        managed = [n for n, c in self.loaded.items() if c.strategy is not None and c.strategy.name != "resident"]
        if managed and (target is not None or new_dtype is not None):
            raise ConfigError(
                f"to(): the component(s) {managed} are placed by the {self.loaded[managed[0]].strategy.name!r} "
                f"memory strategy; load the pipeline again with the device and dtype you want"
            )
        for name, component in list(self.loaded.items()):
            module = component.module
            if isinstance(module, torch.nn.Module):
                module = module.to(device=target, dtype=new_dtype)
            strategy = component.strategy
            if strategy is not None and target is not None:
                strategy = ResidentStrategy(target)
            self.set_component(name, module, strategy=strategy, claim=component.claim, files=component.files)
        if target is not None:
            self.device = target
        if new_dtype is not None:
            self.torch_dtype = new_dtype
        return self

    # ------------------------------------------------------------------------------------------------------
    # LoRA
    # ------------------------------------------------------------------------------------------------------

    def apply_lora_source(self, source: Any, *, scale: float, name: str | None, fuse: bool) -> Any:
        """Apply a LoRA file path or state dict (the family's ``load_lora``); families implement it.

        Returns:
            The family's LoRA report (with ``.name``).
        """
        raise PipelineInputError(f"{type(self).__name__} does not load LoRAs")

    def unload_lora(self, name: str | None = None) -> list[str]:
        """Remove one LoRA or all of them (families implement it)."""
        raise PipelineInputError(f"{type(self).__name__} does not load LoRAs")

    def _lora_records(self) -> dict[str, dict[str, Any]]:
        records: dict[str, dict[str, Any]] | None = self.__dict__.get("_diffusers_loras")
        if records is None:
            records = self.__dict__["_diffusers_loras"] = {}
        return records

    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict: Any,
        adapter_name: str | None = None,
        *,
        weight_name: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """The diffusers name of :meth:`load_lora` (a side path at scale 1; see :meth:`set_adapters`).

        Args:
            pretrained_model_name_or_path_or_dict: A ``.safetensors`` file, a folder holding one (or
                ``weight_name`` in it), a repository id (resolved like a ``ModelConfig``) or a state dict.
            adapter_name: The name to apply it under (default: the file's stem).
            weight_name: The file inside a folder or repository.
            **kwargs: ``scale`` / ``lora_scale`` (default 1.0); others are refused.

        Returns:
            The family's LoRA report.
        """
        scale = kwargs.pop("lora_scale", kwargs.pop("scale", 1.0))
        if kwargs:
            raise PipelineInputError(f"load_lora_weights() got unsupported argument(s) {sorted(kwargs)}")
        source = self._lora_source(pretrained_model_name_or_path_or_dict, weight_name)
        report = self.apply_lora_source(source, scale=float(scale), name=adapter_name, fuse=False)
        self._lora_records()[report.name] = {"source": source, "scale": float(scale), "fused": False}
        return report

    def _lora_source(self, source: Any, weight_name: str | None) -> Any:
        if isinstance(source, Mapping):
            return source
        if not isinstance(source, (str, os.PathLike)):
            raise PipelineInputError(
                f"load_lora_weights() takes a path, a repository id or a state dict, got {type(source).__name__}"
            )
        path = Path(os.fspath(source))
        if path.is_dir():
            candidates = [path / weight_name] if weight_name else sorted(path.glob("*.safetensors"))
            if len(candidates) != 1 or not candidates[0].is_file():
                raise PipelineInputError(
                    f"{path} holds {len(candidates)} matching .safetensors files; name one with weight_name="
                )
            return candidates[0]
        if path.exists():
            return path
        from diffstudio.config import ModelConfig
        from diffstudio.resolve import resolve_files

        config = ModelConfig(model_id=os.fspath(source), origin_file_pattern=weight_name or "*.safetensors")
        files = [f for f in resolve_files(config).files if f.suffix == ".safetensors"]
        if len(files) != 1:
            raise PipelineInputError(f"{config.describe()} holds {len(files)} .safetensors files; pass weight_name=")
        return files[0]

    def _delta_scales(self) -> dict[str, list[Any]]:
        from diffstudio.lora import LoraDelta
        from diffstudio.nn.delta import delta_linears

        found: dict[str, list[Any]] = {}
        for component in self.loaded.values():
            if isinstance(component.module, torch.nn.Module):
                for _, layer in delta_linears(component.module):
                    for name, delta in layer.deltas.items():
                        if isinstance(delta, LoraDelta):
                            found.setdefault(name, []).append(delta)
        return found

    def get_list_adapters(self) -> list[str]:
        """Names of the LoRAs applied as side paths, and of those fused with :meth:`fuse_lora`."""
        fused = [n for n, r in self._lora_records().items() if r["fused"]]
        return sorted(set(self._delta_scales()) | set(fused))

    def get_active_adapters(self) -> list[str]:
        """Names of the side-path LoRAs whose scale is not 0."""
        return sorted(n for n, deltas in self._delta_scales().items() if any(d.scale != 0 for d in deltas))

    def set_adapters(self, adapter_names: str | Sequence[str], adapter_weights: Any = None) -> None:
        """Activate the named side-path LoRAs at the given weights; every other one gets weight 0 (diffusers).

        Raises:
            PipelineInputError: A name is not applied, or is fused (unfuse it first), or the weights do not
                match the names.
        """
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        weights = adapter_weights if isinstance(adapter_weights, (list, tuple)) else [adapter_weights] * len(names)
        if len(weights) != len(names):
            raise PipelineInputError(f"{len(weights)} adapter_weights for {len(names)} adapter_names")
        scales = self._delta_scales()
        fused = [n for n in names if self._lora_records().get(n, {}).get("fused")]
        if fused:
            raise PipelineInputError(f"the LoRA(s) {fused} are fused; call unfuse_lora() before set_adapters()")
        unknown = [n for n in names if n not in scales]
        if unknown:
            raise PipelineInputError(f"no LoRA named {unknown} is applied; applied: {sorted(scales)}")
        wanted: dict[str, float] = {}
        for name, weight in zip(names, weights):
            value = 1.0 if weight is None else weight
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
                raise PipelineInputError(f"adapter weight {value!r} for {name!r} is not a number")
            wanted[name] = float(value)
        for name, deltas in scales.items():
            for delta in deltas:
                delta.scale = wanted.get(name, 0.0)

    def fuse_lora(self, lora_scale: float = 1.0, adapter_names: Sequence[str] | None = None, **_: Any) -> None:
        """Fuse LoRAs loaded with :meth:`load_lora_weights` into the weights (at their scale x ``lora_scale``).

        :meth:`unfuse_lora` restores the weights exactly. LoRAs applied with the seed's ``load_lora`` are fused
        with ``load_lora(..., fuse=True)`` (FLUX.1) / ``hotload=False`` (FLUX.2) instead.
        """
        records = self._lora_records()
        names = list(adapter_names) if adapter_names is not None else [n for n, r in records.items() if not r["fused"]]
        unknown = [n for n in names if n not in records]
        if unknown:
            raise PipelineInputError(
                f"fuse_lora() fuses LoRAs loaded with load_lora_weights(); {unknown} were not (use load_lora with "
                f"fusing for those)"
            )
        for name in names:
            record = records[name]
            if record["fused"]:
                continue
            self.unload_lora(name)
            scale = record["scale"] * float(lora_scale)
            self.apply_lora_source(record["source"], scale=scale, name=name, fuse=True)
            record.update(fused=True, fused_scale=scale)

    def unfuse_lora(self, **_: Any) -> None:
        """Undo :meth:`fuse_lora`: restore the weights and apply the LoRAs as side paths again."""
        for name, record in self._lora_records().items():
            if record["fused"]:
                self.unload_lora(name)
                self.apply_lora_source(record["source"], scale=record["scale"], name=name, fuse=False)
                record["fused"] = False

    def unload_lora_weights(self) -> None:
        """Remove every LoRA (diffusers' name for ``unload_lora()``)."""
        self.unload_lora()
        self._lora_records().clear()

    def delete_adapters(self, adapter_names: str | Sequence[str]) -> None:
        """Remove the named LoRAs."""
        for name in [adapter_names] if isinstance(adapter_names, str) else list(adapter_names):
            self.unload_lora(name)
            self._lora_records().pop(name, None)
