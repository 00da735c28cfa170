"""``Flux2ImagePipeline``: FLUX.2 dev and klein text-to-image, image-to-image, editing and inpainting.

Slots: ``dit`` (:class:`~diffstudio_flux2.model.Flux2`), ``vae`` (:class:`~diffstudio_flux2.vae.Flux2AutoEncoder`)
and ``text_encoder`` (a Qwen3 decoder for klein, a Mistral text decoder for dev). The tokenizer comes from
``tokenizer_config`` or, when that is not given, from the ``tokenizer/`` folder beside the text encoder's folder.
The units live in :mod:`diffstudio_flux2.units` and arrive through the ``pipeline_unit`` hook.

Defaults per variant (DiffSynth's and BFL's recommendations): klein (distilled) 4 steps without CFG; klein-base
50 steps with ``cfg_scale=4`` (the checkpoints cannot be told apart, so pass ``cfg_scale`` > 1 to get the base
defaults); dev 50 steps with ``embedded_guidance=4``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffstudio.config import ModelConfig
from diffstudio.dit.extensions import (
    EXTENSION_INPUTS,
    DitCall,
    TextStream,
    append_tokens,
    branch_of,
    call_extensions,
)
from diffstudio.errors import PipelineInputError, UnknownCheckpointError
from diffstudio.nn.attention import merge_kv
from diffstudio.nn.delta import scoped_deltas
from diffstudio.pipeline.base import BasePipeline
from diffstudio.pipeline.validate import check_prompts, check_values
from diffstudio.scheduler import FlowMatchScheduler
from diffstudio.types import ModelClaim
from torch import Tensor

from diffstudio_flux2.text_encoders import (
    Mistral3PromptEncoder,
    PromptEncoder,
    Qwen3PromptEncoder,
    TokenizerConfigError,
    check_context_width,
    load_tokenizer,
)

if TYPE_CHECKING:
    from diffstudio_flux2.lora import LoraReport

DEFAULT_STEPS = {"klein": 4, "klein-base": 50, "dev": 50}


class Flux2ImagePipeline(BasePipeline):
    """FLUX.2 image generation (see the module docstring)."""

    family = "flux2"
    pipeline_name = "flux2"
    slots = {
        "dit": "FLUX.2 transformer (Flux2)",
        "vae": "FLUX.2 autoencoder with latent BatchNorm statistics",
        "text_encoder": "Qwen3 (klein) or Mistral3 (dev) text decoder",
    }
    denoise_components = ("dit",)
    size_multiple = 16
    extension_inputs = EXTENSION_INPUTS - {"img_cond"}

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tokenizer: Any = None
        self._prompt_encoder: PromptEncoder | None = None

    def default_scheduler(self) -> FlowMatchScheduler:
        """FLUX.2's flow-matching schedule (empirical mu)."""
        return FlowMatchScheduler.for_family("flux2")

    # ------------------------------------------------------------------------------------------------------
    # loading
    # ------------------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        *args: Any,
        torch_dtype: torch.dtype | str | None = None,
        device: str | torch.device | None = None,
        model_configs: Sequence[ModelConfig] = (),
        tokenizer_config: ModelConfig | None = None,
        vram_limit: float | None = None,
        **kwargs: Any,
    ) -> Flux2ImagePipeline:
        """Load the pipeline from a repository and/or ``ModelConfig`` entries (DiT, VAE, text encoder).

        Args:
            *args: Optionally the repository first (a diffusers folder such as a downloaded
                ``FLUX.2-klein-4B``, a checkpoint file, or a model id); see ``BasePipeline.from_pretrained``.
            torch_dtype: Computation dtype (a floating ``torch.dtype`` or its name; default bfloat16).
            device: Computation device (default CUDA when available).
            model_configs: One config per component (after the repository's, replacing what they claim).
            tokenizer_config: The tokenizer folder (default: ``tokenizer/`` beside the text encoder).
            vram_limit: Memory budget in GiB on the computation device.
            **kwargs: ``runtime=`` and other BasePipeline options.

        Raises:
            ConfigError: A wrong ``torch_dtype``, ``device``, ``model_configs`` or repository.
            TextEncoderMismatchError: the text encoder's width differs from the DiT's context width.
            TokenizerConfigError: a text encoder is loaded but no tokenizer can be found.
        """
        pipe = super().from_pretrained(
            *args,
            torch_dtype=torch_dtype,
            device=device,
            model_configs=model_configs,
            tokenizer_config=tokenizer_config,
            vram_limit=vram_limit,
            **kwargs,
        )
        assert isinstance(pipe, Flux2ImagePipeline)
        if pipe.tokenizer is None and pipe.has("text_encoder"):
            sibling = pipe._sibling_tokenizer()
            if sibling is not None:
                pipe.tokenizer = load_tokenizer(sibling, pipe.text_encoder_kind)
        pipe.check_components()
        return pipe

    def load_component(self, config: ModelConfig) -> ModelClaim:
        """Load one checkpoint; a file no family claims that is recognisably FLUX.1 gets a FLUX.1-naming error.

        Raises:
            NotFlux2CheckpointError: No family claims the file and its keys are FLUX.1's.
            UnknownCheckpointError, WrongFamilyError: As in ``BasePipeline.load_component``.
        """
        try:
            return super().load_component(config)
        except UnknownCheckpointError as unknown:
            from diffstudio.identify import open_checkpoint

            from diffstudio_flux2.loaders import NotFlux2CheckpointError, recognise_foreign

            with open_checkpoint(self.runtime, config) as checkpoint:
                found = recognise_foreign(checkpoint)
            if found is None:
                raise
            raise NotFlux2CheckpointError(unknown, *found) from unknown

    def _sibling_tokenizer(self) -> Path | None:
        files = self.loaded["text_encoder"].files
        if not files:
            return None
        candidate = Path(files[0]).parent.parent / "tokenizer"
        return candidate if candidate.is_dir() else None

    def load_tokenizer(self, config: ModelConfig) -> None:
        """Load the tokenizer folder that ``tokenizer_config`` names (offline)."""
        from diffstudio.resolve import resolve_files

        embedded = {m.model_id: m.root for m in self.runtime.hooks.embedded_models()}
        resolved = resolve_files(config, embedded=embedded)
        folder = resolved.folder if resolved.is_folder else resolved.files[0].parent
        self.tokenizer = load_tokenizer(folder, self.text_encoder_kind if self.has("text_encoder") else "qwen3")
        self._prompt_encoder = None

    def set_component(self, slot: str, module: Any, **kwargs: Any) -> None:
        """Put a component into a slot (resets the cached prompt encoder)."""
        super().set_component(slot, module, **kwargs)
        self._prompt_encoder = None

    def check_components(self) -> None:
        """Check that the loaded parts fit together (text width vs DiT context width)."""
        if self.has("dit") and self.has("text_encoder"):
            check_context_width(self.prompt_encoder().width, self.dit.params.context_in_dim)

    @property
    def text_encoder_kind(self) -> str:
        """``"qwen3"`` (klein) or ``"mistral3"`` (dev)."""
        claim = self.loaded["text_encoder"].claim if self.has("text_encoder") else None
        if claim is not None and claim.model_type.endswith("mistral3"):
            return "mistral3"
        return "qwen3"

    def prompt_encoder(self) -> PromptEncoder:
        """The prompt encoder over the loaded text encoder and tokenizer."""
        if self._prompt_encoder is None:
            if not self.has("text_encoder"):
                raise PipelineInputError("no text encoder is loaded; add its ModelConfig to from_pretrained")
            if self.tokenizer is None:
                raise TokenizerConfigError(
                    "No tokenizer was found for the text encoder; pass tokenizer_config=ModelConfig(..., "
                    "origin_file_pattern='tokenizer/') (or path=...) to from_pretrained."
                )
            kind = Mistral3PromptEncoder if self.text_encoder_kind == "mistral3" else Qwen3PromptEncoder
            self._prompt_encoder = kind(self.text_encoder, self.tokenizer)
            self._prompt_encoder.execution_device = torch.device(self.device)
        return self._prompt_encoder

    @property
    def variant(self) -> str:
        """``"dev"``, ``"klein"`` or ``"custom"``, from the DiT's claim (dev has a guidance embedder)."""
        if not self.has("dit"):
            return "klein"
        return "dev" if self.dit.use_guidance_embed else "klein"

    # ------------------------------------------------------------------------------------------------------
    # LoRA
    # ------------------------------------------------------------------------------------------------------

    def load_lora(
        self,
        module: Any = None,
        lora_config: ModelConfig | str | Path | None = None,
        alpha: float = 1.0,
        *,
        hotload: bool | None = None,
        state_dict: Mapping[str, Any] | None = None,
        name: str | None = None,
    ) -> LoraReport:
        """Apply a FLUX.2 LoRA (any published layout) to the DiT; DiffSynth's ``pipe.load_lora(pipe.dit, path)``.

        Args:
            module: The DiT (``pipe.dit``, the default); LoRAs for other components are not supported.
            lora_config: A ``.safetensors`` path or a ``ModelConfig`` naming one file.
            alpha: The LoRA's scale.
            hotload: True or None: a side path (weights untouched, removable, a small per-step cost); False:
                fused into the weights (no per-step cost; :meth:`unload_lora` still restores them exactly).
            state_dict: A LoRA state dict instead of ``lora_config``.
            name: Name to apply it under (default: the file's stem).

        Returns:
            The report (matched layers, keys that were not applied).

        Raises:
            PipelineInputError: No DiT is loaded, ``module`` is not the DiT, or no / two sources are given.
            LoraError: See :func:`diffstudio_flux2.lora.apply_lora` (a LoRA that matches nothing is an error).
        """
        from diffstudio_flux2.lora import apply_lora

        if not self.has("dit"):
            raise PipelineInputError("load_lora needs the DiT; add its ModelConfig to from_pretrained")
        if module is not None and module is not self.dit:
            raise PipelineInputError("FLUX.2 LoRAs apply to the DiT only: pass pipe.dit (or nothing) as module")
        if (lora_config is None) == (state_dict is None):
            raise PipelineInputError("pass exactly one of lora_config (a path or ModelConfig) and state_dict")
        source: Any = state_dict
        if isinstance(lora_config, ModelConfig):
            from diffstudio.resolve import resolve_files

            embedded = {m.model_id: m.root for m in self.runtime.hooks.embedded_models()}
            files = [f for f in resolve_files(lora_config, embedded=embedded).files if f.suffix == ".safetensors"]
            if len(files) != 1:
                raise PipelineInputError(f"the LoRA ModelConfig should name one .safetensors file, found {files}")
            source = files[0]
        elif lora_config is not None:
            source = lora_config
        return apply_lora(self.dit, source, scale=alpha, name=name, fuse=hotload is False)

    def apply_lora_source(self, source: Any, *, scale: float, name: str | None, fuse: bool) -> LoraReport:
        """A path or state dict through :meth:`load_lora` (what the diffusers-named LoRA methods call)."""
        if isinstance(source, Mapping):
            return self.load_lora(state_dict=source, alpha=scale, hotload=not fuse, name=name)
        return self.load_lora(lora_config=source, alpha=scale, hotload=not fuse, name=name)

    def unload_lora(self, name: str | None = None) -> list[str]:
        """Remove one LoRA by name, or every LoRA applied with :meth:`load_lora`; return the names removed."""
        from diffstudio_flux2.lora import list_loras, remove_lora

        if not self.has("dit"):
            return []
        names = [r.name for r in list_loras(self.dit)] if name is None else [name]
        for each in reversed(names):
            remove_lora(self.dit, each)
        return names

    clear_lora = unload_lora

    # ------------------------------------------------------------------------------------------------------
    # latent geometry and the VAE
    # ------------------------------------------------------------------------------------------------------

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent token side: VAE downsampling x 2x2 patchify (16 for the official VAE)."""
        if self.has("vae"):
            return int(self.vae.params.downsample_factor)
        return 16

    @property
    def latent_channels(self) -> int:
        """Channels of a latent token (128 for the official models)."""
        if self.has("dit"):
            return int(self.dit.in_channels)
        if self.has("vae"):
            return int(self.vae.params.latent_channels)
        return 128

    def latent_grid(self, height: int, width: int) -> tuple[int, int]:
        """Latent token grid ``(h, w)`` of an image of ``height x width`` pixels."""
        factor = self.spatial_factor
        if height % factor or width % factor:
            raise PipelineInputError(
                f"{height}x{width} is not a multiple of {factor} (this VAE's pixels per latent token)"
            )
        return height // factor, width // factor

    def encode_image(self, pixels: Tensor) -> Tensor:
        """Images ``(B, 3, H, W)`` in ``[-1, 1]`` -> normalised latents ``(B, C, H/f, W/f)`` (pipeline dtype)."""
        if not self.has("vae"):
            raise PipelineInputError("this input needs the VAE; add its ModelConfig to from_pretrained")
        vae = self.vae
        dtype = next(vae.parameters()).dtype
        latents: Tensor = vae.encode(pixels.to(self.device, dtype))
        return latents.to(self.torch_dtype)

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Normalised latents ``(B, C, h, w)`` -> images ``(B, 3, f*h, f*w)`` in about ``[-1, 1]``."""
        if not self.has("vae"):
            raise PipelineInputError("decoding needs the VAE; add its ModelConfig or use output_type='latent'")
        vae = self.vae
        dtype = next(vae.parameters()).dtype
        images: Tensor = vae.decode(latents.to(self.device, dtype))
        return images

    # ------------------------------------------------------------------------------------------------------
    # denoising
    # ------------------------------------------------------------------------------------------------------

    def predict_velocity(self, inputs: Mapping[str, Any], step_index: int, timestep: Tensor) -> Tensor:
        """Run the DiT on one branch: target tokens, edit tokens, text tokens, template extensions.

        Args:
            inputs: Branch view with ``latents`` ``(B, L, C)``, ``image_ids``, ``prompt_embeds``, ``text_ids``,
                optionally ``edit_latents``/``edit_image_ids``, ``reference_kv``, ``embedded_guidance`` and every
                DiT extension key of :mod:`diffstudio.dit` but ``img_cond`` (``extra_txt``, ``extra_img``,
                ``kv_extension``, ``block_residual``, ``attention_kwargs``, ``stack_hook``, ``text_stream``,
                ``call_hooks``, ``dit_deltas``; the old ``extra_ctx`` is read with a DeprecationWarning).
            step_index: Denoising step.
            timestep: ``sigma * 1000``, scalar or ``(B,)``.

        Returns:
            Velocity ``(B, L, C)``.
        """
        latents = inputs["latents"]
        batch = latents.shape[0]
        dit = self.dit
        dtype = latents.dtype
        t = (timestep.to(torch.float32) / 1000).expand(batch) if timestep.ndim == 0 else timestep / 1000
        t = t.to(latents.device, dtype)
        guidance = None
        if dit.use_guidance_embed:
            value = inputs.get("embedded_guidance")
            guidance = torch.full((batch,), 4.0 if value is None else float(value), device=latents.device)
        txt, txt_ids, image_ids = inputs["prompt_embeds"].to(dtype), inputs["text_ids"], inputs["image_ids"]
        branch = branch_of(inputs)
        extensions = call_extensions(
            inputs, lambda: DitCall(latents, image_ids, txt, txt_ids, t, None, guidance, int(step_index), branch)
        )
        if extensions.get("img_cond") is not None:
            raise PipelineInputError(
                "img_cond (channel-concatenated conditioning) is not an extension point of FLUX.2 (its DiT has no "
                "conditioning channels); drop the adapter or unit that sets it"
            )
        stream: TextStream | None = extensions.pop("text_stream", None)
        if stream is not None:
            txt, txt_ids = stream.txt.to(dtype), stream.txt_ids
        edit = inputs.get("edit_latents")
        edit_ids = inputs.get("edit_image_ids")
        cached = inputs.get("reference_kv")
        if cached is not None:  # reference K/V computed once: no reference tokens in the sequence
            edit, edit_ids = None, None
            extensions["kv_extension"] = merge_kv(extensions.get("kv_extension"), cached)
        extra_img, extra_img_ids = append_tokens(
            None if edit is None else edit.to(latents.device, dtype), edit_ids,
            extensions.pop("extra_img", None), extensions.pop("extra_img_ids", None),
        )  # fmt: skip
        with scoped_deltas(dit, inputs.get("dit_deltas"), "branch_side_path"):
            velocity: Tensor = dit(
                latents, image_ids, t, txt, txt_ids, guidance,
                extra_img=extra_img, extra_img_ids=extra_img_ids, **extensions,
            )  # fmt: skip
        return velocity

    def guidance_scale_target(self) -> str:
        """The diffusers ``guidance_scale``: ``embedded_guidance`` for dev (``Flux2Pipeline``), else ``cfg_scale``."""
        return "embedded_guidance" if self.variant == "dev" else "cfg_scale"

    def default_steps(self, cfg_scale: float) -> int:
        """Step count of the seed's examples for this variant."""
        if self.variant == "dev":
            return DEFAULT_STEPS["dev"]
        return DEFAULT_STEPS["klein-base"] if cfg_scale > 1 else DEFAULT_STEPS["klein"]

    def call_inputs(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] = "",
        cfg_scale: float = 1.0,
        embedded_guidance: float = 4.0,
        height: int = 1024,
        width: int = 1024,
        seed: int | None = None,
        rand_device: str = "cpu",
        num_inference_steps: int | None = None,
        input_image: Any = None,
        denoising_strength: float = 1.0,
        edit_image: Any = None,
        edit_image_auto_resize: bool = True,
        edit_kv_cache: bool = False,
        inpaint_mask: Any = None,
        inpaint_blur_size: int | None = None,
        inpaint_blur_sigma: float | None = None,
        sigmas: Sequence[float] | None = None,
        latents: Tensor | None = None,
        max_sequence_length: int = 512,
        output_type: str = "pil",
        **extra: Any,
    ) -> dict[str, Any]:
        """The state inputs of one call (what ``__call__`` runs; the trainer's entry too).

        Args:
            prompt: One prompt (returns one image) or a list (returns a list): a ``str`` or a list of ``str``.
            negative_prompt: Used when ``cfg_scale`` > 1 (one for all, or one per prompt); ``None`` is ``""``.
            cfg_scale: Real classifier-free guidance scale (klein-base: 4); 1 disables it.
            embedded_guidance: Distilled guidance of dev (ignored by klein).
            height: Image height, a multiple of 16.
            width: Image width, a multiple of 16.
            seed: Base seed (image i uses ``seed + i``); None draws one.
            rand_device: Device the noise is drawn on.
            num_inference_steps: Steps (default per variant: klein 4, klein-base 50, dev 50).
            input_image: Image-to-image source (PIL).
            denoising_strength: Image-to-image strength in ``(0, 1]``.
            edit_image: Reference image(s) for editing (PIL or list).
            edit_image_auto_resize: Scale references above 1024x1024 down and crop them to multiples of 16.
            edit_kv_cache: Compute the references' K/V once, at a fixed time, attending only to themselves
                (the scheme of FLUX.2-klein-9b-kv and diffusers' ``Flux2KleinKVPipeline``); only models trained
                for it give good results this way.
            inpaint_mask: PIL mask, white = repaint (with ``input_image``).
            inpaint_blur_size: Mask blur kernel size in latent cells.
            inpaint_blur_sigma: Mask blur sigma in latent cells.
            sigmas: Explicit schedule (unshifted sigmas, ``(N,)``).
            latents: Initial noise in token layout ``(B, h*w, C)``.
            max_sequence_length: Text tokens (512; at most ``pipe.limits.max_sequence_length``).
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.
            **extra: Inputs of plugin units (``kv_cache``, ``extra_text_embedding``, ...).

        Raises:
            PipelineInputError: A wrong argument (see :mod:`diffstudio.pipeline.validate` for the spec).
            LimitExceededError: A size above ``pipe.limits`` (see :mod:`diffstudio.pipeline.limits`).
        """
        prompt, negative_prompt = check_prompts(prompt, negative_prompt, self.limits)
        check_values({"cfg_scale": cfg_scale, "num_inference_steps": num_inference_steps}, self.limits)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if isinstance(negative_prompt, str):
            negatives = [negative_prompt] * len(prompts)
        else:
            negatives = list(negative_prompt)
        if len(negatives) != len(prompts):
            raise PipelineInputError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        steps = num_inference_steps if num_inference_steps is not None else self.default_steps(cfg_scale)
        if sigmas is not None and num_inference_steps is None:
            steps = len(sigmas)  # explicit sigmas set the step count
        inputs: dict[str, Any] = {
            "prompt": prompts,
            "negative_prompt": negatives,
            "cfg_scale": cfg_scale,
            "embedded_guidance": embedded_guidance,
            "height": height,
            "width": width,
            "seed": seed,
            "rand_device": rand_device,
            "num_inference_steps": steps,
            "input_image": input_image,
            "denoising_strength": denoising_strength,
            "edit_image": edit_image,
            "edit_image_auto_resize": edit_image_auto_resize,
            "edit_kv_cache": edit_kv_cache,
            "inpaint_mask": inpaint_mask,
            "inpaint_blur_size": inpaint_blur_size,
            "inpaint_blur_sigma": inpaint_blur_sigma,
            "sigmas": sigmas,
            "latents": latents,
            "max_sequence_length": max_sequence_length,
            "output_type": output_type,
            "single": isinstance(prompt, str),
            **extra,
        }
        self.check_inputs(extra)
        return inputs

    def __call__(
        self,
        prompt: str | Sequence[str],
        *,
        progress_bar_cmd: Callable[..., Any] | None = None,
        callback_on_step_end: Callable[..., Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Generate images; the arguments are those of :meth:`call_inputs` (the seed's names).

        The diffusers names are accepted too (``generator``, ``guidance_scale``, ``num_images_per_prompt``,
        ``return_dict``, ``strength``; see :mod:`diffstudio.pipeline.diffusers_api`).

        Args:
            prompt: One prompt (returns one image) or a list (returns a list).
            progress_bar_cmd: Progress bar factory (tqdm by default; ``lambda x: x`` hides it).
            callback_on_step_end: ``fn(pipe, step, timestep, {"latents": ...}) -> updates``.
            **kwargs: Every other argument of :meth:`call_inputs`.
        """
        inputs = self.call_inputs(prompt, **kwargs)
        return self.generate(inputs, progress_bar_cmd=progress_bar_cmd, callback_on_step_end=callback_on_step_end)
