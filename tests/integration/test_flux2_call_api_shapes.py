"""FLUX.2 pipeline call API on the embedded shapes model: from_pretrained(repo), diffusers names, output checks.

Issues 21.5-21.7 (typed errors, non-finite output), 22.2 (a repository as from_pretrained's first argument)
and 22.11 (diffusers names). Every generation is 16 x 16 pixels and 1 step.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from diffstudio import ModelConfig
from diffstudio.errors import NonFiniteOutputError, PipelineInputError
from diffstudio.lora import LoraWeights
from diffstudio.nn.delta import delta_linears
from diffstudio.pipeline.diffusers_api import translate_call
from diffstudio.runtime import Runtime
from diffstudio_flux2 import Flux2ImagePipeline
from diffstudio_shapes import model as shapes_model
from PIL import Image

SMALL = {"height": 16, "width": 16, "num_inference_steps": 1, "max_sequence_length": 8, "output_type": "pt"}


@pytest.fixture(scope="module")
def pipe() -> Flux2ImagePipeline:
    loaded = Flux2ImagePipeline.from_pretrained("diffstudio/shapes", torch_dtype=torch.float32, device="cpu")
    loaded.set_progress_bar_config(disable=True)
    return loaded


@pytest.fixture
def restore(pipe: Flux2ImagePipeline) -> Iterator[None]:
    """Restore every component's weights after a test that damages them."""
    saved = {name: {k: v.clone() for k, v in c.module.state_dict().items()} for name, c in pipe.loaded.items()}
    yield
    for name, state in saved.items():
        pipe.loaded[name].module.load_state_dict(state)


def _diffusers_layout(root: Path) -> Path:
    """The shapes model arranged as a diffusers repository (links to the shipped files)."""
    weights = shapes_model.WEIGHTS
    (root / "transformer").mkdir(parents=True)
    (root / "vae").mkdir()
    (root / "transformer" / shapes_model.DIT_FILE).symlink_to(weights / shapes_model.DIT_FILE)
    (root / "vae" / shapes_model.VAE_FILE).symlink_to(weights / shapes_model.VAE_FILE)
    (root / "text_encoder").symlink_to(weights / "text_encoder", target_is_directory=True)
    (root / "tokenizer").symlink_to(weights / "tokenizer", target_is_directory=True)
    index = {
        "_class_name": "Flux2KleinPipeline",
        "transformer": ["diffusers", "Flux2Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKLFlux2"],
        "text_encoder": ["transformers", "Qwen3ForCausalLM"],
        "tokenizer": ["transformers", "Qwen2TokenizerFast"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    }
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def test_from_pretrained_accepts_a_diffusers_repository_folder(pipe: Flux2ImagePipeline, tmp_path: Path) -> None:
    repo = _diffusers_layout(tmp_path / "repo")
    loaded = Flux2ImagePipeline.from_pretrained(str(repo), torch_dtype=torch.float32, device="cpu")
    assert sorted(loaded.loaded) == ["dit", "text_encoder", "vae"] and loaded.tokenizer is not None
    loaded.set_progress_bar_config(disable=True)
    torch.testing.assert_close(loaded("a red circle", seed=3, **SMALL), pipe("a red circle", seed=3, **SMALL))


def test_from_pretrained_path_is_never_taken_for_the_dtype(tmp_path: Path) -> None:
    from diffstudio.errors import ConfigError

    with pytest.raises(ConfigError, match="no such file or folder"):
        Flux2ImagePipeline.from_pretrained(str(tmp_path / "missing"), device="cpu")
    with pytest.raises(ConfigError, match="torch_dtype='/path/to/repo' is not a known dtype"):
        Flux2ImagePipeline.from_pretrained(torch_dtype="/path/to/repo", device="cpu")


def test_nan_vae_weights_give_a_non_finite_output_error(pipe: Flux2ImagePipeline, restore: None) -> None:
    with torch.no_grad():
        pipe.vae.decoder.conv_out.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteOutputError, match="in the decoded images"):
        pipe("a red circle", seed=0, **SMALL)


def test_nan_dit_weights_give_a_non_finite_output_error(pipe: Flux2ImagePipeline, restore: None) -> None:
    with torch.no_grad():
        next(pipe.dit.parameters()).fill_(float("inf"))
    with pytest.raises(NonFiniteOutputError, match="latents after denoising step 1.*try torch_dtype=torch.float32"):
        pipe("a red circle", seed=0, **{**SMALL, "num_inference_steps": 3})


def test_images_that_cannot_be_converted_are_typed_errors(pipe: Flux2ImagePipeline, tmp_path: Path) -> None:
    with pytest.raises(PipelineInputError, match=r"edit_image: cannot convert the 'La' image to RGB"):
        pipe("a", edit_image=Image.new("La", (16, 16)), **SMALL)
    truncated = tmp_path / "cut.png"
    Image.new("RGB", (32, 32), "red").save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:60])
    with pytest.raises(PipelineInputError, match="input_image: cannot read the image's pixels"):
        pipe("a", input_image=Image.open(truncated), **SMALL)


def test_guidance_scale_is_cfg_scale_for_klein_and_embedded_guidance_for_flux1() -> None:
    FluxImagePipeline = pytest.importorskip("diffstudio_flux1").FluxImagePipeline  # not a flux2 dependency

    runtime = Runtime(env={}, load_entrypoints=False)
    klein = Flux2ImagePipeline(device="cpu", runtime=runtime)
    given, _ = translate_call(klein, Flux2ImagePipeline.__call__.__wrapped__, ("a",), {"guidance_scale": 4.0})
    assert given["cfg_scale"] == 4.0 and "guidance_scale" not in given
    flux1 = FluxImagePipeline(device="cpu", runtime=runtime)
    call = FluxImagePipeline.__call__.__wrapped__
    given, _ = translate_call(flux1, call, ("a",), {"guidance_scale": 2.5, "true_cfg_scale": 3.0, "strength": 0.5})
    assert (given["embedded_guidance"], given["cfg_scale"], given["denoising_strength"]) == (2.5, 3.0, 0.5)
    with pytest.raises(PipelineInputError, match="max_sequence_length= is the diffusers name of t5_sequence_length="):
        translate_call(flux1, call, ("a",), {"max_sequence_length": 256, "t5_sequence_length": 256})


def test_lora_weights_set_adapters_and_fuse_lora(pipe: Flux2ImagePipeline, tmp_path: Path) -> None:
    from diffstudio_flux2.lora import save_lora_file

    gen = torch.Generator().manual_seed(0)
    lora = {}
    for path, layer in list(delta_linears(pipe.dit))[:6]:
        down = torch.randn(4, layer.in_features, generator=gen) / layer.in_features**0.5
        lora[path] = LoraWeights(down, torch.randn(layer.out_features, 4, generator=gen), 4.0)
    file = save_lora_file(lora, tmp_path / "style.safetensors")
    base = pipe("a red circle", seed=1, **SMALL)
    pipe.load_lora_weights(str(tmp_path), weight_name="style.safetensors", adapter_name="style")
    try:
        styled = pipe("a red circle", seed=1, **SMALL)
        assert (styled - base).abs().max() > 1e-3
        assert pipe.get_active_adapters() == ["style"]
        pipe.set_adapters("style", 0.0)
        torch.testing.assert_close(pipe("a red circle", seed=1, **SMALL), base, rtol=0, atol=1e-6)
        pipe.set_adapters(["style"], [1.0])
        pipe.fuse_lora()
        torch.testing.assert_close(pipe("a red circle", seed=1, **SMALL), styled, rtol=1e-4, atol=1e-4)
        with pytest.raises(PipelineInputError, match="fused; call unfuse_lora"):
            pipe.set_adapters("style")
        pipe.unfuse_lora()
        torch.testing.assert_close(pipe("a red circle", seed=1, **SMALL), styled, rtol=0, atol=1e-6)
        with pytest.raises(PipelineInputError, match=r"no LoRA named \['other'\]"):
            pipe.set_adapters("other")
    finally:
        pipe.unload_lora_weights()
    assert pipe.get_list_adapters() == [] and file.is_file()
    torch.testing.assert_close(pipe("a red circle", seed=1, **SMALL), base, rtol=0, atol=0)


def test_model_configs_after_a_repository_replace_its_components(pipe: Flux2ImagePipeline) -> None:
    weights = shapes_model.WEIGHTS
    loaded = Flux2ImagePipeline.from_pretrained(
        "diffstudio/shapes",
        torch_dtype=torch.float32,
        device="cpu",
        model_configs=[ModelConfig(path=str(weights / shapes_model.DIT_FILE))],
    )
    assert loaded.loaded["dit"].files == (str(weights / shapes_model.DIT_FILE),)


def test_empty_edit_image_list_is_a_typed_error(pipe: Flux2ImagePipeline) -> None:
    # found by tests/fuzz/test_fuzz_call_args.py: torch.cat() of no reference tokens escaped as a ValueError
    with pytest.raises(PipelineInputError, match=r"edit_image=\[\] holds no image"):
        pipe("a", edit_image=[], **SMALL)


def test_latents_of_another_batch_are_refused(pipe: Flux2ImagePipeline) -> None:
    tokens = (16 // pipe.spatial_factor) ** 2
    with pytest.raises(PipelineInputError, match=r"latents= has shape \(3, 1, 32\); expected \(1 or 2, 1, 32\)"):
        pipe(["a", "b"], latents=torch.zeros(3, tokens, pipe.latent_channels), **SMALL)


def test_explicit_sigmas_set_the_step_count_under_cfg(pipe: Flux2ImagePipeline) -> None:
    # found by the fuzz: with cfg_scale > 1 the klein-base default of 50 steps was checked against the step limit
    # although the two explicit sigmas were what would run
    pipe.limits.max_steps = 4
    try:
        pipe("a", cfg_scale=2.0, sigmas=[1.0, 0.5], height=16, width=16, max_sequence_length=8, output_type="latent")
        assert pipe.last_run.arguments["num_inference_steps"] == 2
    finally:
        pipe.limits.max_steps = 1000


def test_from_pretrained_accepts_a_model_id_from_the_hub_cache(
    pipe: Flux2ImagePipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = tmp_path / "hub"
    repo = hub / "models--someone--shapes-klein"
    _diffusers_layout(repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = Flux2ImagePipeline.from_pretrained("someone/shapes-klein", torch_dtype=torch.float32, device="cpu")
    assert sorted(loaded.loaded) == ["dit", "text_encoder", "vae"]
    loaded.set_progress_bar_config(disable=True)
    torch.testing.assert_close(loaded("a red circle", seed=3, **SMALL), pipe("a red circle", seed=3, **SMALL))
