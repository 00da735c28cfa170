"""``FluxImagePipeline``: FLUX.1 dev / schnell / Kontext text-to-image, image-to-image, inpainting and editing.

Slots: ``dit`` (:class:`~diffstudio_flux1.model.Flux`), ``vae`` (:class:`~diffstudio_flux1.vae.AutoEncoder`),
``text_encoder`` (CLIP-L) and ``text_encoder_2`` (T5-XXL). Tokenizers come from ``tokenizer_1_config`` /
``tokenizer_2_config`` or, when not given, from the ``tokenizer/`` and ``tokenizer_2/`` folders beside the text
encoders' folders (the official repository layout). The units live in :mod:`diffstudio_flux1.units` and arrive
through the ``pipeline_unit`` hook.

The schedule is diffusers' FLUX.1 schedule (``FlowMatchScheduler.for_family("flux1")``: exponential shift with
``mu`` on the line through (256 tokens, 0.5) and (4096 tokens, 1.15)); ``sigma_shift=s`` replaces it by the
static shift ``s`` (DiffSynth's FLUX.1 default is 3). Defaults follow the seed: 30 steps, ``embedded_guidance``
3.5, ``t5_sequence_length`` 512, real CFG only when ``cfg_scale`` > 1.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

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
from diffstudio.errors import ConfigError, MissingPluginError, PipelineInputError
from diffstudio.nn.delta import scoped_deltas
from diffstudio.pipeline.base import BasePipeline
from diffstudio.pipeline.validate import check_prompts
from diffstudio.scheduler import FlowMatchScheduler
from torch import Tensor

from diffstudio_flux1.lora import LoraReport
from diffstudio_flux1.text_encoders import PromptEncoder, TokenizerConfigError, load_tokenizer

_SIBLINGS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}


class FluxImagePipeline(BasePipeline):
    """FLUX.1 image generation (see the module docstring)."""

    family = "flux1"
    pipeline_name = "flux1"
    slots = {
        "dit": "FLUX.1 transformer (Flux)",
        "vae": "FLUX.1 autoencoder (16 latent channels)",
        "text_encoder": "CLIP-L text encoder (pooled vector)",
        "text_encoder_2": "T5-XXL encoder (token embeddings)",
        "controlnet": "a ControlNet beside the DiT (filled by the diffstudio-controlnet plugin)",
        "ipadapter": "IP-Adapter projections (filled by the diffstudio-ipadapter plugin)",
        "ipadapter_image_encoder": "the IP-Adapter's image encoder, SigLIP or CLIP (diffstudio-ipadapter)",
        "infuse_net": "InfiniteYou's InfuseNet, a ControlNet with its own text stream (diffstudio-infiniteyou)",
        "image_proj": "InfiniteYou's image projector, face embedding -> identity tokens (diffstudio-infiniteyou)",
        "face_recognition": "InfiniteYou's IR-SE50 ArcFace face embedder (diffstudio-infiniteyou)",
        "lora_encoder": "LoRA-Encoder: each LoRA's weights -> one T5-space token (diffstudio-lora-encoder)",
        "lora_merger": "LoRAFusion: a learned gate over side-path LoRA outputs (diffstudio-lora-fusion)",
        "nexus_gen": "Nexus-Gen's AR model, Qwen2.5-VL + vision head + prefill embeddings (diffstudio-nexus-gen)",
        "nexus_gen_decoder": "Nexus-Gen's decoder head: generation adapter or editing merger (diffstudio-nexus-gen)",
    }
    denoise_components = ("dit", "controlnet", "infuse_net", "lora_merger")
    size_multiple = 16
    extension_inputs = EXTENSION_INPUTS
    plugin_inputs = {
        "controlnet_inputs": "diffstudio-controlnet",
        "ipadapter_images": "diffstudio-ipadapter",
        "ipadapter_scale": "diffstudio-ipadapter",
        "eligen_entity_prompts": "diffstudio-eligen",
        "eligen_entity_masks": "diffstudio-eligen",
        "eligen_enable_on_negative": "diffstudio-eligen",
        "eligen_enable_inpaint": "diffstudio-eligen",
        "step1x_reference_image": "diffstudio-step1x",
        "infinityou_id_image": "diffstudio-infiniteyou",
        "infinityou_id_embedding": "diffstudio-infiniteyou",
        "infinityou_guidance": "diffstudio-infiniteyou",
        "infinityou_id_keypoints": "diffstudio-infiniteyou",
        "infinityou_face_detector": "diffstudio-infiniteyou",
        "lora_encoder_inputs": "diffstudio-lora-encoder",
        "lora_encoder_scale": "diffstudio-lora-encoder",
        "lora_encoder_missing": "diffstudio-lora-encoder",
        "flex_inpaint_image": "diffstudio-flex",
        "flex_inpaint_mask": "diffstudio-flex",
        "flex_control_image": "diffstudio-flex",
        "flex_control_strength": "diffstudio-flex",
        "flex_control_stop": "diffstudio-flex",
        "nexus_gen_reference_image": "diffstudio-nexus-gen",
        "nexus_gen_pooled_prompt": "diffstudio-nexus-gen",
    }
    channel_plugins = {196: ("Flex.2 (ostris/Flex.2-preview)", "diffstudio-flex")}
    """DiT input widths whose extra channels (``img_cond``) only a plugin builds: width -> (model, distribution)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tokenizer_1: Any = None
        self.tokenizer_2: Any = None
        self._prompt_encoder: PromptEncoder | None = None

    def default_scheduler(self) -> FlowMatchScheduler:
        """FLUX.1's flow-matching schedule (dynamic shift)."""
        return FlowMatchScheduler.for_family("flux1")

    # ------------------------------------------------------------------------------------------------------
    # loading
    # ------------------------------------------------------------------------------------------------------

    call_aliases = {
        "strength": "denoising_strength",
        "true_cfg_scale": "cfg_scale",
        "max_sequence_length": "t5_sequence_length",
    }

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        *args: Any,
        torch_dtype: torch.dtype | str | None = None,
        device: str | torch.device | None = None,
        model_configs: Sequence[ModelConfig] = (),
        tokenizer_1_config: ModelConfig | None = None,
        tokenizer_2_config: ModelConfig | None = None,
        vram_limit: float | None = None,
        **kwargs: Any,
    ) -> FluxImagePipeline:
        """Load the pipeline from a repository and/or ``ModelConfig`` entries (DiT, VAE, CLIP, T5).

        Args:
            *args: Optionally the repository first (a diffusers folder such as a downloaded ``FLUX.1-dev``, a
                checkpoint file, or a model id); see ``BasePipeline.from_pretrained``.
            torch_dtype: Computation dtype (a floating ``torch.dtype`` or its name; default bfloat16).
            device: Computation device (default CUDA when available).
            model_configs: One config per component (after the repository's, replacing what they claim).
            tokenizer_1_config: The CLIP ``tokenizer/`` folder (default: beside the CLIP text encoder).
            tokenizer_2_config: The T5 ``tokenizer_2/`` folder (default: beside the T5 encoder).
            vram_limit: Memory budget in GiB on the computation device.
            **kwargs: ``runtime=`` and other BasePipeline options.

        Raises:
            ConfigError: A wrong ``torch_dtype``, ``device``, ``model_configs`` or repository.
            WrongFamilyError: A checkpoint belongs to another family (e.g. a FLUX.2 file).
        """
        for name, config in (("tokenizer_1_config", tokenizer_1_config), ("tokenizer_2_config", tokenizer_2_config)):
            if config is not None and not isinstance(config, ModelConfig):
                raise ConfigError(f"{name} is a {type(config).__name__}, not a ModelConfig")
        pipe = super().from_pretrained(
            *args, torch_dtype=torch_dtype, device=device, model_configs=model_configs, vram_limit=vram_limit, **kwargs
        )
        assert isinstance(pipe, FluxImagePipeline)
        for index, config in ((1, tokenizer_1_config), (2, tokenizer_2_config)):
            if config is not None:
                pipe.load_tokenizer(config, index)
        for slot, folder in _SIBLINGS.items():
            attribute = "tokenizer_1" if slot == "text_encoder" else "tokenizer_2"
            if getattr(pipe, attribute) is None and pipe.has(slot):
                sibling = pipe._sibling(slot, folder)
                if sibling is not None:
                    setattr(pipe, attribute, load_tokenizer(sibling, "clip" if slot == "text_encoder" else "t5"))
        return pipe

    def _sibling(self, slot: str, folder: str) -> Path | None:
        files = self.loaded[slot].files
        candidate = Path(files[0]).parent.parent / folder if files else None
        return candidate if candidate is not None and candidate.is_dir() else None

    def load_tokenizer(self, config: ModelConfig, index: int = 1) -> None:
        """Load the CLIP (``index=1``) or T5 (``index=2``) tokenizer folder that ``config`` names (offline)."""
        from diffstudio.resolve import resolve_files

        resolved = resolve_files(config, embedded={m.model_id: m.root for m in self.runtime.hooks.embedded_models()})
        folder = resolved.folder if resolved.is_folder else resolved.files[0].parent
        if index == 1:
            self.tokenizer_1 = load_tokenizer(folder, "clip")
        else:
            self.tokenizer_2 = load_tokenizer(folder, "t5")
        self._prompt_encoder = None

    def set_component(self, slot: str, module: Any, **kwargs: Any) -> None:
        """Put a component into a slot (resets the cached prompt encoder)."""
        super().set_component(slot, module, **kwargs)
        self._prompt_encoder = None

    def prompt_encoder(self) -> PromptEncoder:
        """The CLIP + T5 prompt encoder over the loaded text encoders and tokenizers."""
        if self._prompt_encoder is None:
            for slot, tokenizer, index in (
                ("text_encoder", self.tokenizer_1, 1),
                ("text_encoder_2", self.tokenizer_2, 2),
            ):
                if not self.has(slot):
                    raise PipelineInputError(f"no {slot} is loaded; add its ModelConfig to from_pretrained")
                if tokenizer is None:
                    raise TokenizerConfigError(
                        f"No tokenizer was found for {slot}; pass tokenizer_{index}_config=ModelConfig(..., "
                        f"origin_file_pattern='{_SIBLINGS[slot]}/') (or path=...) to from_pretrained."
                    )
            self._prompt_encoder = PromptEncoder(
                self.text_encoder, self.tokenizer_1, self.text_encoder_2, self.tokenizer_2
            )
        return self._prompt_encoder

    def load_lora(self, source: Any, scale: float = 1.0, *, fuse: bool = False, name: str | None = None) -> LoraReport:
        """Apply a LoRA file (path, ``ModelConfig`` or state dict; any FLUX.1 layout) to the DiT and CLIP.

        Returns the match report (also for CLIP layers of kohya ``lora_te1_*`` / diffusers ``text_encoder.*``).
        See :func:`diffstudio_flux1.lora.apply_lora` for the errors.
        """
        from diffstudio_flux1.lora import apply_lora

        if isinstance(source, ModelConfig):
            from diffstudio.resolve import resolve_files

            source = resolve_files(source).files[0]
        if not self.has("dit"):
            raise PipelineInputError("load_lora needs the DiT; add its ModelConfig to from_pretrained")
        text_encoder = self.text_encoder if self.has("text_encoder") else None
        return apply_lora(self.dit, source, scale=scale, fuse=fuse, name=name, text_encoder=text_encoder)

    def apply_lora_source(self, source: Any, *, scale: float, name: str | None, fuse: bool) -> LoraReport:
        """A path or state dict through :meth:`load_lora` (what the diffusers-named LoRA methods call)."""
        return self.load_lora(source, scale, fuse=fuse, name=name)

    @property
    def dit_variant(self) -> str | None:
        """The loaded DiT's variant from its claim (``dev``, ``krea-dev``, ``schnell``, ``flex``, ...), or None."""
        loaded = self.loaded.get("dit")
        model_type = loaded.claim.model_type if loaded is not None and loaded.claim is not None else ""
        return model_type.partition("/")[2] or None

    def variant_defaults(self) -> dict[str, Any]:
        """Call defaults of the loaded DiT's variant (:data:`~diffstudio_flux1.loaders.VARIANT_DEFAULTS`)."""
        from diffstudio_flux1.loaders import VARIANT_DEFAULTS

        return {"embedded_guidance": 3.5, **VARIANT_DEFAULTS.get(self.dit_variant or "", {})}

    def guidance_scale_target(self) -> str:
        """The diffusers ``guidance_scale`` is FLUX.1's distilled ``embedded_guidance`` (``FluxPipeline``)."""
        return "embedded_guidance"

    def unload_lora(self, name: str | None = None) -> list[str]:
        """Remove one LoRA (by name) or all of them; return the names removed."""
        from diffstudio_flux1.lora import list_loras, remove_lora

        names = [r.name for r in list_loras(self.dit)] if name is None else [name]
        text_encoder = self.text_encoder if self.has("text_encoder") else None
        for each in reversed(names):
            remove_lora(self.dit, each, text_encoder=text_encoder)
        return names

    # ------------------------------------------------------------------------------------------------------
    # latent geometry and the VAE
    # ------------------------------------------------------------------------------------------------------

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent token side: VAE downsampling x 2x2 packing (16 for the official VAE)."""
        return 2 * (int(self.vae.params.downsample_factor) if self.has("vae") else 8)

    @property
    def latent_channels(self) -> int:
        """Channels of an unpacked latent (16 for the official models)."""
        if self.has("dit"):
            return int(self.dit.out_channels) // 4
        return int(self.vae.params.z_channels) if self.has("vae") else 16

    def latent_grid(self, height: int, width: int) -> tuple[int, int]:
        """Latent token grid ``(h, w)`` of an image of ``height x width`` pixels."""
        factor = self.spatial_factor
        if height % factor or width % factor:
            raise PipelineInputError(f"{height}x{width} is not a multiple of {factor} (pixels per latent token)")
        return height // factor, width // factor

    def encode_image(self, pixels: Tensor, **tiling: Any) -> Tensor:
        """Images ``(B, 3, H, W)`` in ``[-1, 1]`` -> scaled latents ``(B, 16, H/8, W/8)`` (pipeline dtype)."""
        if not self.has("vae"):
            raise PipelineInputError("this input needs the VAE; add its ModelConfig to from_pretrained")
        dtype = next(self.vae.parameters()).dtype
        latents: Tensor = self.vae.encode(pixels.to(self.device, dtype), **tiling)
        return latents.to(self.torch_dtype)

    def decode_latents(self, latents: Tensor, **tiling: Any) -> Tensor:
        """Scaled latents ``(B, 16, h, w)`` -> images ``(B, 3, 8h, 8w)`` in about ``[-1, 1]``."""
        if not self.has("vae"):
            raise PipelineInputError("decoding needs the VAE; add its ModelConfig or use output_type='latent'")
        dtype = next(self.vae.parameters()).dtype
        images: Tensor = self.vae.decode(latents.to(self.device, dtype), **tiling)
        return images

    # ------------------------------------------------------------------------------------------------------
    # denoising
    # ------------------------------------------------------------------------------------------------------

    def predict_velocity(self, inputs: Mapping[str, Any], step_index: int, timestep: Tensor) -> Tensor:
        """Run the DiT on one branch (the family's ``model_fn``).

        Args:
            inputs: Branch view with ``latents`` ``(B, L, 64)``, ``image_ids``, ``prompt_emb``, ``text_ids``,
                ``pooled_prompt_emb``, optionally ``guidance``, ``kontext_latents``/``kontext_image_ids``,
                and every DiT extension key of :mod:`diffstudio.dit` (``extra_txt``, ``extra_img``, ``img_cond``,
                ``kv_extension``, ``block_residual``, ``attention_kwargs``, ``stack_hook``, ``text_stream``,
                ``call_hooks``, ``dit_deltas``).
            step_index: Denoising step.
            timestep: ``sigma * 1000``, scalar or ``(B,)``.

        Returns:
            Velocity ``(B, L, 64)``.
        """
        latents = inputs["latents"]
        batch, dtype = latents.shape[0], latents.dtype
        t = (timestep.to(torch.float32) / 1000).expand(batch) if timestep.ndim == 0 else timestep / 1000
        kontext = inputs.get("kontext_latents")
        txt, y, t = inputs["prompt_emb"].to(dtype), inputs["pooled_prompt_emb"].to(dtype), t.to(latents.device, dtype)
        txt_ids, guidance = inputs["text_ids"], inputs.get("guidance")
        image_ids, branch = inputs["image_ids"], branch_of(inputs)
        extensions = call_extensions(
            inputs, lambda: DitCall(latents, image_ids, txt, txt_ids, t, y, guidance, int(step_index), branch)
        )
        if extensions.get("img_cond") is None and self.dit.in_channels in type(self).channel_plugins:
            model, distribution = type(self).channel_plugins[self.dit.in_channels]
            raise MissingPluginError(f"A FLUX.1 DiT with {self.dit.in_channels} input channels ({model})", distribution)
        stream: TextStream | None = extensions.pop("text_stream", None)
        if stream is not None:
            txt, txt_ids = stream.txt.to(dtype), stream.txt_ids
            y = y if stream.y is None else stream.y.to(dtype)
        extra_img, extra_img_ids = append_tokens(
            None if kontext is None else kontext.to(latents.device, dtype), inputs.get("kontext_image_ids"),
            extensions.pop("extra_img", None), extensions.pop("extra_img_ids", None),
        )  # fmt: skip
        with scoped_deltas(self.dit, inputs.get("dit_deltas"), "branch_side_path"):
            velocity: Tensor = self.dit(
                latents, image_ids, txt, txt_ids, t, y, guidance,
                extra_img=extra_img, extra_img_ids=extra_img_ids, **extensions,
            )  # fmt: skip
        return velocity

    def call_inputs(self, prompt: str | Sequence[str], **kwargs: Any) -> dict[str, Any]:
        """Turn call arguments into the state inputs :meth:`generate` runs (see :meth:`__call__` for names)."""
        prompt, negative = check_prompts(prompt, kwargs.pop("negative_prompt", ""), self.limits)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
        if len(negatives) != len(prompts):
            raise PipelineInputError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        defaults: dict[str, Any] = {
            "cfg_scale": 1.0, "embedded_guidance": None, "t5_sequence_length": 512, "height": 1024, "width": 1024,
            "seed": None, "rand_device": "cpu", "num_inference_steps": 30, "sigma_shift": None, "input_image": None,
            "denoising_strength": 1.0, "inpaint_mask": None, "kontext_images": None, "tiled": False,
            "tile_size": 128, "tile_stride": 64, "sigmas": None, "latents": None, "output_type": "pil",
        }  # fmt: skip
        return {
            **defaults,
            **kwargs,
            "prompt": prompts,
            "negative_prompt": negatives,
            "single": isinstance(prompt, str),
        }

    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] = "",
        cfg_scale: float = 1.0,
        embedded_guidance: float | None = None,
        t5_sequence_length: int = 512,
        height: int = 1024,
        width: int = 1024,
        seed: int | None = None,
        rand_device: str = "cpu",
        num_inference_steps: int = 30,
        sigma_shift: float | None = None,
        input_image: Any = None,
        denoising_strength: float = 1.0,
        inpaint_mask: Any = None,
        kontext_images: Any = None,
        tiled: bool = False,
        tile_size: int = 128,
        tile_stride: int = 64,
        sigmas: Sequence[float] | None = None,
        latents: Tensor | None = None,
        output_type: str = "pil",
        progress_bar_cmd: Callable[..., Any] | None = None,
        callback_on_step_end: Callable[..., Any] | None = None,
        **extra: Any,
    ) -> Any:
        """Generate images.

        The diffusers names are accepted too (``generator``, ``guidance_scale`` = ``embedded_guidance``,
        ``true_cfg_scale`` = ``cfg_scale``, ``max_sequence_length`` = ``t5_sequence_length``,
        ``num_images_per_prompt``, ``return_dict``, ``strength``; see :mod:`diffstudio.pipeline.diffusers_api`).
        Every argument is checked before any compute (:mod:`diffstudio.pipeline.validate`, limits in
        ``pipe.limits``).

        Args:
            prompt: One prompt (returns one image) or a list (returns a list): a ``str`` or a list of ``str``.
            negative_prompt: Used when ``cfg_scale`` > 1 (one for all, or one per prompt); ``None`` is ``""``.
            cfg_scale: Real classifier-free guidance scale; 1 disables it.
            embedded_guidance: Distilled guidance of dev / Kontext / Krea (ignored by schnell); None takes the
                loaded DiT's default (:meth:`variant_defaults`: 3.5, Krea 4.5).
            t5_sequence_length: T5 tokens (512; 256 is what schnell was trained with).
            height: Image height, a multiple of 16.
            width: Image width, a multiple of 16.
            seed: Base seed (image i uses ``seed + i``); None draws one.
            rand_device: Device the noise is drawn on.
            num_inference_steps: Steps (30).
            sigma_shift: Static schedule shift instead of the dynamic FLUX.1 shift.
            input_image: Image-to-image (or inpainting) source (PIL).
            denoising_strength: Image-to-image strength in ``(0, 1]``.
            inpaint_mask: PIL mask, white = repaint (with ``input_image``).
            kontext_images: Reference image(s) for FLUX.1 Kontext editing (PIL or list).
            tiled: VAE encode/decode in overlapping tiles.
            tile_size: Tile side in latent pixels.
            tile_stride: Tile stride in latent pixels (``<= tile_size``).
            sigmas: Explicit schedule (unshifted sigmas, ``(N,)``).
            latents: Initial noise in token layout ``(B, H/16 * W/16, 64)``.
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.
            progress_bar_cmd: Progress bar factory (tqdm by default; ``lambda x: x`` hides it).
            callback_on_step_end: ``fn(pipe, step, timestep, {"latents": ...}) -> updates``.
            **extra: Inputs of plugin units (``kv_cache``, ``extra_text_embedding``, adapter inputs, ...).
        """
        self.check_inputs(extra)
        if tiled and not 0 < tile_stride <= tile_size:
            raise PipelineInputError(f"tile_stride {tile_stride} must be in (0, tile_size={tile_size}]")
        inputs = self.call_inputs(
            prompt, negative_prompt=negative_prompt, cfg_scale=cfg_scale, embedded_guidance=embedded_guidance,
            t5_sequence_length=t5_sequence_length, height=height, width=width, seed=seed, rand_device=rand_device,
            num_inference_steps=num_inference_steps, sigma_shift=sigma_shift, input_image=input_image,
            denoising_strength=denoising_strength, inpaint_mask=inpaint_mask, kontext_images=kontext_images,
            tiled=tiled, tile_size=tile_size, tile_stride=tile_stride, sigmas=sigmas, latents=latents,
            output_type=output_type, **extra,
        )  # fmt: skip
        return self.generate(inputs, progress_bar_cmd=progress_bar_cmd, callback_on_step_end=callback_on_step_end)

    def enable_lora_merger(self) -> int:
        """Gate the side-path LoRAs with the loaded LoRA merger; return the number of gated layers (seed API).

        The merger (LoRAFusion) fills the ``lora_merger`` slot when diffstudio-lora-fusion is installed.

        Raises:
            MissingPluginError: No merger is loaded and diffstudio-lora-fusion is not installed.
            PipelineInputError: No merger (or no DiT) is loaded.
        """
        if not self.has("lora_merger"):
            if not any(u.name == "lora_fusion_enable" for u in self.units):
                raise MissingPluginError("enable_lora_merger()", "diffstudio-lora-fusion")
            raise PipelineInputError(
                "enable_lora_merger() needs the LoRA merger; add ModelConfig(model_id='DiffSynth-Studio/"
                "LoRAFusion-preview-FLUX.1-dev', origin_file_pattern='model.safetensors') to from_pretrained"
            )
        if not self.has("dit"):
            raise PipelineInputError("enable_lora_merger() needs the DiT; add its ModelConfig to from_pretrained")
        gated: int = self.lora_merger.enable(self.dit)
        return gated
