"""Step1X-Edit: connector vs the published module, the reference-token DiT step, claims, the pipeline, errors."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from diffstudio import ModelConfig, Runtime
from diffstudio.errors import MissingPluginError, PipelineInputError
from diffstudio.identify import identify
from diffstudio_step1x.connector import ConnectorParams, Qwen2Connector
from diffstudio_step1x.prompt import split_string
from PIL import Image
from torch import nn

# --- oracle: Step1X-Edit's modules/connector_edit.py (HunyuanVideo's token refiner), transcribed --------------------


def _oracle_timestep_embedding(t: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half).to(t.device)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class OracleBlock(nn.Module):
    def __init__(self, hidden_size: int, heads_num: int, mlp_width_ratio: float = 4.0) -> None:
        super().__init__()
        self.heads_num = heads_num
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=True, eps=1e-6)
        self.self_attn_qkv = nn.Linear(hidden_size, hidden_size * 3, bias=True)
        self.self_attn_proj = nn.Linear(hidden_size, hidden_size, bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=True, eps=1e-6)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(hidden_size, int(hidden_size * mlp_width_ratio))
        self.mlp.fc2 = nn.Linear(int(hidden_size * mlp_width_ratio), hidden_size)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        gate_msa, gate_mlp = self.adaLN_modulation(c).chunk(2, dim=1)
        norm_x = self.norm1(x)
        qkv = self.self_attn_qkv(norm_x)
        b, l, _ = qkv.shape
        q, k, v = qkv.view(b, l, 3, self.heads_num, -1).permute(2, 0, 1, 3, 4)  # K B L H D
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # attention(mode="torch") works in B H L D
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask).transpose(1, 2).reshape(b, l, -1)
        x = x + self.self_attn_proj(attn) * gate_msa.unsqueeze(1)
        return x + self.mlp.fc2(F.silu(self.mlp.fc1(self.norm2(x)))) * gate_mlp.unsqueeze(1)


class OracleConnector(nn.Module):
    def __init__(self, in_channels: int, hidden_size: int, heads_num: int, depth: int, t_scale: float) -> None:
        super().__init__()
        self.t_scale = t_scale  # 1 at release; SX 055f808 adds `t = t * 1000  # fix the times embedding bug`
        self.S = nn.Module()
        self.S.input_embedder = nn.Linear(in_channels, hidden_size, bias=True)
        self.S.t_embedder = nn.Module()
        width = hidden_size
        self.S.t_embedder.mlp = nn.Sequential(nn.Linear(256, width), nn.SiLU(), nn.Linear(width, width))
        self.S.c_embedder = nn.Module()
        self.S.c_embedder.linear_1 = nn.Linear(in_channels, hidden_size)
        self.S.c_embedder.linear_2 = nn.Linear(hidden_size, hidden_size)
        self.S.individual_token_refiner = nn.Module()
        blocks = [OracleBlock(hidden_size, heads_num) for _ in range(depth)]
        self.S.individual_token_refiner.blocks = nn.ModuleList(blocks)
        self.global_proj_out = nn.Linear(in_channels, POOLED)
        self.scale_factor = nn.Parameter(torch.zeros(1))

    def refiner(self, x: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        s = self.S
        timestep_aware = s.t_embedder.mlp(_oracle_timestep_embedding(t, 256))
        mask_float = mask.float().unsqueeze(-1)
        context_aware = (x * mask_float).sum(dim=1) / mask_float.sum(dim=1)
        context_aware = s.c_embedder.linear_2(F.silu(s.c_embedder.linear_1(context_aware)))
        c = timestep_aware + context_aware
        x = s.input_embedder(x)
        batch_size, seq_len = mask.shape
        self_attn_mask_1 = mask.view(batch_size, 1, 1, seq_len).repeat(1, 1, seq_len, 1)
        self_attn_mask_2 = self_attn_mask_1.transpose(2, 3)
        self_attn_mask = (self_attn_mask_1 & self_attn_mask_2).bool()
        self_attn_mask[:, :, :, 0] = True
        for block in s.individual_token_refiner.blocks:
            x = block(x, c, self_attn_mask)
        return x

    def forward(self, x: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = t * self.t_scale
        mask_float = mask.unsqueeze(-1)
        x_mean = (x * mask_float).sum(dim=1) / mask_float.sum(dim=1) * (1 + self.scale_factor)
        global_out = self.global_proj_out(x_mean)
        return self.refiner(x, t, mask), global_out


POOLED = 20


@pytest.mark.parametrize("t_scale", [1.0, 1000.0])
def test_connector_equals_the_published_module(t_scale: float) -> None:
    from step1x_kit import perturb

    ours = Qwen2Connector(ConnectorParams(32, 64, 2, 2, 4.0, POOLED, t_scale)).eval()
    perturb(ours, 7)
    oracle = OracleConnector(32, 64, 2, 2, t_scale).eval()
    assert set(oracle.state_dict()) == set(ours.state_dict())
    oracle.load_state_dict(ours.state_dict())
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 12, 32, generator=gen)
    mask = torch.zeros(2, 12, dtype=torch.long)
    mask[0, :12], mask[1, :5] = 1, 1
    t = torch.tensor([0.93, 0.25])
    with torch.no_grad():
        got, want = ours(x, t, mask), oracle(x, t, mask)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert got[0].shape == (2, 12, 64) and got[1].shape == (2, POOLED)


@pytest.fixture(scope="module")
def pipe(step1x_repo: dict[str, Any]) -> Any:
    """One pipeline over the kit's files for the DiT-step and end-to-end tests."""
    from step1x_kit import load_pipeline

    return load_pipeline(step1x_repo)


def test_dit_step_with_reference_tokens_equals_direct_call_with_concatenated_tokens(
    step1x_repo: dict[str, Any], pipe: Any
) -> None:
    from diffstudio_flux1.math import image_ids

    assert pipe.has("connector") and pipe.connector is pipe.dit.connector
    gen = torch.Generator().manual_seed(3)
    latents, ref = torch.randn(1, 12, 64, generator=gen), torch.randn(1, 12, 64, generator=gen)
    ids = image_ids(1, 3, 4)
    llm, mask = torch.randn(1, 9, 32, generator=gen), torch.tensor([[1] * 6 + [0] * 3])
    # no call hook given: predict_velocity installs the connector's over the branch's step1x_mask
    inputs = {"latents": latents, "image_ids": ids, "prompt_emb": llm, "text_ids": torch.zeros(1, 9, 3),
              "pooled_prompt_emb": torch.zeros(1, POOLED), "extra_img": ref, "extra_img_ids": ids,
              "step1x_mask": mask}  # fmt: skip
    t = torch.tensor(0.6)
    with torch.no_grad():
        got = pipe.predict_velocity(inputs, 0, t * 1000)
        txt, y = step1x_repo["dit"].connector(llm, t[None], mask)
        direct = step1x_repo["dit"](torch.cat([latents, ref], 1), torch.cat([ids, ids], 1), txt, torch.zeros(1, 9, 3),
                                    t[None], y)[:, :12]  # fmt: skip
    torch.testing.assert_close(got, direct, atol=1e-5, rtol=0)
    assert not pipe.dit.guidance_embed


def test_flux1_refuses_the_combined_file_and_step1x_claims_it(step1x_repo: dict[str, Any]) -> None:
    from diffstudio.loading import Checkpoint
    from diffstudio_flux1.loaders import claim as flux1_claim

    path = step1x_repo["root"] / "step1x-edit-i1258.safetensors"
    with Checkpoint.open(path) as checkpoint:
        assert flux1_claim(checkpoint) is None
    checkpoint, claim = identify(Runtime(), ModelConfig(path=str(path)))
    with checkpoint:
        assert (claim.family, claim.model_type, claim.component) == ("step1x", "step1x-dit/edit", "dit")


def test_pipeline_edits_end_to_end_with_cfg(step1x_repo: dict[str, Any], pipe: Any) -> None:
    pipe.prompt_drop_tokens = 3  # the tiny tokenizer's prefix is shorter than the 7B template's 217 tokens
    from diffstudio_qwen_vl import load_processor

    pipe.processor = load_processor(step1x_repo["root"] / "qwen", min_pixels=4 * 28 * 28, max_pixels=8 * 28 * 28)
    reference = Image.new("RGB", (48, 32), (200, 40, 40))
    out = pipe('make the sign say "OK"', step1x_reference_image=reference, num_inference_steps=2, seed=0,
               output_type="pt")  # fmt: skip
    assert out.shape[-2:] == (32, 48) and torch.isfinite(out).all()
    with pytest.raises(PipelineInputError, match="step1x_reference_image"):
        pipe("edit", num_inference_steps=1)


def test_split_string_tokenizes_quoted_text_per_character_after_the_prefix() -> None:
    head = "x" * 160
    assert split_string(head + 'say "Hi A"!') == [head + 'say "', "\u201cH\u201d", "\u201ci\u201d", "\u201c \u201d",
                                                  "\u201cA\u201d", '"!']  # fmt: skip
    assert split_string('short "kept"') == ['short "kept"']


def test_step1x_argument_on_flux1_is_a_typed_error_with_and_without_the_plugin() -> None:
    from diffstudio_flux1 import FluxImagePipeline

    bare = FluxImagePipeline(runtime=Runtime(env={"DIFFSTUDIO_DISABLED_PLUGINS": "step1x"}))
    with pytest.raises(MissingPluginError, match="diffstudio-step1x"):
        bare.check_inputs({"step1x_reference_image": Image.new("RGB", (16, 16))})
    names = {p.name for p in Runtime().hooks.pipelines()}
    assert "step1x" in names
