"""Flux2ImagePipeline equals diffusers' Flux2KleinPipeline / Flux2Pipeline on tiny models loaded from disk."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from diffstudio import ModelConfig
from diffstudio.errors import PipelineInputError
from diffstudio.pipeline.images import pil_to_tensor
from diffstudio.runtime import Runtime
from diffstudio.testing import import_file
from diffstudio_flux2.math import pack_latents
from diffstudio_flux2.pipeline import Flux2ImagePipeline
from diffstudio_flux2.text_encoders import TextEncoderMismatchError


def _load(name: str) -> ModuleType:
    return import_file(Path(__file__).with_name(f"{name}.py"))


fp = _load("fixtures_pipeline")
TOL = 2e-4
PROMPTS = ["a red circle on a blue background", "a green star"]
H, W, SEQ = 32, 48, 32


@pytest.fixture(scope="module")
def klein(tmp_path_factory: pytest.TempPathFactory, helpers: ModuleType) -> Any:
    return fp.build_repo(tmp_path_factory.mktemp("klein"), "klein", helpers, seed=0)


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory, helpers: ModuleType) -> Any:
    return fp.build_repo(tmp_path_factory.mktemp("dev"), "dev", helpers, seed=3)


def ours(repo: Any, dit: str = "folder", tokenizer: bool = True) -> Flux2ImagePipeline:
    root = repo.root
    dit_config = ModelConfig(path=str(root / "transformer")) if dit == "folder" else ModelConfig(path=str(repo.bfl_dit))
    pipe = Flux2ImagePipeline.from_pretrained(
        torch_dtype=torch.float32,
        device="cpu",
        model_configs=[
            ModelConfig(path=str(root / "text_encoder")),
            dit_config,
            ModelConfig(path=str(root / "vae" / "diffusion_pytorch_model.safetensors")),
        ],
        tokenizer_config=ModelConfig(path=str(root / "tokenizer")) if tokenizer else None,
        runtime=Runtime(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_run(repo: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Run diffusers; return the final packed latents (B, L, C) and images (B, 3, H, W) in [0, 1]."""
    captured: dict[str, torch.Tensor] = {}

    def keep(pipe: Any, step: int, t: Any, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        captured["latents"] = tensors["latents"]
        return {}

    with torch.no_grad():
        images = repo.reference(output_type="pt", callback_on_step_end=keep, max_sequence_length=SEQ, **kwargs).images
    return captured["latents"], images


def our_run(pipe: Flux2ImagePipeline, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    captured: dict[str, torch.Tensor] = {}

    def keep(p: Any, step: int, t: Any, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        captured["latents"] = tensors["latents"]
        return {}

    images = pipe(output_type="pt", callback_on_step_end=keep, max_sequence_length=SEQ, **kwargs)
    return captured["latents"], images


def assert_close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.shape == b.shape, f"{what}: shapes {tuple(a.shape)} vs {tuple(b.shape)}"
    diff = (a - b).abs().max().item()
    assert diff <= TOL, f"{what}: max abs diff {diff}"


@pytest.mark.parametrize("dit", ["folder", "bfl"])
def test_klein_text_to_image_matches_diffusers(klein: Any, dit: str) -> None:
    noise = fp.noise(2, H, W)
    ref_latents, ref_images = reference_run(
        klein, prompt=PROMPTS, height=H, width=W, num_inference_steps=3, latents=noise, guidance_scale=1.0
    )
    pipe = ours(klein, dit)
    latents, images = our_run(
        pipe, prompt=PROMPTS, height=H, width=W, num_inference_steps=3, latents=pack_latents(noise)
    )
    assert_close(latents, ref_latents, "final latents")
    assert_close(images, ref_images, "decoded images")
    assert ref_latents.abs().mean() > 0.1


def test_klein_base_with_cfg_matches_diffusers(klein: Any) -> None:
    noise = fp.noise(1, H, W, seed=5)
    ref_latents, _ = reference_run(
        klein, prompt=PROMPTS[:1], height=H, width=W, num_inference_steps=4, latents=noise, guidance_scale=4.0
    )
    pipe = ours(klein)
    latents, _ = our_run(
        pipe, prompt=PROMPTS[0], cfg_scale=4.0, height=H, width=W, num_inference_steps=4,
        latents=pack_latents(noise),
    )  # fmt: skip
    assert_close(latents, ref_latents, "final latents with CFG")
    plain, _ = our_run(pipe, prompt=PROMPTS[0], height=H, width=W, num_inference_steps=4, latents=pack_latents(noise))
    assert (plain - latents).abs().max() > 1e-3  # CFG really changed the result


def test_dev_with_embedded_guidance_matches_diffusers(dev: Any) -> None:
    noise = fp.noise(1, H, W, seed=7)
    ref_latents, ref_images = reference_run(
        dev, prompt=PROMPTS[1], height=H, width=W, num_inference_steps=3, latents=noise, guidance_scale=3.5
    )
    pipe = ours(dev)
    assert pipe.variant == "dev" and pipe.text_encoder_kind == "mistral3"
    latents, images = our_run(
        pipe, prompt=PROMPTS[1], embedded_guidance=3.5, height=H, width=W, num_inference_steps=3,
        latents=pack_latents(noise),
    )  # fmt: skip
    assert_close(latents, ref_latents, "final latents (dev)")
    assert_close(images, ref_images, "decoded images (dev)")


def test_klein_edit_with_two_reference_images_matches_diffusers(klein: Any) -> None:
    refs = [fp.image(64, 64, seed=1), fp.image(96, 64, seed=2)]  # diffusers needs >= 64 px
    noise = fp.noise(1, H, W, seed=9)
    ref_latents, _ = reference_run(
        klein, prompt=PROMPTS[0], image=refs, height=H, width=W, num_inference_steps=3, latents=noise,
        guidance_scale=1.0,
    )  # fmt: skip
    pipe = ours(klein)
    latents, _ = our_run(
        pipe, prompt=PROMPTS[0], edit_image=refs, height=H, width=W, num_inference_steps=3,
        latents=pack_latents(noise),
    )  # fmt: skip
    assert_close(latents, ref_latents, "final latents (edit)")
    plain, _ = our_run(pipe, prompt=PROMPTS[0], height=H, width=W, num_inference_steps=3, latents=pack_latents(noise))
    assert (plain - latents).abs().max() > 1e-3  # the references took part in attention


def test_image_to_image_matches_diffusers_from_the_noised_input(klein: Any) -> None:
    source = fp.image(W, H, seed=4)
    steps, strength = 4, 0.6
    pipe = ours(klein)
    noise = fp.noise(1, H, W, seed=11)
    latents, _ = our_run(
        pipe, prompt=PROMPTS[0], input_image=source, denoising_strength=strength, height=H, width=W,
        num_inference_steps=steps, latents=pack_latents(noise),
    )  # fmt: skip
    # diffusers' FLUX.2 pipelines have no image-to-image mode: start them from the same noised input latents
    # and the same (unshifted) sigmas, which they shift with the same empirical mu.
    grid = pipe.scheduler._grid(steps, strength).tolist()
    sigma0 = float(pipe.scheduler.sigmas[0])
    ref = klein.reference
    pixels = ref.image_processor.preprocess(source, height=H, width=W)
    with torch.no_grad():
        clean = ref._encode_vae_image(pixels, generator=None)  # (1, 32, h, w), normalised
    start = sigma0 * noise + (1 - sigma0) * clean
    ref_latents, _ = reference_run(
        klein, prompt=PROMPTS[0], height=H, width=W, num_inference_steps=steps, latents=start, sigmas=grid,
        guidance_scale=1.0,
    )  # fmt: skip
    assert_close(latents, ref_latents, "final latents (image-to-image)")


def test_seeded_noise_batches_and_output_types(klein: Any) -> None:
    pipe = ours(klein)
    one = pipe(PROMPTS[0], height=H, width=W, num_inference_steps=2, seed=42, output_type="latent")
    two = pipe([PROMPTS[0]] * 2, height=H, width=W, num_inference_steps=2, seed=41, output_type="latent")
    assert torch.allclose(one[0], two[1], atol=1e-5)  # image i uses seed + i; same prompt per image
    image = pipe(PROMPTS[0], height=H, width=W, num_inference_steps=2, seed=0)
    assert image.size == (W, H) and pipe.last_run.seeds == [0]
    arrays = pipe(PROMPTS, height=H, width=W, num_inference_steps=2, seed=0, output_type="np")
    assert arrays.shape == (2, H, W, 3) and 0 <= arrays.min() and arrays.max() <= 1


def test_inpainting_keeps_the_unmasked_region(klein: Any) -> None:
    from PIL import Image

    pipe = ours(klein)
    source = fp.image(W, H, seed=6)
    mask = Image.new("L", (W, H), 0)
    mask.paste(255, (0, 0, W // 2, H))  # repaint the left half
    out = pipe(
        PROMPTS[0], input_image=source, inpaint_mask=mask, denoising_strength=1.0, height=H, width=W,
        num_inference_steps=3, seed=1, output_type="latent",
    )  # fmt: skip
    clean = pack_latents(pipe.encode_image(pil_to_tensor(source)))
    grid_w = W // pipe.spatial_factor
    right = torch.arange(out.shape[1]) % grid_w > grid_w // 2  # away from the blended edge column
    assert (out[:, right] - clean[:, right]).abs().max() < 1e-4
    assert (out[:, ~right] - clean[:, ~right]).abs().max() > 1e-2


def test_default_steps_follow_the_variant(klein: Any, dev: Any) -> None:
    assert ours(klein).default_steps(1.0) == 4
    assert ours(klein).default_steps(4.0) == 50
    assert ours(dev).default_steps(1.0) == 50


def test_tokenizer_found_beside_the_text_encoder(klein: Any) -> None:
    pipe = ours(klein, tokenizer=False)
    assert pipe.tokenizer is not None


def test_load_lora_the_diffsynth_way_matches_diffusers_and_unloads(klein: Any, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    tensors: dict[str, torch.Tensor] = {}
    for name, module in klein.reference.transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith(("transformer_blocks.", "single_transformer")):
            fan_in, fan_out = module.in_features, module.out_features
            tensors[f"transformer.{name}.lora_A.weight"] = torch.randn(4, fan_in, generator=gen) / fan_in**0.5
            tensors[f"transformer.{name}.lora_B.weight"] = 0.25 * torch.randn(fan_out, 4, generator=gen)
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(tensors, str(path))
    noise = fp.noise(1, H, W, seed=15)
    args: dict[str, Any] = {"prompt": PROMPTS[0], "height": H, "width": W, "num_inference_steps": 2}
    pipe = ours(klein)
    base, _ = our_run(pipe, latents=pack_latents(noise), **args)
    report = pipe.load_lora(pipe.dit, str(path), alpha=1)
    assert report.tensors_matched == len(tensors) and not report.unmatched_keys and not report.fused
    side, _ = our_run(pipe, latents=pack_latents(noise), **args)
    klein.reference.load_lora_weights(str(path))
    try:
        expected, _ = reference_run(klein, latents=noise, guidance_scale=1.0, **args)
    finally:
        klein.reference.unload_lora_weights()
    assert_close(side, expected, "final latents with a LoRA")
    assert (side - base).abs().max() > 1e-2
    assert pipe.unload_lora() == ["pytorch_lora_weights"]
    assert torch.equal(our_run(pipe, latents=pack_latents(noise), **args)[0], base)
    assert pipe.load_lora(lora_config=ModelConfig(path=str(path)), hotload=False).fused
    assert_close(our_run(pipe, latents=pack_latents(noise), **args)[0], side, "fused LoRA")
    pipe.clear_lora()
    assert torch.equal(our_run(pipe, latents=pack_latents(noise), **args)[0], base)
    with pytest.raises(PipelineInputError, match="DiT only"):
        pipe.load_lora(pipe.vae, str(path))


# -- typed errors ------------------------------------------------------------------------------------------


def test_sizes_that_are_not_multiples_of_16_are_rejected(klein: Any) -> None:
    pipe = ours(klein)
    with pytest.raises(PipelineInputError, match="multiple of 16"):
        pipe(PROMPTS[0], height=40, width=48, num_inference_steps=1)


def test_an_edit_image_that_is_not_an_image_is_rejected(klein: Any) -> None:
    pipe = ours(klein)
    with pytest.raises(PipelineInputError, match=r"edit_image\[1\] must be a PIL"):
        pipe(PROMPTS[0], edit_image=[fp.image(32, 32, 0), "photo.png"], height=H, width=W, num_inference_steps=1)


def test_unknown_arguments_are_rejected(klein: Any) -> None:
    # guidance_scale is the diffusers alias of cfg_scale for klein (issue 22.11); a misspelling is refused
    with pytest.raises(PipelineInputError, match="unknown argument 'guidance_scal'"):
        ours(klein)(PROMPTS[0], height=H, width=W, guidance_scal=4.0)


def test_text_encoder_width_must_match_the_dit(klein: Any, dit_cases: Any) -> None:
    with pytest.raises(TextEncoderMismatchError):
        Flux2ImagePipeline.from_pretrained(
            torch_dtype=torch.float32,
            device="cpu",
            model_configs=[
                ModelConfig(path=str(klein.root / "text_encoder")),
                ModelConfig(path=str(dit_cases["klein"].files["bfl"])),  # context width 24, encoder gives 96
            ],
            tokenizer_config=ModelConfig(path=str(klein.root / "tokenizer")),
            runtime=Runtime(),
        )


def test_reference_kv_caching_matches_the_klein_kv_pipeline(klein: Any) -> None:
    from diffusers import Flux2KleinKVPipeline

    ref = klein.reference
    kv_pipe = Flux2KleinKVPipeline(
        scheduler=ref.scheduler, vae=ref.vae, text_encoder=ref.text_encoder, tokenizer=ref.tokenizer,
        transformer=ref.transformer,
    )  # fmt: skip
    kv_pipe.set_progress_bar_config(disable=True)
    refs = [fp.image(64, 64, seed=1), fp.image(96, 64, seed=2)]
    noise = fp.noise(1, H, W, seed=13)
    captured: dict[str, torch.Tensor] = {}

    def keep(pipe: Any, step: int, t: Any, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        captured["latents"] = tensors["latents"]
        return {}

    with torch.no_grad():
        kv_pipe(
            prompt=PROMPTS[0], image=refs, height=H, width=W, num_inference_steps=3, latents=noise,
            max_sequence_length=SEQ, output_type="latent", callback_on_step_end=keep,
        )  # fmt: skip
    # the diffusers KV attention processors stay installed on the shared transformer: restore the defaults
    from diffusers.models.transformers.transformer_flux2 import Flux2AttnProcessor, Flux2ParallelSelfAttnProcessor

    for block in ref.transformer.transformer_blocks:
        block.attn.set_processor(Flux2AttnProcessor())
    for block in ref.transformer.single_transformer_blocks:
        block.attn.set_processor(Flux2ParallelSelfAttnProcessor())
    pipe = ours(klein)
    latents, _ = our_run(
        pipe, prompt=PROMPTS[0], edit_image=refs, edit_kv_cache=True, height=H, width=W, num_inference_steps=3,
        latents=pack_latents(noise),
    )  # fmt: skip
    assert_close(latents, captured["latents"], "final latents (reference K/V cache)")
    full, _ = our_run(
        pipe, prompt=PROMPTS[0], edit_image=refs, height=H, width=W, num_inference_steps=3,
        latents=pack_latents(noise),
    )  # fmt: skip
    assert (full - latents).abs().max() > 1e-4  # caching is a different (kv-trained) scheme
