"""The LoRA encoder equals DiffSynth's published module (transcribed below) on small random sizes; a LoRA gives the
same token in kohya, PEFT and ComfyUI layouts; missing layers and FLUX.2 LoRAs are typed errors; the pipeline
appends the tokens to the positive prompt only."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from diffstudio import ModelConfig
from diffstudio.cli import main as cli
from diffstudio.dit.diffsynth_names import bfl_path
from diffstudio.errors import ConfigError, MissingPluginError, PipelineInputError
from diffstudio.identify import identify
from diffstudio.lora import LoraWeights
from diffstudio.runtime import Runtime
from diffstudio.types import LoadRequest
from diffstudio_flux1 import FluxImagePipeline
from diffstudio_lora_encoder.inputs import LoraEncoderInputError, LoraEncoderMissingLayersError
from diffstudio_lora_encoder.model import FluxLoraEncoder, LoraEncoderParams
from diffstudio_lora_encoder.units import encode_loras
from safetensors.torch import save_file
from torch import Tensor, nn

D, HEADS, L, MLP = 24, 3, 4, 40  # the tiny FLUX.1 kit's T5 width is 24
HIDDEN = 64  # the kit's DiT: 2 heads of 32, 2 double + 2 single blocks, MLP ratio 4
DOUBLE = {"attn.a_to_qkv": (64, 192), "attn.a_to_out": (64, 64), "ff_a.0": (64, 256), "ff_a.2": (256, 64),
          "norm1_a.linear": (64, 384), "attn.b_to_qkv": (64, 192), "attn.b_to_out": (64, 64), "ff_b.0": (64, 256),
          "ff_b.2": (256, 64), "norm1_b.linear": (64, 384)}  # fmt: skip
SINGLE = {"to_qkv_mlp": (64, 448), "proj_out": (320, 64), "norm.linear": (64, 192)}


# --- the published module definitions (DiffSynth-Studio flux_lora_encoder.py / sd_text_encoder.py), transcribed ---


class OracleLoRALayerBlock(nn.Module):
    def __init__(self, length: int, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.x = nn.Parameter(torch.randn(1, length, dim_in))
        self.layer_norm = nn.LayerNorm(dim_out)

    def forward(self, lora_a: Tensor, lora_b: Tensor) -> Tensor:
        return self.layer_norm(self.x @ lora_a.T @ lora_b.T)


class OracleLoRAEmbedder(nn.Module):
    def __init__(self, lora_patterns: list[dict[str, Any]], length: int, out_dim: int) -> None:
        super().__init__()
        self.model_dict = nn.ModuleDict({p["name"].replace(".", "___"): OracleLoRALayerBlock(length, *p["dim"])
                                         for p in lora_patterns})  # fmt: skip
        proj: dict[str, nn.Module] = {}
        for p in lora_patterns:
            if p["type"] not in proj:
                proj[p["type"].replace(".", "___")] = nn.Linear(p["dim"][1], out_dim)
        self.proj_dict = nn.ModuleDict(proj)
        self.lora_patterns = lora_patterns

    def forward(self, lora: dict[str, Tensor]) -> Tensor:
        out = []
        for p in self.lora_patterns:
            name, layer_type = p["name"], p["type"]
            emb = self.model_dict[name.replace(".", "___")](lora[name + ".lora_A.default.weight"],
                                                             lora[name + ".lora_B.default.weight"])  # fmt: skip
            out.append(self.proj_dict[layer_type.replace(".", "___")](emb))
        return torch.concat(out, dim=1)


class OracleAttention(nn.Module):
    def __init__(self, q_dim: int, num_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        inner = num_heads * head_dim
        self.to_q, self.to_k, self.to_v = nn.Linear(q_dim, inner), nn.Linear(q_dim, inner), nn.Linear(q_dim, inner)
        self.to_out = nn.Linear(inner, q_dim)

    def forward(self, hidden_states: Tensor) -> Tensor:
        b = hidden_states.shape[0]
        q, k, v = (f(hidden_states).view(b, -1, self.num_heads, self.head_dim).transpose(1, 2)
                   for f in (self.to_q, self.to_k, self.to_v))  # fmt: skip
        h = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.to_out(h.transpose(1, 2).reshape(b, -1, self.num_heads * self.head_dim))


class OracleCLIPEncoderLayer(nn.Module):
    def __init__(self, embed_dim: int, intermediate_size: int, num_heads: int, head_dim: int) -> None:
        super().__init__()
        self.attn = OracleAttention(embed_dim, num_heads, head_dim)
        self.layer_norm1, self.layer_norm2 = nn.LayerNorm(embed_dim), nn.LayerNorm(embed_dim)
        self.fc1, self.fc2 = nn.Linear(embed_dim, intermediate_size), nn.Linear(intermediate_size, embed_dim)

    def forward(self, hidden_states: Tensor) -> Tensor:
        residual = hidden_states
        hidden_states = residual + self.attn(self.layer_norm1(hidden_states))
        residual = hidden_states
        hidden_states = self.fc1(self.layer_norm2(hidden_states))
        hidden_states = hidden_states * torch.sigmoid(1.702 * hidden_states)
        return residual + self.fc2(hidden_states)


class OracleFluxLoRAEncoder(nn.Module):
    def __init__(self, patterns: list[dict[str, Any]]) -> None:
        super().__init__()
        self.embedder = OracleLoRAEmbedder(patterns, L, D)
        self.encoders = nn.ModuleList([OracleCLIPEncoderLayer(D, MLP, HEADS, D // HEADS)])
        self.special_embeds = nn.Parameter(torch.randn(1, 1, D))
        self.final_layer_norm = nn.LayerNorm(D)
        self.final_linear = nn.Linear(D, D)

    def forward(self, lora: dict[str, Tensor]) -> Tensor:
        embeds = torch.concat([self.special_embeds, self.embedder(lora)], dim=1)
        for encoder in self.encoders:
            embeds = encoder(embeds)
        return self.final_linear(self.final_layer_norm(embeds[:, :1]))


def patterns() -> list[dict[str, Any]]:
    out = [{"name": f"blocks.{i}.{s}", "dim": d, "type": s} for i in range(2) for s, d in DOUBLE.items()]
    return out + [{"name": f"single_blocks.{i}.{s}", "dim": d, "type": s} for i in range(2) for s, d in SINGLE.items()]


# --- helpers --------------------------------------------------------------------------------------------------------


@torch.no_grad()
def oracle_model(seed: int = 0) -> OracleFluxLoRAEncoder:
    torch.manual_seed(seed)
    model = OracleFluxLoRAEncoder(patterns())
    gen = torch.Generator().manual_seed(seed + 1)
    for name, p in model.named_parameters():  # perturbed: norm gains away from 1, biases away from 0
        base = 1.0 if ("norm" in name and name.endswith("weight")) else 0.0
        p.copy_(base + 0.5 * torch.randn(p.shape, generator=gen) / (p.shape[-1] ** 0.5 if p.ndim > 1 else 1))
    return model.eval()


def ours_from(oracle: nn.Module, tmp_path: Path) -> FluxLoraEncoder:
    """Save the oracle's state dict as the published file and load it through the plugin's claim."""
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in oracle.state_dict().items()}, str(path))
    config = ModelConfig(path=str(path), config={"num_attention_heads": HEADS})
    checkpoint, claim = identify(Runtime(), config)
    assert (claim.model_type, claim.component, claim.plugin) == ("flux1-lora-encoder", "lora_encoder", "lora_encoder")
    with checkpoint:
        model: FluxLoraEncoder = claim.load(checkpoint, LoadRequest(config, torch.float32, "cpu"))
    return model


def canonical(seed: int, rank: int = 3, alpha: float | None = 1.5, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """A canonical FLUX.1 LoRA (BFL paths) on all 26 layers of the kit's DiT (minus ``skip`` suffixes)."""
    gen = torch.Generator().manual_seed(seed)
    lora = {}
    for p in patterns():
        key = p["name"].replace(".", "___")
        path = str(bfl_path(key))
        if path.endswith(skip):
            continue
        d_in, d_out = p["dim"]
        lora[path] = LoraWeights(torch.randn(rank, d_in, generator=gen) / d_in**0.5,
                                 torch.randn(d_out, rank, generator=gen), alpha)  # fmt: skip
    return lora


def diffsynth_input(lora: dict[str, LoraWeights]) -> dict[str, Tensor]:
    """What DiffSynth's loader hands its encoder: DiffSynth names, ``sqrt(alpha / rank)`` folded into A and B."""
    out = {}
    for p in patterns():
        w = lora[str(bfl_path(p["name"].replace(".", "___")))]
        s = math.sqrt(w.factor)
        out[p["name"] + ".lora_A.default.weight"], out[p["name"] + ".lora_B.default.weight"] = w.down * s, w.up * s
    return out


def write(runtime: Runtime, lora: dict[str, LoraWeights], layout: str, path: Path, prefix: str = "") -> Path:
    fmt = {f.name: f for f in runtime.hooks.lora_formats()}[f"flux1/{layout}"]
    tensors, metadata = fmt.from_canonical(lora)
    save_file({prefix + k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata or None)
    return path


# --- tests ----------------------------------------------------------------------------------------------------------


def test_the_encoder_equals_the_published_module(tmp_path: Path) -> None:
    oracle = oracle_model()
    ours = ours_from(oracle, tmp_path)
    assert ours.params == LoraEncoderParams(ours.params.layers, D, L, 1, 1, MLP, HEADS)
    assert [s.key for s in ours.layers] == [p["name"].replace(".", "___") for p in patterns()]
    lora = canonical(1)
    with torch.no_grad():
        expected = oracle(diffsynth_input(lora))
        got = encode_loras(ours, Runtime(), [{f"{k}.lora_down.weight": w.down for k, w in lora.items()}
                                             | {f"{k}.lora_up.weight": w.up for k, w in lora.items()}
                                             | {f"{k}.alpha": torch.tensor(w.alpha) for k, w in lora.items()}])
    assert got.shape == (1, 1, D) and (got - expected).abs().max() <= 1e-5


def test_one_lora_gives_identical_tokens_in_kohya_peft_and_comfyui_layouts(tmp_path: Path) -> None:
    runtime = Runtime()
    ours = ours_from(oracle_model(), tmp_path)
    lora = canonical(2, alpha=1.5)  # alpha / rank = 0.5: folding it into PEFT's up is exact
    files = [write(runtime, lora, "kohya", tmp_path / "kohya.safetensors"),
             write(runtime, lora, "diffusers", tmp_path / "peft.safetensors"),
             write(runtime, lora, "bfl", tmp_path / "comfy.safetensors", prefix="model.")]  # fmt: skip
    assert any("to_q" in k for k in json.loads(Path(files[1]).read_bytes()[8:].split(b"}}", 1)[0] + b"}}"))
    with torch.no_grad():
        tokens = [encode_loras(ours, runtime, f) for f in files]
        both = encode_loras(ours, runtime, files[:2], scale=0.5)
    assert torch.equal(tokens[0], tokens[1]) and torch.equal(tokens[0], tokens[2])
    assert both.shape == (1, 2, D) and torch.equal(both[:, :1], 0.5 * tokens[0])


def test_missing_layers_are_a_typed_error_unless_zero_filled(tmp_path: Path) -> None:
    runtime = Runtime()
    oracle = oracle_model()
    ours = ours_from(oracle, tmp_path)
    lora = canonical(3, skip=("mod.lin", "modulation.lin"))  # an attention/MLP-only LoRA
    path = write(runtime, lora, "kohya", tmp_path / "partial.safetensors")
    with pytest.raises(LoraEncoderMissingLayersError, match=r"lacks 6 of the 26 layers.*double_blocks.0.img_mod.lin"):
        encode_loras(ours, runtime, path)
    zero = {p: lora.get(p, LoraWeights(torch.zeros(1, w.down.shape[1]), torch.zeros(w.up.shape[0], 1)))
            for p, w in canonical(3).items()}  # fmt: skip
    with torch.no_grad():
        got = encode_loras(ours, runtime, path, missing="zero")
        expected = oracle(diffsynth_input(zero))  # LN(0) = the LayerNorm bias: zero layers still add tokens
    assert (got - expected).abs().max() <= 1e-5
    with pytest.raises(PipelineInputError, match="lora_encoder_missing='skip'"):
        encode_loras(ours, runtime, path, missing="skip")


def test_a_flux2_lora_is_a_typed_error_naming_the_argument(tmp_path: Path) -> None:
    runtime = Runtime()
    ours = ours_from(oracle_model(), tmp_path)
    lora = canonical(4)
    tagged = write(runtime, lora, "kohya", tmp_path / "tagged.safetensors")
    tensors = dict(__import__("safetensors.torch", fromlist=["load_file"]).load_file(str(tagged)))
    save_file(tensors, str(tmp_path / "klein.safetensors"), metadata={"modelspec.architecture": "flux-2-klein-4b/lora"})
    with pytest.raises(LoraEncoderInputError, match=r"lora_encoder_inputs\[1\].*flux2"):
        encode_loras(ours, runtime, [tagged, tmp_path / "klein.safetensors"])
    flux2_names = {"double_stream_modulation_img.lin.lora_A.weight": torch.zeros(2, 64),
                   "double_stream_modulation_img.lin.lora_B.weight": torch.zeros(384, 2)}  # fmt: skip
    with pytest.raises(LoraEncoderInputError, match=r"lora_encoder_inputs\[0\].*FLUX.2 layers"):
        encode_loras(ours, runtime, {**tensors, **flux2_names})
    up = "img_mlp_0.lora_up.weight"
    wide = {k: (torch.zeros(512, v.shape[1]) if k.endswith(up) else v) for k, v in tensors.items()}
    with pytest.raises(LoraEncoderInputError, match=r"lora_encoder_inputs\[0\].*img_mlp.0.*another model"):
        encode_loras(ours, runtime, wide)


def test_the_head_count_must_divide_the_width(tmp_path: Path) -> None:
    oracle = oracle_model()
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in oracle.state_dict().items()}, str(path))
    config = ModelConfig(path=str(path), config={"num_attention_heads": 5})
    checkpoint, claim = identify(Runtime(), config)
    with checkpoint, pytest.raises(ConfigError, match="num_attention_heads=5"):
        claim.load(checkpoint, LoadRequest(config, torch.float32, "cpu"))


def _pipe(repo: Any, extra: list[ModelConfig], runtime: Runtime | None = None) -> FluxImagePipeline:
    configs = [ModelConfig(path=str(repo.root / n)) for n in ("transformer", "text_encoder", "text_encoder_2", "vae")]
    pipe = FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=configs + extra,
                                             runtime=runtime or Runtime())  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_pipeline_appends_one_token_per_lora_to_the_positive_prompt_only(repo: Any, tmp_path: Path) -> None:
    oracle = oracle_model()
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in oracle.state_dict().items()}, str(path))
    pipe = _pipe(repo, [ModelConfig(path=str(path), config={"num_attention_heads": HEADS})])
    lora = write(Runtime(), canonical(5), "kohya", tmp_path / "style.safetensors")
    call = {"prompt": "a cat", "negative_prompt": "blurry", "cfg_scale": 2.0, "height": 32, "width": 32,
            "num_inference_steps": 2, "seed": 0, "output_type": "latent", "t5_sequence_length": 16}  # fmt: skip
    with torch.no_grad():
        tokens = encode_loras(pipe.lora_encoder, pipe.runtime, lora, scale=0.7)
    got = pipe(**call, lora_encoder_inputs=[lora], lora_encoder_scale=0.7)
    expected = pipe(**call, extra_text_embedding=tokens)  # positive branch only (the negative reads its own key)
    assert torch.equal(got, expected)
    assert not torch.equal(got, pipe(**call))
    with pytest.raises(PipelineInputError, match="lora_encoder_scale='x'"):
        pipe(**call, lora_encoder_inputs=lora, lora_encoder_scale="x")


def test_seed_arguments_without_the_plugin_or_the_model_are_typed_errors(repo: Any, tmp_path: Path) -> None:
    lora = write(Runtime(), canonical(6), "kohya", tmp_path / "style.safetensors")
    call = {"prompt": "a cat", "height": 32, "width": 32, "num_inference_steps": 1, "output_type": "latent"}
    with pytest.raises(PipelineInputError, match="no LoRA encoder is loaded"):
        _pipe(repo, [])(**call, lora_encoder_inputs=lora)
    blocked = _pipe(repo, [], Runtime(env={"DIFFSTUDIO_DISABLED_PLUGINS": "lora_encoder"}))
    with pytest.raises(MissingPluginError, match="diffstudio-lora-encoder"):
        blocked(**call, lora_encoder_inputs=lora, lora_encoder_scale=0.5)


def test_the_plugin_is_listed(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["plugins", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    row = next(r for r in (rows if isinstance(rows, list) else rows["plugins"]) if r["name"] == "lora_encoder")
    assert "diffstudio-lora-encoder" in json.dumps(row) and "load_model" in json.dumps(row)
