"""Diffusion Templates on a tiny random FLUX.2 pipeline: the three media end to end, and the trainer's path.

The pipeline is the FLUX.2 plugin's test repository (2 double + 2 single blocks, 2 heads of 16, 64 latent tokens
at 32x32 pixels); templates are the SDK's toy templates, loaded as installed or data-only templates.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from diffstudio import ModelConfig
from diffstudio.errors import CacheFormatError, CacheMergeError
from diffstudio.lora import attach_lora, detach_lora, lora_names
from diffstudio.runtime import Runtime
from diffstudio.templates import TemplatePipeline, export_template, forward_template, process_template_inputs
from diffstudio.testing import import_file
from diffstudio_flux2.pipeline import Flux2ImagePipeline
from diffstudio_template_sdk.testing import toy_templates_plugin
from diffstudio_template_sdk.testing.toy_templates import ToyKVTemplate, ToyLoraTemplate, ToyResidualTemplate

FLUX2_TESTS = Path(__file__).resolve().parents[2] / "plugins" / "flux2" / "tests"
PLUGINS = ("diffstudio_flux2.plugin", "diffstudio_medium_kv.plugin", "diffstudio_medium_lora.plugin",
           "diffstudio_medium_residual.plugin")  # fmt: skip
CALL: dict[str, Any] = {"prompt": "a red circle", "seed": 3, "height": 32, "width": 32, "num_inference_steps": 2,
                        "output_type": "latent", "max_sequence_length": 16}  # fmt: skip
LORA_TARGETS = {"double_blocks.0.img_attn.qkv": (32, 96), "single_blocks.1.linear1": (32, 288)}


def _load(name: str) -> ModuleType:
    return import_file(FLUX2_TESTS / f"{name}.py")


@pytest.fixture(scope="module")
def runtime() -> Runtime:
    return Runtime(env={}, load_entrypoints=False,
                   plugins=[*map(importlib.import_module, PLUGINS), toy_templates_plugin])  # fmt: skip


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory, runtime: Runtime) -> Flux2ImagePipeline:
    root = tmp_path_factory.mktemp("flux2")
    _load("fixtures_pipeline").build_repo(root, "klein", _load("conftest"), seed=0)
    loaded = Flux2ImagePipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu", runtime=runtime,
        model_configs=[ModelConfig(path=str(root / "text_encoder")), ModelConfig(path=str(root / "transformer")),
                       ModelConfig(path=str(root / "vae" / "diffusion_pytorch_model.safetensors"))],
        tokenizer_config=ModelConfig(path=str(root / "tokenizer")),
    )  # fmt: skip
    loaded.set_progress_bar_config(disable=True)
    return loaded


def base(pipe: Flux2ImagePipeline, **kwargs: Any) -> torch.Tensor:
    out: torch.Tensor = pipe(**{**CALL, **kwargs})
    return out


def templates_of(runtime: Runtime, *models: torch.nn.Module, root: Path) -> TemplatePipeline:
    """Export each model as a data-only template and load them all."""
    folders = [str(export_template(m, root / f"t{i}", runtime=runtime)) for i, m in enumerate(models)]
    return TemplatePipeline.from_pretrained(device="cpu", model_configs=folders, runtime=runtime)


def kv_template(seed: int, blocks: tuple[str, ...] = ("double_0", "double_1", "single_0", "single_1")) -> ToyKVTemplate:
    torch.manual_seed(seed)
    return ToyKVTemplate(blocks=blocks, heads=2, head_dim=16, tokens=4)


def test_kv_cache_templates_reach_every_block_and_concatenate(
    pipe: Flux2ImagePipeline, runtime: Runtime, tmp_path: Path
) -> None:
    a, b = kv_template(1), kv_template(2, blocks=("double_1", "single_0"))
    templates = templates_of(runtime, a, b, root=tmp_path)
    with torch.no_grad():
        cache_a, cache_b = a(value=torch.tensor(0.7))["kv_cache"], b(value=torch.tensor(0.2))["kv_cache"]
    one = templates(pipe, **CALL, template_inputs=[{"scale": 0.7}])
    torch.testing.assert_close(one, base(pipe, kv_cache=cache_a))
    assert (one - base(pipe)).abs().max() > 1e-3
    both = templates(pipe, **CALL, template_inputs=[{"scale": 0.7}, {"model_id": 1, "scale": 0.2}])
    manual = {n: (torch.cat([k, cache_b[n][0]], 1), torch.cat([v, cache_b[n][1]], 1)) if n in cache_b else (k, v)
              for n, (k, v) in cache_a.items()}  # fmt: skip
    torch.testing.assert_close(both, base(pipe, kv_cache=manual))
    negative = templates(pipe, **CALL, cfg_scale=3.0, template_inputs=[{"scale": 0.7}],
                         negative_template_inputs=[{"scale": 0.5}])  # fmt: skip
    with torch.no_grad():
        cache_n = a(value=torch.tensor(0.5))["kv_cache"]
    torch.testing.assert_close(negative, base(pipe, cfg_scale=3.0, kv_cache=cache_a, negative_kv_cache=cache_n))


def test_a_kv_cache_for_another_model_is_rejected(pipe: Flux2ImagePipeline, runtime: Runtime, tmp_path: Path) -> None:
    templates = templates_of(runtime, kv_template(1, blocks=("single_7",)), root=tmp_path)
    with pytest.raises(CacheFormatError, match="'single_7', which this DiT does not have"):
        templates(pipe, **CALL, template_inputs=[{"scale": 0.5}])


def lora_template(seed: int, alpha: float | None = None) -> ToyLoraTemplate:
    torch.manual_seed(seed)
    return ToyLoraTemplate(LORA_TARGETS, rank=2, alpha=alpha)


def test_lora_template_is_a_per_branch_side_path_never_merged(
    pipe: Flux2ImagePipeline, runtime: Runtime, tmp_path: Path
) -> None:
    a, b = lora_template(1, alpha=1.0), lora_template(2)
    templates = templates_of(runtime, a, b, root=tmp_path)
    weights = {k: v.clone() for k, v in pipe.dit.state_dict().items()}
    with torch.no_grad():
        lora_a = a(strength=torch.tensor(1.5))["lora"]
        lora_b = b(strength=torch.tensor(1.0))["lora"]
    out = templates(pipe, **CALL, template_inputs=[{"strength": 1.5}])
    attach_lora(pipe.dit, lora_a, "reference")
    try:
        expected = base(pipe)
    finally:
        detach_lora(pipe.dit, "reference")
    torch.testing.assert_close(out, expected)
    # two templates: concatenated along rank == both LoRAs applied
    both = templates(pipe, **CALL, template_inputs=[{"strength": 1.5}, {"model_id": 1}])
    attach_lora(pipe.dit, lora_a, "ra")
    attach_lora(pipe.dit, lora_b, "rb")
    try:
        expected_both = base(pipe)
        with_cfg_both_branches = base(pipe, cfg_scale=3.0)
    finally:
        detach_lora(pipe.dit, "ra"), detach_lora(pipe.dit, "rb")
    torch.testing.assert_close(both, expected_both, rtol=1e-4, atol=1e-5)
    # with CFG the positive LoRA stays on the positive branch; the same LoRA on both equals a global one
    positive_only = templates(pipe, **CALL, cfg_scale=3.0, template_inputs=[{"strength": 1.5}, {"model_id": 1}])
    symmetric = templates(pipe, **CALL, cfg_scale=3.0, template_inputs=[{"strength": 1.5}, {"model_id": 1}],
                          negative_template_inputs=[{"strength": 1.5}, {"model_id": 1}])  # fmt: skip
    torch.testing.assert_close(symmetric, with_cfg_both_branches, rtol=1e-4, atol=1e-5)
    assert (positive_only - symmetric).abs().max() > 1e-4
    assert lora_names(pipe.dit) == []
    for key, tensor in pipe.dit.state_dict().items():
        assert torch.equal(tensor, weights[key]), f"{key} was modified"


def test_residual_templates_sum_and_must_match_the_resolution(
    pipe: Flux2ImagePipeline, runtime: Runtime, tmp_path: Path
) -> None:
    torch.manual_seed(5)
    model = ToyResidualTemplate(blocks=("double_0", "single_1"), dim=32, factor=4)
    templates = templates_of(runtime, model, root=tmp_path)
    size = {"height": 32, "width": 32}
    zero = templates(pipe, **CALL, template_inputs=[{"scale": 0.0, **size}])
    torch.testing.assert_close(zero, base(pipe))
    summed = templates(pipe, **CALL, template_inputs=[{"scale": 0.4, **size}, {"scale": 0.8, **size}])
    single = templates(pipe, **CALL, template_inputs=[{"scale": 1.2, **size}])
    torch.testing.assert_close(summed, single, rtol=1e-4, atol=1e-5)
    assert (single - zero).abs().max() > 1e-3
    with pytest.raises(CacheFormatError, match=r"16x16 latent grid, but a 32x32 image has a 8x8 grid"):
        templates(pipe, **CALL, template_inputs=[{"scale": 1.0, "height": 64, "width": 64}])
    with pytest.raises(CacheMergeError, match="different resolutions"):
        templates(pipe, **CALL, template_inputs=[{"scale": 1.0, **size}, {"scale": 1.0, "height": 64, "width": 64}])


def test_the_trainer_path_backpropagates_into_every_medium(pipe: Flux2ImagePipeline) -> None:
    """What a template trainer does: process_inputs (no grad), forward (grad), prepare, one DiT call, backward."""
    torch.manual_seed(0)
    models = [kv_template(1), lora_template(2), ToyResidualTemplate(blocks=("double_1",), dim=32, factor=4)]
    inputs = [{"scale": 0.3}, {"strength": 1.0}, {"scale": 1.0, "height": 32, "width": 32}]
    cache: dict[str, Any] = {}
    for model, template_inputs in zip(models, inputs):
        model.train()
        processed = process_template_inputs(model, template_inputs, pipe=pipe)
        cache.update(forward_template(model, processed, pipe=pipe, use_gradient_checkpointing=True))
    state = pipe.prepare({**CALL, "prompt": [CALL["prompt"]], "negative_prompt": [""], "cfg_scale": 1.0,
                          "single": True, **cache})  # fmt: skip
    timestep = state.shared["timesteps"][0]
    velocity = pipe.predict_velocity(state.view("positive"), 0, timestep)
    velocity.square().mean().backward()
    for model in models:
        grads = [p.grad for p in model.parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in grads), type(model).__name__
    assert all(p.grad is None for p in pipe.dit.parameters())
    assert lora_names(pipe.dit) == []
