"""LoRAFusion: the gate equals DiffSynth's published ``LoraMerger``; on a tiny FLUX.1 DiT with side-path LoRAs it is
the base model when ``w_out = 0`` and the plain LoRA sum when removed (bit for bit); fusing under it is refused."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from diffstudio import ModelConfig
from diffstudio.cli import main as cli
from diffstudio.dit.diffsynth_names import bfl_path, diffsynth_key, official_layers
from diffstudio.errors import MissingPluginError
from diffstudio.lora import LoraMergerActiveError
from diffstudio.nn import delta_linears
from diffstudio.runtime import Runtime
from diffstudio_flux1 import FluxImagePipeline
from diffstudio_flux1.lora import apply_lora, remove_lora
from diffstudio_lora_fusion.model import FluxLoraFusion, LoraFusionMismatchError, LoraMerger, disable_lora_merger
from safetensors.torch import save_file
from torch import Tensor, nn


class OracleLoraMerger(nn.Module):
    """DiffSynth-Studio ``flux_lora_patcher.LoraMerger`` transcribed (stacked outputs, one gate expression)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight_base = nn.Parameter(torch.randn(dim))
        self.weight_lora = nn.Parameter(torch.randn(dim))
        self.weight_cross = nn.Parameter(torch.randn(dim))
        self.weight_out = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.randn(dim))
        self.activation = nn.Sigmoid()
        self.norm_base = nn.LayerNorm(dim, eps=1e-5)
        self.norm_lora = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, base_output: Tensor, lora_outputs: Tensor) -> Tensor:
        norm_base_output = self.norm_base(base_output)
        norm_lora_outputs = self.norm_lora(lora_outputs)
        gate = self.activation(
            norm_base_output * self.weight_base
            + norm_lora_outputs * self.weight_lora
            + norm_base_output * norm_lora_outputs * self.weight_cross
            + self.bias
        )
        return base_output + (self.weight_out * gate * lora_outputs).sum(dim=0)


@torch.no_grad()
def perturbed(module: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        gain = 1.0 if "norm" in name and name.endswith("weight") else 0.0
        p.copy_(gain + 0.7 * torch.randn(p.shape, generator=gen))
    return module


def _dims(dit: nn.Module) -> dict[str, int]:
    return {str(diffsynth_key(p)): layer.out_features for p, layer in delta_linears(dit) if diffsynth_key(p)}


def fusion_for(dit: nn.Module, seed: int = 7) -> FluxLoraFusion:
    return perturbed(FluxLoraFusion(_dims(dit)), seed).eval()  # type: ignore[return-value]


def bfl_lora(dit: nn.Module, seed: int, rank: int = 3) -> dict[str, Tensor]:
    """A LoRA (BFL names, kohya-style down/up with alpha) on every DiT layer LoRAFusion gates."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, Tensor] = {}
    for path, layer in delta_linears(dit):
        if diffsynth_key(path) is None:
            continue
        out[f"{path}.lora_down.weight"] = torch.randn(rank, layer.in_features, generator=gen) / layer.in_features**0.5
        out[f"{path}.lora_up.weight"] = 0.5 * torch.randn(layer.out_features, rank, generator=gen)
        out[f"{path}.alpha"] = torch.tensor(float(rank + 1))
    return out


@pytest.fixture(scope="module")
def dit_file(tmp_path_factory: pytest.TempPathFactory, helpers: ModuleType) -> Path:
    return Path(helpers.save_dit_case(tmp_path_factory.mktemp("fusion-dit"), True, 11).files["bfl"])


@pytest.fixture
def dit(dit_file: Path, helpers: ModuleType) -> Any:
    return helpers.load(dit_file)[0]


def run(dit: Any, helpers: ModuleType) -> Tensor:
    inp = helpers.dit_inputs(batch=1, seed=3)
    with torch.no_grad():
        out: Tensor = dit(**inp)
    return out


def test_the_layer_names_cover_the_304_official_layers_both_ways() -> None:
    names = official_layers()
    assert len(names) == 304 and len({bfl_path(n) for n in names}) == 304
    assert all(diffsynth_key(str(bfl_path(n))) == n for n in names)
    assert bfl_path("blocks___3___norm1_b___linear") == "double_blocks.3.txt_mod.lin"
    assert bfl_path("single_blocks___0___to_qkv_mlp") == "single_blocks.0.linear1"


def test_the_gate_equals_the_published_lora_merger() -> None:
    torch.manual_seed(0)
    oracle = perturbed(OracleLoraMerger(16), 1)
    ours = LoraMerger(16)
    ours.load_state_dict(oracle.state_dict())
    base, loras = torch.randn(2, 5, 16), torch.randn(3, 2, 5, 16)
    with torch.no_grad():
        expected, got = oracle(base, loras), ours(base, list(loras))
    assert (expected - got).abs().max() <= 1e-5
    assert torch.equal(ours(base, []), base)  # no LoRA: the base output itself
    with torch.enable_grad():  # the autograd path (training) and the folded inference path agree
        assert (ours(base, list(loras)) - got).abs().max() <= 1e-5


def test_the_inference_gate_in_row_blocks_equals_one_block(monkeypatch: pytest.MonkeyPatch) -> None:
    """300 token rows: blocks of 128, 128 and 44 give the one-block result bit for bit, and the oracle's."""
    import diffstudio_lora_fusion.model as fusion_model

    torch.manual_seed(1)
    oracle = perturbed(OracleLoraMerger(24), 2)
    ours = LoraMerger(24)
    ours.load_state_dict(oracle.state_dict())
    base, loras = torch.randn(3, 100, 24), torch.randn(2, 3, 100, 24)
    with torch.no_grad():
        blocked = ours(base, list(loras))
        monkeypatch.setattr(fusion_model, "GATE_ROWS", 10_000)
        whole = ours(base, list(loras))
        expected = oracle(base, loras)
    assert fusion_model.GATE_ROWS == 10_000 and blocked.shape == base.shape
    assert torch.equal(blocked, whole)
    assert (blocked - expected).abs().max() <= 1e-5


def test_the_gated_dit_equals_the_dit_with_oracle_gates(dit: Any, helpers: ModuleType) -> None:
    apply_lora(dit, bfl_lora(dit, 1), name="a", scale=0.8)
    apply_lora(dit, bfl_lora(dit, 2), name="b", scale=1.3)
    plain = run(dit, helpers)
    fusion = fusion_for(dit)
    fusion.enable(dit)
    ours = run(dit, helpers)
    for path, layer in delta_linears(dit):  # the same gates, as the published module computes them
        key = diffsynth_key(path)
        if key is None:
            continue
        oracle = OracleLoraMerger(layer.out_features)
        oracle.load_state_dict(fusion.model_dict[key].state_dict())
        layer.set_combiner(lambda base, outs, o=oracle: o(base, torch.stack(outs)))
    expected = run(dit, helpers)
    assert (ours - expected).abs().max() <= 1e-5
    assert (ours - plain).abs().max() > 1e-3  # the gate changes the result


def test_zero_w_out_is_the_base_model_and_no_merger_the_plain_sum_bit_for_bit(dit: Any, helpers: ModuleType) -> None:
    base = run(dit, helpers)
    apply_lora(dit, bfl_lora(dit, 1), name="a")
    apply_lora(dit, bfl_lora(dit, 2), name="b", scale=0.5)
    plain = run(dit, helpers)
    fusion = fusion_for(dit)
    with torch.no_grad():
        for merger in fusion.model_dict.values():
            merger.weight_out.zero_()
    assert fusion.enable(dit) == len(fusion.model_dict)
    assert torch.equal(run(dit, helpers), base)
    fusion.disable(dit)
    assert torch.equal(run(dit, helpers), plain)
    assert not torch.equal(plain, base)


def test_per_lora_scales_multiply_the_lora_output_before_the_gate(dit: Any) -> None:
    path, layer = next((p, m) for p, m in delta_linears(dit) if p == "double_blocks.0.img_attn.qkv")
    lora = bfl_lora(dit, 4)
    apply_lora(dit, lora, name="a", scale=0.25)
    fusion = fusion_for(dit)
    fusion.enable(dit)
    x = torch.randn(2, 5, layer.in_features)
    down, up = lora[f"{path}.lora_down.weight"], lora[f"{path}.lora_up.weight"]
    factor = float(lora[f"{path}.alpha"]) / down.shape[0]
    oracle = OracleLoraMerger(layer.out_features)
    oracle.load_state_dict(fusion.model_dict[str(diffsynth_key(path))].state_dict())
    with torch.no_grad():
        base = torch.nn.functional.linear(x, layer.weight, layer.bias)
        expected = oracle(base, (0.25 * factor * (x @ down.T @ up.T))[None])
        assert (layer(x) - expected).abs().max() <= 1e-5


def test_a_layer_without_lora_returns_the_base_output(dit: Any) -> None:
    layer = dict(delta_linears(dit))["single_blocks.1.linear2"]
    x = torch.randn(1, 3, layer.in_features)
    with torch.no_grad():
        base = layer(x)
        fusion_for(dit).enable(dit)
        assert layer.combiner is not None and torch.equal(layer(x), base)


def test_fusing_a_lora_while_the_merger_is_active_is_a_typed_error(dit: Any) -> None:
    fusion = fusion_for(dit)
    fusion.enable(dit)
    before = {p: layer.weight.clone() for p, layer in delta_linears(dit)}
    with pytest.raises(LoraMergerActiveError, match="fuse=False"):
        apply_lora(dit, bfl_lora(dit, 1), name="fused", fuse=True)
    assert all(torch.equal(before[p], layer.weight) for p, layer in delta_linears(dit))
    fusion.disable(dit)
    apply_lora(dit, bfl_lora(dit, 1), name="fused", fuse=True)
    with pytest.raises(LoraFusionMismatchError, match="fused into the DiT"):
        fusion.enable(dit)
    remove_lora(dit, "fused")
    fusion.enable(dit)


def test_a_merger_for_another_depth_is_a_typed_error(dit: Any) -> None:
    dims = _dims(dit)
    dims["blocks___5___attn___a_to_qkv"] = 192
    with pytest.raises(LoraFusionMismatchError, match="the DiT lacks"):
        FluxLoraFusion(dims).enable(dit)


def _save_merger(dit: nn.Module, path: Path) -> FluxLoraFusion:
    fusion = fusion_for(dit, seed=9)
    save_file({f"{k}": v.contiguous() for k, v in fusion.state_dict().items()}, str(path))
    return fusion


def test_the_merger_file_is_claimed_and_loaded_in_its_slot(dit: Any, helpers: ModuleType, tmp_path: Path) -> None:
    fusion = _save_merger(dit, tmp_path / "model.safetensors")
    loaded, claim = helpers.load(tmp_path / "model.safetensors")
    assert (claim.model_type, claim.component, claim.plugin) == ("flux1-lora-fusion", "lora_merger", "lora_fusion")
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in fusion.state_dict().items())


def test_the_pipeline_enables_the_loaded_merger(repo: Any, tmp_path: Path, helpers: ModuleType) -> None:
    configs = [ModelConfig(path=str(repo.root / n)) for n in ("transformer", "text_encoder", "text_encoder_2", "vae")]
    plain = FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=configs)
    _save_merger(plain.dit, tmp_path / "model.safetensors")
    merger = ModelConfig(path=str(tmp_path / "model.safetensors"))
    pipe = FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=[*configs, merger])
    pipe.set_progress_bar_config(disable=True)
    call = {"prompt": "a cat", "height": 32, "width": 32, "num_inference_steps": 1, "seed": 0, "output_type": "latent"}
    assert not pipe.lora_merger.enabled_on(pipe.dit)
    pipe(**call)
    assert pipe.lora_merger.enabled_on(pipe.dit)  # loading the merger enables it for the next call
    disable_lora_merger(pipe)
    pipe(**call)
    assert not pipe.lora_merger.enabled_on(pipe.dit)  # disabled stays disabled
    assert pipe.enable_lora_merger() == len(pipe.lora_merger.model_dict)  # the seed's call
    assert pipe.lora_merger.enabled_on(pipe.dit)
    blocked = FluxImagePipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu", model_configs=configs,
        runtime=Runtime(env={"DIFFSTUDIO_DISABLED_PLUGINS": "lora_fusion"}),
    )  # fmt: skip
    with pytest.raises(MissingPluginError, match="diffstudio-lora-fusion"):
        blocked.enable_lora_merger()


def test_the_plugin_is_listed(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["plugins", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    row = next(r for r in (rows if isinstance(rows, list) else rows["plugins"]) if r["name"] == "lora_fusion")
    assert "diffstudio-lora-fusion" in json.dumps(row) and "load_model" in json.dumps(row)
