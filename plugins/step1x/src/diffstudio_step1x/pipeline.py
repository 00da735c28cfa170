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

from collections.abc import Callable, Sequence
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
