"""Low-memory execution of the FLUX.1 pipeline: exactness, stages, budget, fp8, hook, reports, errors.

The models are the tiny perturbed FLUX.1 repository of ``fixtures_pipeline`` (dev DiT, CLIP, sharded T5, VAE,
diffusers folders and the BFL single files) with every file rewritten in bf16, like the official ones: the
all-resident fp32 run upcasts bf16 weights, so a configuration that stores them in bf16 and computes in fp32
loses nothing and must match it bit for bit.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from diffstudio import ModelConfig, Runtime, hookimpl
from diffstudio.builtin.fallbacks import ResidentStrategy
from diffstudio.errors import ConfigError, PipelineInputError
from diffstudio.lora import LoraWeights, attach_lora
from diffstudio.testing import import_file
from diffstudio.vram import LayerwiseStrategy
from diffstudio_flux1.pipeline import FluxImagePipeline
from safetensors import safe_open
from safetensors.torch import load_file, save_file


def _load(name: str) -> ModuleType:
    return import_file(Path(__file__).with_name(f"{name}.py"))


fp = _load("fixtures_pipeline")
F32, BF16, FP8 = torch.float32, torch.bfloat16, torch.float8_e4m3fn
SLOTS = ("text_encoder", "text_encoder_2", "dit", "vae")
ENCODERS = ("text_encoder", "text_encoder_2")


def _to_bf16(root: Path) -> None:
    """Rewrite every safetensors file under ``root`` in bf16, keeping its metadata (BFL and diffusers alike)."""
    for file in sorted(root.rglob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            metadata = handle.metadata()
        tensors = load_file(str(file))
        bf16 = {k: v.to(BF16) if v.is_floating_point() else v for k, v in tensors.items()}
        save_file(bf16, str(file), metadata=metadata)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, helpers: ModuleType) -> Path:
    root: Path = fp.build_repo(tmp_path_factory.mktemp("flux1-vram"), helpers).root
    _to_bf16(root)
    return root


def load(repo: Path, fields: dict[str, Any], limit: float | None = None, **kw: Any) -> FluxImagePipeline:
    paths = ("flux1-dev.safetensors", "text_encoder", "text_encoder_2", "ae.safetensors")
    pipe = FluxImagePipeline.from_pretrained(
        torch_dtype=F32,
        device="cpu",
        model_configs=[ModelConfig(path=str(repo / p), **fields) for p in paths],
        tokenizer_1_config=ModelConfig(path=str(repo / "tokenizer")),
        tokenizer_2_config=ModelConfig(path=str(repo / "tokenizer_2")),
        vram_limit=limit,
        **kw,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe: FluxImagePipeline, **kw: Any) -> torch.Tensor:
    out: torch.Tensor = pipe("a red circle", seed=0, height=32, width=32, num_inference_steps=2,
                             t5_sequence_length=16, output_type="pt", **kw)  # fmt: skip
    return out


def fields(kind: str) -> dict[str, Any]:
    """The benchmark's configurations (``benchmarks/vram.py``): computation cpu / float32 everywhere."""
    compute = {"computation_device": "cpu", "computation_dtype": F32}
    if kind == "cpu_offload":
        return {"offload_device": "cpu", "offload_dtype": BF16, "onload_device": "cpu", "onload_dtype": BF16,
                "preparing_device": "cpu", "preparing_dtype": BF16, **compute}  # fmt: skip
    if kind == "fp8":
        return {"offload_device": "cpu", "offload_dtype": FP8, "onload_device": "cpu", "onload_dtype": FP8,
                "preparing_device": "cpu", "preparing_dtype": FP8, **compute}  # fmt: skip
    if kind == "disk":
        return {"offload_device": "disk", "offload_dtype": "disk", "onload_device": "disk", "onload_dtype": "disk",
                "preparing_device": "cpu", "preparing_dtype": BF16, **compute}  # fmt: skip
    raise ValueError(kind)


def _lora() -> dict[str, LoraWeights]:
    gen = torch.Generator().manual_seed(7)
    hidden = 64  # the tiny DiT: 2 heads of 32 channels (conftest HEADS * HEAD_DIM)
    down, up = torch.randn(4, hidden, generator=gen), torch.randn(3 * hidden, 4, generator=gen) * 0.1
    return {"double_blocks.0.img_attn.qkv": LoraWeights(down, up, alpha=2.0)}


LORA = _lora()


@pytest.fixture(scope="module")
def baseline(repo: Path) -> dict[str, torch.Tensor]:
    pipe = load(repo, {})
    plain = run(pipe)
    attach_lora(pipe.dit, LORA, "style")
    lora = run(pipe)
    assert not torch.equal(plain, lora)  # the LoRA changes the image: the comparisons below can fail
    return {"plain": plain, "lora": lora}


@pytest.mark.parametrize(("kind", "limit"), [("cpu_offload", None), ("cpu_offload", 0.0), ("disk", 0.0)])
def test_lossless_configs_are_bitwise_identical_with_and_without_a_lora(
    repo: Path, baseline: dict[str, torch.Tensor], kind: str, limit: float | None
) -> None:
    pipe = load(repo, fields(kind), limit)
    assert all(isinstance(pipe.loaded[s].strategy, LayerwiseStrategy) for s in SLOTS)
    assert torch.equal(run(pipe), baseline["plain"])
    attach_lora(pipe.dit, LORA, "style")
    assert torch.equal(run(pipe), baseline["lora"]) and torch.equal(run(pipe), baseline["lora"])
    if limit == 0.0:
        reports = pipe.vram_report()
        assert all(reports[s]["resident_units"] == 0 for s in ("dit", *ENCODERS))
        assert all(reports[s]["streamed_units"] > 0 for s in ("dit", *ENCODERS))


def test_fp8_storage_stays_close_to_the_fp32_run(repo: Path, baseline: dict[str, torch.Tensor]) -> None:
    pipe = load(repo, fields("fp8"))
    out = run(pipe)
    cosine = torch.nn.functional.cosine_similarity(out.flatten(), baseline["plain"].flatten(), dim=0)
    assert cosine >= 0.99 and not torch.equal(out, baseline["plain"])
    reports = pipe.vram_report()
    assert all(reports[s]["high_precision_tensors"] > 0 for s in ("dit", *ENCODERS))  # norms, embedders


@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.5])
def test_resident_bytes_never_exceed_vram_limit(repo: Path, baseline: dict[str, torch.Tensor], fraction: float) -> None:
    dit_bytes = (repo / "flux1-dev.safetensors").stat().st_size
    limit = fraction * dit_bytes / 1024**3
    pipe = load(repo, fields("cpu_offload"), limit)
    assert torch.equal(run(pipe), baseline["plain"])
    ledger = pipe.vram_ledger("cpu")
    assert ledger.limit == int(limit * 1024**3)
    reports = pipe.vram_report()
    pinned = sum(reports[s]["pinned_bytes"] for s in SLOTS)  # tensors outside any leaf: always placed
    assert reports["dit"]["pinned_bytes"] == reports["vae"]["pinned_bytes"] == 0
    assert reports["text_encoder_2"]["pinned_bytes"] == 0  # T5's tied embedding (one module, two names) streams
    assert pinned < 1024  # CLIP's int64 position ids only
    assert ledger.peak_resident <= ledger.limit + pinned
    report = reports["dit"]
    if fraction >= 1.5:
        assert report["streamed_units"] == 0
    elif fraction == 0.0:
        assert report["resident_units"] == 0 and ledger.peak_total > 0


def test_stages_text_encoders_leave_before_denoising_and_vae_only_encodes_and_decodes(repo: Path) -> None:
    pipe = load(repo, fields("cpu_offload"))
    strategy = {s: pipe.loaded[s].strategy for s in SLOTS}
    seen: dict[str, list[tuple[bool, ...]]] = {"encoders": [], "dit": [], "vae_encoder": [], "vae_decoder": []}

    def states() -> tuple[bool, ...]:
        return tuple(strategy[s].onloaded for s in SLOTS)

    def record(key: str) -> Any:
        return lambda *_: seen[key].append(states())

    pipe.text_encoder.register_forward_pre_hook(record("encoders"))
    pipe.text_encoder_2.register_forward_pre_hook(record("encoders"))
    pipe.dit.register_forward_pre_hook(record("dit"))
    pipe.vae.encoder.register_forward_pre_hook(record("vae_encoder"))
    pipe.vae.decoder.register_forward_pre_hook(record("vae_decoder"))
    run(pipe, kontext_images=fp.image(32, 32, seed=3))
    #               CLIP   T5     DiT    VAE
    assert seen["encoders"] and all(s[:2] == (True, True) and not s[2] for s in seen["encoders"])
    assert seen["dit"] and all(s == (False, False, True, False) for s in seen["dit"])
    assert seen["vae_encoder"] and all(s == (False, False, False, True) for s in seen["vae_encoder"])
    assert seen["vae_decoder"] == [(False, False, False, True)]
    assert states() == (False,) * 4 and pipe.vram_ledger("cpu").resident_bytes == 0


def test_a_plugin_policy_takes_over_its_model_only(repo: Path) -> None:
    calls: list[str] = []

    class Mine(ResidentStrategy):
        name = "mine"

        def onload(self) -> None:
            calls.append("onload")

        def offload(self) -> None:
            calls.append("offload")

    class Policy:
        @hookimpl
        def vram_policy(self, model: Any, component: str) -> Any:
            return Mine("cpu") if component == "text_encoder_2" else None

    pipe = load(repo, fields("cpu_offload"), runtime=Runtime(plugins=[Policy()]))
    assert pipe.loaded["text_encoder_2"].strategy.name == "mine"  # type: ignore[union-attr]
    assert all(isinstance(pipe.loaded[s].strategy, LayerwiseStrategy) for s in SLOTS if s != "text_encoder_2")
    run(pipe)
    assert "onload" in calls and calls[-1] == "offload"  # the runner drives the plugin's strategy
    assert not any(m._forward_pre_hooks for m in pipe.text_encoder_2.modules())  # the builtin never touched T5
    assert any(m._forward_pre_hooks for m in pipe.text_encoder.modules())


def test_summary_report_and_unmanaged_models(repo: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="diffstudio.vram"):
        pipe = load(repo, fields("disk"), 0.1)
    for slot in SLOTS:
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"vram[{slot}]")]
        assert len(lines) == 1 and "disk (memory-mapped)" in lines[0] and "float32" in lines[0], (slot, lines)
    report = pipe.vram_report()
    assert json.loads(json.dumps(report))["dit"]["offload"].startswith("disk/")
    assert report["dit"]["high_precision_tensors"] > 0 and report["dit"]["offload_bytes"] > 0
    plain = load(repo, {})
    assert all(isinstance(plain.loaded[s].strategy, ResidentStrategy) for s in SLOTS)
    for slot in SLOTS:
        assert not any(m._forward_pre_hooks for m in plain.loaded[slot].module.modules())
    assert plain.vram_report()["dit"]["strategy"] == "resident"


def test_bad_memory_settings_are_typed_errors_naming_the_field(repo: Path) -> None:
    with pytest.raises(PipelineInputError, match="vram_limit"):
        load(repo, {}, -1.0)
    with pytest.raises(ConfigError, match="computation_dtype"):
        load(repo, {"offload_device": "cpu", "computation_dtype": FP8})
    with pytest.raises(ConfigError, match="preparing_device"):
        load(repo, {"offload_device": "cpu", "preparing_device": "disk"})
