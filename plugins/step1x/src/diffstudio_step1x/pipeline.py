"""``Step1XEditPipeline``: stepfun-ai/Step1X-Edit instruction editing on FLUX.1's DiT, VAE and sampler.

Slots: ``dit`` (:class:`~diffstudio_step1x.model.Step1XDiT`: FLUX.1's DiT without guidance embedding, with the
connector attached), ``connector`` (the same connector, shown as the file's second component), ``vae`` (FLUX.1's
``ae.safetensors``, claimed by diffstudio-flux1) and ``qwen_vl`` (Qwen2.5-VL-7B-Instruct, claimed by
diffstudio-qwen-vl). There are no CLIP / T5 encoders. The processor is read from ``processor_config=`` or from the
Qwen2.5-VL folder (the official repository keeps both together), with Step1X's pixel bounds.

Defaults follow the published inference: ``cfg_scale`` 6, 28 steps, the output takes the reference's size (rounded
down to a multiple of 16) unless ``height`` / ``width`` are given, in which case the reference is resized to them
(with a :class:`~diffstudio_step1x.units.ReferenceResizedWarning`). The schedule is FLUX.1's (dynamic shift).
"""

from __future__ import annotations

from collections import ChainMap
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from diffstudio.config import ModelConfig
from diffstudio.errors import ConfigError, PipelineInputError
from diffstudio.pipeline.images import as_image_list
from diffstudio.types import ModelClaim
from diffstudio_flux1.pipeline import FluxImagePipeline
from torch import Tensor

from diffstudio_step1x.prompt import MAX_PIXELS, MIN_PIXELS, Step1XPromptEncoder


class Step1XEditPipeline(FluxImagePipeline):
    """Step1X-Edit (see the module docstring)."""

    family = "step1x"
    pipeline_name = "step1x"
    slots = {
        "dit": "Step1X-Edit DiT (FLUX.1 without guidance_in) with its connector",
        "connector": "the Qwen2Connector of the same file (LLM states + timestep -> txt, y)",
        "vae": "FLUX.1 autoencoder (16 latent channels)",
        "qwen_vl": "Qwen2.5-VL-7B-Instruct (diffstudio-qwen-vl)",
    }
    shared_families = ("flux1", "qwen-vl")
    denoise_components = ("dit",)
    plugin_inputs: dict[str, str] = {}

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.processor: Any = None
        self.prompt_drop_tokens: int | None = None

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls, *args: Any, processor_config: ModelConfig | None = None, **kwargs: Any
    ) -> Step1XEditPipeline:
        """Load the DiT + connector file, FLUX.1's VAE and Qwen2.5-VL (``model_configs``) and the processor.

        Args:
            *args: As ``FluxImagePipeline.from_pretrained``.
            processor_config: The Qwen2.5-VL processor folder (default: the Qwen2.5-VL model's folder).
            **kwargs: As ``FluxImagePipeline.from_pretrained``.

        Raises:
            ConfigError: ``processor_config`` is not a ModelConfig.
        """
        if processor_config is not None and not isinstance(processor_config, ModelConfig):
            raise ConfigError(f"processor_config is a {type(processor_config).__name__}, not a ModelConfig")
        pipe = super().from_pretrained(*args, **kwargs)
        assert isinstance(pipe, Step1XEditPipeline)
        if processor_config is not None:
            from diffstudio.resolve import resolve_files

            resolved = resolve_files(processor_config)
            pipe.load_processor(resolved.folder if resolved.is_folder else resolved.files[0].parent)
        elif pipe.has("qwen_vl") and pipe.loaded["qwen_vl"].files:
            folder = Path(pipe.loaded["qwen_vl"].files[0]).parent
            if (folder / "preprocessor_config.json").is_file():
                pipe.load_processor(folder)
        return pipe

    def load_processor(self, folder: str | Path) -> None:
        """Read the Qwen2.5-VL processor folder with Step1X's pixel bounds (256..324 merged 28-pixel patches)."""
        from diffstudio_qwen_vl import load_processor

        self.processor = load_processor(folder, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)

    def load_component(self, config: ModelConfig) -> ModelClaim:
        """Load one checkpoint; the Step1X file also fills the ``connector`` slot (the DiT's connector)."""
        claim = super().load_component(config)
        if claim.component == "dit":
            self.set_component("connector", self.dit.connector, claim=claim, files=self.loaded["dit"].files)
        return claim

    def load_lora(self, source: Any, scale: float = 1.0, *, fuse: bool = False, name: str | None = None) -> Any:
        """Apply a LoRA to the DiT; ``connector.*`` layers of a ``step1x/bfl`` file (what training writes) too.

        The DiT layers go through FLUX.1's loader (any FLUX.1 layout, fusing, the report); the connector's are
        applied under the same name and scale, so ``unload_lora`` removes both (side paths detached, fused weights
        restored exactly). Returns FLUX.1's ``LoraReport`` with the connector layers counted under ``connector``.

        Raises:
            LoraMatchError: A connector layer of the file has other sizes than this connector's.
        """
        import dataclasses

        from diffstudio import lora as core
        from diffstudio.nn.delta import delta_linears
        from diffstudio_flux1.lora import _STATE

        from diffstudio_step1x.lora import CONNECTOR_PREFIX, PREFIX, parse

        tensors = self._lora_tensors(source)
        if tensors is None or not any(k.startswith(CONNECTOR_PREFIX) for k in tensors):
            return super().load_lora(source, scale, fuse=fuse, name=name)
        if not self.has("dit"):
            raise PipelineInputError("load_lora needs the DiT; add its ModelConfig to from_pretrained")
        description = str(source) if isinstance(source, (str, Path)) else "<state dict>"
        state = core.lora_state(self.dit, _STATE)
        name = core.lora_name(name, description, state.applied, "unload_lora(name)")
        rest = {k: v for k, v in tensors.items() if not k.startswith(CONNECTOR_PREFIX)}
        parsed = parse({k: v for k, v in tensors.items() if k.startswith(CONNECTOR_PREFIX)})
        layers = dict(delta_linears(self.dit))
        sources = {p: [f"{PREFIX}{p}.lora_down.weight"] for p in parsed}
        connector, _ = core.match_layers(parsed, sources, [], layers, description, "Step1X")
        if rest:
            report = super().load_lora(rest, scale, fuse=fuse, name=name)
            matched = dict(state.applied[name].lora)
        else:  # a connector-only LoRA
            report, matched = core.LoraReport(name, "step1x/bfl", description, float(scale), fuse, 0, {}), {}
        if fuse:
            core.keep_originals(state, layers, connector)
            core.merge_lora(self.dit, connector, scale)
        else:
            core.attach_lora(self.dit, connector, name, scale)
        count = report.tensors_matched + 3 * len(connector)
        modules = {**report.modules, "connector": len(connector)}
        report = dataclasses.replace(report, source=description, tensors_matched=count, modules=modules)
        state.applied[name] = core.AppliedLora(report, {**matched, **connector})
        return report

    @staticmethod
    def _lora_tensors(source: Any) -> dict[str, Any] | None:
        """The tensors of a LoRA path / ModelConfig / state dict (None for anything FLUX.1's loader must judge)."""
        if isinstance(source, ModelConfig):
            from diffstudio.resolve import resolve_files

            source = resolve_files(source).files[0]
        if isinstance(source, Mapping):
            return dict(source)
        if isinstance(source, (str, Path)) and Path(source).suffix == ".safetensors" and Path(source).is_file():
            from diffstudio.loading import Checkpoint

            with Checkpoint.open(source) as checkpoint:
                return dict(checkpoint.state_dict())
        return None

    def prompt_encoder(self) -> Step1XPromptEncoder:  # type: ignore[override]
        """The Qwen2.5-VL prompt embedder over the ``qwen_vl`` slot and the processor."""
        if not self.has("qwen_vl"):
            raise PipelineInputError(
                "no qwen_vl is loaded; add the Qwen2.5-VL-7B-Instruct ModelConfig to from_pretrained"
            )
        if self.processor is None:
            raise PipelineInputError(
                "No Qwen2.5-VL processor was found; pass processor_config=ModelConfig(path=<Qwen2.5-VL folder>)"
            )
        encoder = Step1XPromptEncoder(self.qwen_vl, self.processor)
        if self.prompt_drop_tokens is not None:
            encoder.drop = self.prompt_drop_tokens
        return encoder

    def predict_velocity(self, inputs: Mapping[str, Any], step_index: int, timestep: Tensor) -> Tensor:
        """FLUX.1's DiT call with the connector hook of the branch (``step1x_mask (B, 640)``) installed.

        The hook is built here from the branch's mask rather than stored in the state, so a batch that the trainer
        collates from samples prepared one at a time gets one hook over the whole batch (``prompt_emb`` and
        ``step1x_mask`` are concatenated along the batch axis).

        Raises:
            PipelineInputError: The branch holds per-sample call hooks (another adapter's, after collation), which
                cannot carry the connector's batched text stream.
        """
        from diffstudio_step1x.units import ConnectorHook

        mask = inputs.get("step1x_mask")
        if mask is None:
            return super().predict_velocity(inputs, step_index, timestep)
        hooks = inputs.get("call_hooks")
        if isinstance(hooks, list):
            raise PipelineInputError(
                "Step1X's connector cannot run beside per-sample call hooks of a collated batch; train with "
                "--batch_size 1 (or gradient accumulation) when another adapter adds call hooks"
            )
        hooks = {**(hooks or {}), "step1x_connector": ConnectorHook(self.dit, mask)}
        return super().predict_velocity(ChainMap({"call_hooks": hooks}, dict(inputs)), step_index, timestep)

    def __call__(  # type: ignore[override]
        self,
        prompt: str | Sequence[str],
        step1x_reference_image: Any = None,
        negative_prompt: str | Sequence[str] = "",
        cfg_scale: float = 6.0,
        height: int | None = None,
        width: int | None = None,
        seed: int | None = None,
        rand_device: str = "cpu",
        num_inference_steps: int = 28,
        sigma_shift: float | None = None,
        sigmas: Sequence[float] | None = None,
        latents: Tensor | None = None,
        output_type: str = "pil",
        progress_bar_cmd: Callable[..., Any] | None = None,
        callback_on_step_end: Callable[..., Any] | None = None,
        **extra: Any,
    ) -> Any:
        """Edit ``step1x_reference_image`` following ``prompt``.

        Args:
            prompt: The instruction (or a list: one edit of the same reference per instruction).
            step1x_reference_image: The PIL image to edit (required).
            negative_prompt: Used when ``cfg_scale`` > 1, with the same reference image.
            cfg_scale: Real classifier-free guidance (6).
            height: Output height, a multiple of 16 (default: the reference's, rounded down).
            width: Output width, a multiple of 16 (default: the reference's, rounded down).
            seed: Base seed; None draws one.
            rand_device: Device the noise is drawn on.
            num_inference_steps: Steps (28).
            sigma_shift: Static schedule shift instead of FLUX.1's dynamic shift.
            sigmas: Explicit schedule.
            latents: Initial noise in token layout ``(B, H/16 * W/16, 64)``.
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.
            progress_bar_cmd: Progress bar factory.
            callback_on_step_end: ``fn(pipe, step, timestep, {"latents": ...}) -> updates``.
            **extra: VAE tiling options and plugin unit inputs.

        Raises:
            PipelineInputError: No reference image, or a wrong size.
        """
        if step1x_reference_image is None:
            raise PipelineInputError("Step1XEditPipeline needs step1x_reference_image (the PIL image to edit)")
        reference = as_image_list(step1x_reference_image, "step1x_reference_image")[0]
        f = self.spatial_factor
        width = reference.size[0] // f * f if width is None else width
        height = reference.size[1] // f * f if height is None else height
        self.check_inputs(extra)
        inputs = self.call_inputs(
            prompt, negative_prompt=negative_prompt, cfg_scale=cfg_scale, height=height, width=width, seed=seed,
            rand_device=rand_device, num_inference_steps=num_inference_steps, sigma_shift=sigma_shift, sigmas=sigmas,
            latents=latents, output_type=output_type, step1x_reference_image=reference, **extra,
        )  # fmt: skip
        return self.generate(inputs, progress_bar_cmd=progress_bar_cmd, callback_on_step_end=callback_on_step_end)
