"""FluxImagePipeline equals diffusers' FluxPipeline / FluxKontextPipeline / FluxImg2ImgPipeline on tiny models."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from diffstudio import ModelConfig
from diffstudio.errors import PipelineInputError
from diffstudio.pipeline.base import WrongFamilyError
from diffstudio.runtime import Runtime
from diffstudio.testing import import_file
from diffstudio_flux1.pipeline import FluxImagePipeline
from diffstudio_flux1.text_encoders import TokenizerConfigError


def _load(name: str) -> ModuleType:
    return import_file(Path(__file__).with_name(f"{name}.py"))


fp = _load("fixtures_pipeline")
TOL = 2e-4
PROMPTS = ["a red circle on a blue background", "a green star"]
H, W, SEQ = 32, 48, 16


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, helpers: ModuleType) -> Any:
    return fp.build_repo(tmp_path_factory.mktemp("flux1-repo"), helpers)


def ours(repo: Any, single_files: bool = False, tokenizers: bool = True) -> FluxImagePipeline:
    root = repo.root
    dit = root / ("flux1-dev.safetensors" if single_files else "transformer")
    vae = root / ("ae.safetensors" if single_files else "vae")
    pipe = FluxImagePipeline.from_pretrained(
        torch_dtype=torch.float32,
        device="cpu",
        model_configs=[ModelConfig(path=str(p)) for p in (dit, root / "text_encoder", root / "text_encoder_2", vae)],
        tokenizer_1_config=ModelConfig(path=str(root / "tokenizer")) if tokenizers else None,
        tokenizer_2_config=ModelConfig(path=str(root / "tokenizer_2")) if tokenizers else None,
        runtime=Runtime(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _keep(store: dict[str, torch.Tensor]) -> Any:
    def keep(pipe: Any, step: int, t: Any, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        store["latents"] = tensors["latents"]
        return {}

    return keep


def reference_run(pipe: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a diffusers pipeline; return the final packed latents and the images in [0, 1]."""
    captured: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        images = pipe(output_type="pt", callback_on_step_end=_keep(captured), max_sequence_length=SEQ, **kwargs).images
    return captured["latents"], images


def our_run(pipe: FluxImagePipeline, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    captured: dict[str, torch.Tensor] = {}
    images = pipe(output_type="pt", callback_on_step_end=_keep(captured), t5_sequence_length=SEQ, **kwargs)
    return captured["latents"], images


def clean_latents(pipe: FluxImagePipeline, image: Any) -> torch.Tensor:
    from diffstudio.pipeline.images import pil_to_tensor
    from diffstudio_flux1.math import pack_latents

    with torch.no_grad():
        return pack_latents(pipe.encode_image(pil_to_tensor(image)))


def assert_close(a: torch.Tensor, b: torch.Tensor, what: str) -> float:
    assert a.shape == b.shape, f"{what}: shapes {tuple(a.shape)} vs {tuple(b.shape)}"
    diff = (a - b).abs().max().item()
    assert diff <= TOL, f"{what}: max abs diff {diff}"
    return diff


@pytest.mark.parametrize("single_files", [False, True], ids=["folders", "bfl-files"])
def test_dev_text_to_image_with_embedded_guidance_matches_diffusers(repo: Any, single_files: bool) -> None:
    noise = fp.packed_noise(2, H, W)
    args: dict[str, Any] = {"prompt": PROMPTS, "height": H, "width": W, "num_inference_steps": 3, "latents": noise}
    ref_latents, ref_images = reference_run(repo.pipeline(), guidance_scale=2.5, **args)
    latents, images = our_run(ours(repo, single_files), embedded_guidance=2.5, **args)
    assert_close(latents, ref_latents, "final latents")
    assert_close(images, ref_images, "decoded images")
    other, _ = our_run(ours(repo), embedded_guidance=5.0, **args)
    assert (other - latents).abs().max() > 1e-3


def test_real_cfg_with_a_negative_prompt_matches_diffusers(repo: Any) -> None:
    noise = fp.packed_noise(1, H, W, seed=5)
    args: dict[str, Any] = {"height": H, "width": W, "num_inference_steps": 3, "latents": noise}
    ref, _ = reference_run(
        repo.pipeline(), prompt=PROMPTS[0], negative_prompt="blurry", true_cfg_scale=3.0, guidance_scale=1.5, **args
    )
    got, _ = our_run(
        ours(repo), prompt=PROMPTS[0], negative_prompt="blurry", cfg_scale=3.0, embedded_guidance=1.5, **args
    )
    assert_close(got, ref, "final latents (real CFG)")
    plain, _ = our_run(ours(repo), prompt=PROMPTS[0], embedded_guidance=1.5, **args)
    assert (plain - got).abs().max() > 1e-3


def test_kontext_edit_matches_diffusers(repo: Any) -> None:
    source = fp.image(32, 32, seed=3)
    noise = fp.packed_noise(1, H, W, seed=9)
    args: dict[str, Any] = {"prompt": PROMPTS[0], "height": H, "width": W, "num_inference_steps": 3, "latents": noise}
    ref, _ = reference_run(
        repo.pipeline("FluxKontextPipeline"),
        image=source,
        _auto_resize=False,
        max_area=H * W,
        guidance_scale=2.5,
        **args,
    )
    pipe = ours(repo, single_files=True)
    got, _ = our_run(pipe, kontext_images=source, embedded_guidance=2.5, **args)
    assert_close(got, ref, "final latents (Kontext)")
    plain, _ = our_run(pipe, embedded_guidance=2.5, **args)
    assert (plain - got).abs().max() > 1e-3


def test_image_to_image_matches_diffusers(repo: Any) -> None:
    """DiffSynth semantics (N steps from a lower start) equal FluxImg2ImgPipeline on a matching longer schedule."""
    source = fp.image(W, H, seed=4)
    steps, strength = 3, 0.6
    pipe = ours(repo)
    noise = fp.packed_noise(1, H, W, seed=11)
    got, _ = our_run(
        pipe, prompt=PROMPTS[0], input_image=source, denoising_strength=strength, height=H, width=W,
        num_inference_steps=steps, latents=noise, embedded_guidance=2.0,
    )  # fmt: skip
    ours_grid = pipe.scheduler._grid(steps, strength).tolist()
    # diffusers keeps the last int(N * strength) of N sigmas: prepend as many sigmas above ours, strength 0.5
    prefix = torch.linspace(1.0, ours_grid[0], steps + 1)[:-1].tolist()
    start = pipe.scheduler.add_noise(clean_latents(pipe, source), noise, float(pipe.scheduler.sigmas[0]))
    ref, _ = reference_run(
        repo.pipeline("FluxImg2ImgPipeline"), prompt=PROMPTS[0], image=source, strength=0.5, height=H, width=W,
        num_inference_steps=2 * steps, sigmas=prefix + ours_grid, latents=start, guidance_scale=2.0,
    )  # fmt: skip
    assert_close(got, ref, "final latents (image-to-image)")


def test_sigma_shift_is_the_static_shift_of_diffusers() -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = FluxImagePipeline(device="cpu", torch_dtype=torch.float32)
    reference = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False)
    reference.set_timesteps(sigmas=torch.linspace(1.0, 1 / 8, 8).numpy())
    unit = next(u for u in pipe.units if u.name == "flux1_set_timesteps")
    unit.process(pipe, num_inference_steps=8, denoising_strength=1.0, sigmas=None, sigma_shift=3.0, height=H, width=W)
    assert torch.allclose(pipe.scheduler.timesteps, reference.timesteps.float(), atol=1e-3)
    with pytest.raises(PipelineInputError, match="sigma_shift"):
        unit.process(pipe, num_inference_steps=8, denoising_strength=1.0, sigmas=None, sigma_shift=0, height=H, width=W)


def test_seeded_noise_batches_output_types_and_tiling(repo: Any) -> None:
    pipe = ours(repo, tokenizers=False)  # tokenizers found beside the text encoders
    one = pipe(
        PROMPTS[0], height=H, width=W, num_inference_steps=2, seed=42, output_type="latent", t5_sequence_length=SEQ
    )
    two = pipe([PROMPTS[0]] * 2, height=H, width=W, num_inference_steps=2, seed=41, output_type="latent",
               t5_sequence_length=SEQ)  # fmt: skip
    assert one.shape == (1, (H // 4) * (W // 4), 64) and torch.allclose(one[0], two[1], atol=1e-5)
    image = pipe(PROMPTS[0], height=H, width=W, num_inference_steps=2, seed=0, t5_sequence_length=SEQ)
    assert image.size == (W, H) and pipe.last_run.seeds == [0]
    plain = pipe(PROMPTS, height=H, width=W, num_inference_steps=2, seed=0, output_type="np", t5_sequence_length=SEQ)
    tiled = pipe(PROMPTS, height=H, width=W, num_inference_steps=2, seed=0, output_type="np", t5_sequence_length=SEQ,
                 tiled=True, tile_size=8, tile_stride=4)  # fmt: skip
    assert plain.shape == tiled.shape == (2, H, W, 3) and 0 <= plain.min() and plain.max() <= 1
    assert 0 < abs(plain - tiled).mean() < 0.2
    with pytest.raises(PipelineInputError, match="tile_stride"):
        pipe(PROMPTS[0], height=H, width=W, tiled=True, tile_size=8, tile_stride=16)


def test_inpainting_keeps_the_unmasked_region(repo: Any) -> None:
    from PIL import Image

    pipe = ours(repo)
    source = fp.image(W, H, seed=6)
    mask = Image.new("L", (W, H), 0)
    mask.paste(255, (0, 0, W // 2, H))  # repaint the left half
    out = pipe(
        PROMPTS[0], input_image=source, inpaint_mask=mask, height=H, width=W, num_inference_steps=3, seed=1,
        output_type="latent", t5_sequence_length=SEQ,
    )  # fmt: skip
    clean = clean_latents(pipe, source)
    grid_w = W // pipe.spatial_factor
    right = torch.arange(out.shape[1]) % grid_w > grid_w // 2
    assert (out[:, right] - clean[:, right]).abs().max() < 1e-4
    assert (out[:, ~right] - clean[:, ~right]).abs().max() > 1e-2


def test_bad_inputs_are_rejected(repo: Any) -> None:
    pipe = ours(repo)
    with pytest.raises(PipelineInputError, match="multiple of 16"):
        pipe(PROMPTS[0], height=40, width=W)
    with pytest.raises(PipelineInputError, match="unknown argument"):
        pipe(PROMPTS[0], height=H, width=W, not_an_argument=1)
    with pytest.raises(PipelineInputError, match="kontext_images"):
        pipe(PROMPTS[0], height=H, width=W, kontext_images="picture.png", num_inference_steps=1)
    with pytest.raises(PipelineInputError, match="latents"):
        pipe(PROMPTS[0], height=H, width=W, latents=torch.zeros(1, 5, 64), num_inference_steps=1)


def test_missing_tokenizer_is_a_typed_error(repo: Any, tmp_path: Path) -> None:
    import shutil

    for name in ("transformer", "text_encoder", "text_encoder_2"):
        shutil.copytree(repo.root / name, tmp_path / name)
    pipe = FluxImagePipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu", runtime=Runtime(),
        model_configs=[ModelConfig(path=str(tmp_path / n)) for n in ("transformer", "text_encoder", "text_encoder_2")],
    )  # fmt: skip
    with pytest.raises(TokenizerConfigError, match="tokenizer_1_config"):
        pipe(PROMPTS[0], height=H, width=W, num_inference_steps=1, output_type="latent")


def test_a_flux2_checkpoint_is_refused_naming_its_family(tmp_path: Path) -> None:
    pytest.importorskip("diffstudio_flux2", reason="the refusal names the claiming family: flux2, not a dependency")
    from diffusers import Flux2Transformer2DModel

    flux2 = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=24, timestep_guidance_channels=256, axes_dims_rope=(4, 4, 4, 4),
    )  # fmt: skip
    flux2.save_pretrained(tmp_path / "flux2")
    with pytest.raises(WrongFamilyError, match="'flux2' family") as info:
        FluxImagePipeline.from_pretrained(
            torch_dtype=torch.float32, device="cpu", model_configs=[ModelConfig(path=str(tmp_path / "flux2"))],
            runtime=Runtime(),
        )  # fmt: skip
    assert "flux2-dit" in str(info.value) and "FluxImagePipeline" in str(info.value)


def test_pipeline_lora_matches_diffusers_and_unloads(repo: Any, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    tensors: dict[str, torch.Tensor] = {}
    for name, module in repo.components["transformer"].named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith(("transformer_blocks.", "single_transformer")):
            tensors[f"transformer.{name}.lora_A.weight"] = torch.randn(4, module.in_features, generator=gen) / 8
            tensors[f"transformer.{name}.lora_B.weight"] = 0.25 * torch.randn(module.out_features, 4, generator=gen)
    path = tmp_path / "style.safetensors"
    save_file(tensors, str(path))
    noise = fp.packed_noise(1, H, W, seed=15)
    args: dict[str, Any] = {"prompt": PROMPTS[0], "height": H, "width": W, "num_inference_steps": 2, "latents": noise}
    pipe = ours(repo)
    base, _ = our_run(pipe, **args)
    report = pipe.load_lora(ModelConfig(path=str(path)), scale=1.0)
    assert report.tensors_matched == len(tensors) and not report.unmatched_keys
    side, _ = our_run(pipe, **args)
    reference = repo.pipeline()
    reference.load_lora_weights(str(path))
    try:
        expected, _ = reference_run(reference, guidance_scale=3.5, **args)
    finally:
        reference.unload_lora_weights()
    assert_close(side, expected, "final latents with a LoRA")
    assert (side - base).abs().max() > 1e-2
    assert pipe.unload_lora() == ["style"]
    assert torch.equal(our_run(pipe, **args)[0], base)
