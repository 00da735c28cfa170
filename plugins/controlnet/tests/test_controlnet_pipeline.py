"""controlnet_inputs on FluxImagePipeline equal diffusers' FluxControlNetPipeline; bad inputs are typed errors."""

from __future__ import annotations

import json
import warnings
from typing import Any

import pytest
import torch
from diffstudio import ModelConfig
from diffstudio.errors import MissingPluginError, PipelineInputError
from diffstudio.runtime import Runtime
from diffstudio_controlnet import ControlImageResizedWarning, ControlNetInput
from diffstudio_flux1.pipeline import FluxImagePipeline

TOL = 2e-4
H, W, SEQ = 32, 48, 16
PROMPT = "a red circle on a blue background"


def ours(repo: Any, *controlnet_folders: Any, runtime: Runtime | None = None) -> FluxImagePipeline:
    root = repo.root
    parts = [root / "transformer", root / "text_encoder", root / "text_encoder_2", root / "vae", *controlnet_folders]
    pipe = FluxImagePipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu", model_configs=[ModelConfig(path=str(p)) for p in parts],
        runtime=runtime or Runtime(),
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference(repo: Any, fp: Any, controlnet: Any, **kwargs: Any) -> torch.Tensor:
    """diffusers' FluxControlNetPipeline over the tiny repository (``fp``: the FLUX.1 kit's pipeline fixtures)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxControlNetPipeline

    scheduler = FlowMatchEulerDiscreteScheduler(**fp.SCHEDULER_CONFIG)
    pipe = FluxControlNetPipeline(scheduler=scheduler, controlnet=controlnet, **repo.components)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        images: torch.Tensor = pipe(output_type="pt", max_sequence_length=SEQ, height=H, width=W, **kwargs).images
    return images


def test_union_controlnet_text_to_image_matches_diffusers(repo: Any, controlnet_files: Any, fp: Any) -> None:
    model, folder = controlnet_files["union"]
    control = fp.image(W, H, seed=7)
    noise = fp.packed_noise(1, H, W, seed=3)
    expected = reference(repo, fp, model, prompt=PROMPT, control_image=control, control_mode=1, latents=noise,
                         controlnet_conditioning_scale=0.8, num_inference_steps=3, guidance_scale=2.0)  # fmt: skip
    pipe = ours(repo, folder)
    args: dict[str, Any] = {"height": H, "width": W, "num_inference_steps": 3, "latents": noise, "output_type": "pt",
                            "t5_sequence_length": SEQ, "embedded_guidance": 2.0}  # fmt: skip
    got = pipe(PROMPT, controlnet_inputs=[ControlNetInput(control, scale=0.8, processor_id="tile")], **args)
    diff = (got - expected).abs().max().item()
    print(f"FluxControlNetPipeline (union) final image max diff {diff:.2e}")
    assert diff <= TOL
    plain = pipe(PROMPT, **args)
    assert (plain - got).abs().max() > 1e-3
    other_mode = pipe(PROMPT, controlnet_inputs=[ControlNetInput(control, scale=0.8, processor_id=0)], **args)
    assert (other_mode - got).abs().max() > 1e-4


def test_two_inputs_are_summed_like_diffusers_multi_controlnet(repo: Any, controlnet_files: Any, fp: Any) -> None:
    from diffusers import FluxMultiControlNetModel

    model, folder = controlnet_files["plain"]
    first, second = fp.image(W, H, seed=8), fp.image(W, H, seed=9)
    noise = fp.packed_noise(1, H, W, seed=4)
    expected = reference(repo, fp, FluxMultiControlNetModel([model, model]), prompt=PROMPT,
                         control_image=[first, second], controlnet_conditioning_scale=[0.6, 0.9],
                         num_inference_steps=2, latents=noise, guidance_scale=3.0)  # fmt: skip
    got = ours(repo, folder)(
        PROMPT, controlnet_inputs=[ControlNetInput(first, 0.6), {"image": second, "scale": 0.9}], height=H, width=W,
        num_inference_steps=2, latents=noise, output_type="pt", t5_sequence_length=SEQ, embedded_guidance=3.0,
    )  # fmt: skip
    diff = (got - expected).abs().max().item()
    print(f"FluxControlNetPipeline (two inputs) final image max diff {diff:.2e}")
    assert diff <= TOL


def test_start_end_cfg_kontext_tiling_and_img2img(repo: Any, controlnet_files: Any, fp: Any) -> None:
    pipe = ours(repo, controlnet_files["plain"][1])
    control = fp.image(W, H, seed=10)
    args: dict[str, Any] = {"height": H, "width": W, "num_inference_steps": 3, "seed": 1, "output_type": "latent",
                            "t5_sequence_length": SEQ}  # fmt: skip
    base = pipe(PROMPT, **args)
    always = pipe(PROMPT, controlnet_inputs=[ControlNetInput(control)], **args)
    never = pipe(PROMPT, controlnet_inputs=[ControlNetInput(control, start=0.2, end=0.1)], **args)  # no step in range
    late = pipe(PROMPT, controlnet_inputs=[ControlNetInput(control, start=0.5, end=0.0)], **args)  # last step only
    assert torch.equal(never, base) and (late - base).abs().max() > 1e-4 and (late - always).abs().max() > 1e-4
    for extra in ({"cfg_scale": 2.0, "negative_prompt": "blurry"}, {"kontext_images": fp.image(32, 32, seed=2)},
                  {"tiled": True, "tile_size": 8, "tile_stride": 4},
                  {"input_image": fp.image(W, H, seed=3), "denoising_strength": 0.6}):  # fmt: skip
        with_cn = pipe(PROMPT, controlnet_inputs=[ControlNetInput(control)], **args, **extra)
        without = pipe(PROMPT, **args, **extra)
        assert with_cn.shape == base.shape and (with_cn - without).abs().max() > 1e-4, extra


def test_inpainting_condition_follows_the_published_layout(repo: Any, controlnet_files: Any, fp: Any) -> None:
    """alimama: masked pixels -> black, VAE latents, then the keep mask (1 - mask) at latent size, packed: 68."""
    from diffstudio.pipeline.images import pil_to_tensor
    from diffstudio_controlnet.units import condition_tokens
    from diffstudio_flux1.math import pack_latents
    from PIL import Image

    pipe = ours(repo, controlnet_files["inpainting"][1])
    image = fp.image(W, H, seed=11)
    mask = Image.new("L", (W, H), 0)
    mask.paste(255, (8, 4, 40, 20))
    item = ControlNetInput(image, inpaint_mask=mask)
    with torch.no_grad():
        tokens = condition_tokens(pipe, item, 0, H, W, {}, 68)
        pixels = pil_to_tensor(image)
        keep_px = torch.ones(1, 1, H, W)
        keep_px[..., 4:20, 8:40] = 0
        latents = pipe.encode_image(pixels * keep_px - (1 - keep_px))
        keep = keep_px[..., ::2, ::2]  # this VAE downsamples by 2; nearest = every second pixel
        expected = pack_latents(torch.cat([latents, keep], dim=1))
    assert tokens.shape == (1, (H // 4) * (W // 4), 68) and (tokens - expected).abs().max() <= 1e-5
    out = pipe(PROMPT, controlnet_inputs=[item], height=H, width=W, num_inference_steps=2, seed=0,
               output_type="latent", t5_sequence_length=SEQ)  # fmt: skip
    assert out.shape == (1, 96, 64)
    with pytest.raises(PipelineInputError, match="needs an inpaint_mask"):
        pipe(PROMPT, controlnet_inputs=[ControlNetInput(image)], height=H, width=W, num_inference_steps=1)


def test_bad_inputs_are_typed_errors(repo: Any, controlnet_files: Any, fp: Any) -> None:
    pipe = ours(repo, controlnet_files["union"][1])
    control = fp.image(W, H, seed=12)
    args: dict[str, Any] = {"height": H, "width": W, "num_inference_steps": 1, "output_type": "latent",
                            "t5_sequence_length": SEQ}  # fmt: skip
    with pytest.raises(PipelineInputError, match="processor_id"):
        pipe(PROMPT, controlnet_inputs=[ControlNetInput(control)], **args)
    with pytest.raises(PipelineInputError, match="not a Union mode"):
        pipe(PROMPT, controlnet_inputs=[ControlNetInput(control, processor_id="sketch")], **args)
    with pytest.raises(PipelineInputError, match="controlnet_inputs\\[0\\].image"):
        pipe(PROMPT, controlnet_inputs=[{"image": 3, "processor_id": 0}], **args)
    with pytest.raises(PipelineInputError, match="unknown fields"):
        pipe(PROMPT, controlnet_inputs=[{"image": control, "strength": 1}], **args)
    with pytest.raises(PipelineInputError, match="end <= start"):
        pipe(PROMPT, controlnet_inputs=[ControlNetInput(control, processor_id=0, start=0.2, end=0.5)], **args)
    with pytest.raises(PipelineInputError, match="controlnet_id"):
        pipe(PROMPT, controlnet_inputs=[ControlNetInput(control, processor_id=0, controlnet_id=1)], **args)
    small = fp.image(W // 2, H // 2, seed=12)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe(PROMPT, controlnet_inputs=[ControlNetInput(small, processor_id=0)], **args)
    assert any(issubclass(w.category, ControlImageResizedWarning) and "controlnet_inputs[0].image" in str(w.message)
               for w in caught)  # fmt: skip
    no_net = ours(repo)
    with pytest.raises(PipelineInputError, match="no ControlNet is loaded"):
        no_net(PROMPT, controlnet_inputs=[ControlNetInput(control)], **args)


def test_without_the_plugin_the_argument_names_the_distribution(repo: Any, fp: Any) -> None:
    pipe = ours(repo, runtime=Runtime(env={"DIFFSTUDIO_DISABLED_PLUGINS": "controlnet"}))
    with pytest.raises(MissingPluginError, match="diffstudio-controlnet") as info:
        pipe(PROMPT, controlnet_inputs=[ControlNetInput(fp.image(W, H, seed=1))], height=H, width=W)
    assert info.value.distribution == "diffstudio-controlnet"
    assert pipe(PROMPT, controlnet_inputs=None, height=H, width=W, num_inference_steps=1, output_type="latent",
                t5_sequence_length=SEQ).shape == (1, 96, 64)  # fmt: skip


def test_a_memory_managed_controlnet_gives_the_same_image(repo: Any, controlnet_files: Any, fp: Any) -> None:
    """The ControlNet follows the layer-wise policy like any component: offloaded storage, fp8 storage."""
    folder = controlnet_files["plain"][1]
    control = fp.image(W, H, seed=13)
    args: dict[str, Any] = {"height": H, "width": W, "num_inference_steps": 2, "seed": 3, "output_type": "latent",
                            "t5_sequence_length": SEQ, "controlnet_inputs": [ControlNetInput(control)]}  # fmt: skip
    expected = ours(repo, folder)(PROMPT, **args)
    root = repo.root
    base = [ModelConfig(path=str(root / n)) for n in ("transformer", "text_encoder", "text_encoder_2", "vae")]
    for dtype, tol in ((torch.float32, 1e-6), (torch.float8_e4m3fn, None)):
        managed = ModelConfig(path=str(folder), offload_device="cpu", offload_dtype=dtype, onload_dtype=dtype,
                              computation_dtype=torch.float32)  # fmt: skip
        pipe = FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", runtime=Runtime(),
                                                 model_configs=[*base, managed])  # fmt: skip
        pipe.set_progress_bar_config(disable=True)
        got = pipe(PROMPT, **args)
        report = pipe.vram_report()["controlnet"]
        assert report["strategy"] != "none", report
        if tol is not None:
            assert (got - expected).abs().max() <= tol
        else:
            assert "float8" in json.dumps(report) and (got - expected).abs().max() < 0.5
