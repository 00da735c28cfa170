"""The decoder heads against oracles transcribed from DiffSynth-Studio's ``nexus_gen_projector.py`` and pipeline."""

from __future__ import annotations

import math
from types import ModuleType

import pytest
import torch
from diffstudio_nexus_gen.heads import EditingHead, GenerationHead, MergerParams, editing_text_ids
from torch import nn

TOL = 1e-5

# --- oracle: DiffSynth-Studio NexusGenAdapter / NexusGenImageEmbeddingMerger / get_editing_text_ids, transcribed ------


def oracle_adapter(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    out_dim, in_dim = state["adapter.0.weight"].shape
    adapter = nn.Sequential(
        nn.Linear(in_dim, out_dim), nn.LayerNorm(out_dim), nn.ReLU(), nn.Linear(out_dim, out_dim), nn.LayerNorm(out_dim)
    )
    adapter.load_state_dict({k.removeprefix("adapter."): v for k, v in state.items()})
    return adapter(x)


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    return torch.cat((-x[..., x.shape[-1] // 2 :], x[..., : x.shape[-1] // 2]), dim=-1)


def oracle_positions(grid: torch.Tensor, batch: int) -> torch.Tensor:
    """``get_position_ids``: merged grid, (h, w) scaled by 72 / grid side, t = t * tokens_per_second."""
    t, h, w = grid[0][0], grid[0][1], grid[0][2]
    gt, gh, gw = t.item(), h.item() // 2, w.item() // 2
    scale_h, scale_w = 72 / h.item(), 72 / w.item()
    t_index = (torch.arange(gt).view(-1, 1).expand(-1, gh * gw) * 2).long().flatten()
    h_index = torch.arange(gh).view(1, -1, 1).expand(gt, -1, gw).flatten() * scale_h
    w_index = torch.arange(gw).view(1, 1, -1).expand(gt, gh, -1).flatten() * scale_w
    return torch.stack([t_index, h_index, w_index]).unsqueeze(0).repeat(batch, 1, 1).permute(1, 0, 2)


def oracle_merger(state: dict[str, torch.Tensor], p: MergerParams, embeds: torch.Tensor, grid: torch.Tensor,
                  ref: torch.Tensor, ref_grid: torch.Tensor) -> torch.Tensor:  # fmt: skip
    s = {k.removeprefix("embedding_merger."): v for k, v in state.items()}
    positions = torch.cat((oracle_positions(grid, 1), oracle_positions(ref_grid, 1)), dim=-1)
    x = torch.cat((embeds, ref), dim=1)
    dim = p.hidden // p.heads
    inv_freq = 1.0 / (p.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    inv = inv_freq[None, None, :, None].float().expand(3, positions.shape[1], -1, 1)
    freqs = (inv @ positions[:, :, None, :].float()).transpose(2, 3)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    section = list(p.mrope_section) * 2
    cos = torch.cat([m[i % 3] for i, m in enumerate(cos.split(section, dim=-1))], dim=-1).unsqueeze(1)
    sin = torch.cat([m[i % 3] for i, m in enumerate(sin.split(section, dim=-1))], dim=-1).unsqueeze(1)
    for i in range(p.layers):
        pre = f"layers.{i}."
        residual = x
        h = _rms(x, s[pre + "input_layernorm.weight"])
        b, n, _ = h.shape
        q = (
            (h @ s[pre + "self_attn.q_proj.weight"].T + s[pre + "self_attn.q_proj.bias"])
            .view(b, n, -1, dim)
            .transpose(1, 2)
        )
        k = (
            (h @ s[pre + "self_attn.k_proj.weight"].T + s[pre + "self_attn.k_proj.bias"])
            .view(b, n, -1, dim)
            .transpose(1, 2)
        )
        v = (
            (h @ s[pre + "self_attn.v_proj.weight"].T + s[pre + "self_attn.v_proj.bias"])
            .view(b, n, -1, dim)
            .transpose(1, 2)
        )
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        rep = p.heads // p.kv_heads
        k = k[:, :, None].expand(b, p.kv_heads, rep, n, dim).reshape(b, p.heads, n, dim)
        v = v[:, :, None].expand(b, p.kv_heads, rep, n, dim).reshape(b, p.heads, n, dim)
        weights = torch.softmax(q @ k.transpose(2, 3) / math.sqrt(dim), dim=-1, dtype=torch.float32).to(q.dtype)
        attn = (weights @ v).transpose(1, 2).reshape(b, n, -1) @ s[pre + "self_attn.o_proj.weight"].T
        x = residual + attn
        h = _rms(x, s[pre + "post_attention_layernorm.weight"])
        gate = torch.nn.functional.silu(h @ s[pre + "mlp.gate_proj.weight"].T) * (h @ s[pre + "mlp.up_proj.weight"].T)
        x = x + gate @ s[pre + "mlp.down_proj.weight"].T
    h = _rms(x, s["projector.0.weight"])
    h = h @ s["projector.1.weight"].T + s["projector.1.bias"]
    h = torch.nn.functional.silu(_rms(h, s["projector.2.weight"]))
    h = h @ s["projector.4.weight"].T + s["projector.4.bias"]
    return _rms(h, s["projector.5.weight"])


def oracle_text_ids(latents: torch.Tensor, th: int, tw: int, rh: int, rw: int) -> torch.Tensor:
    """``FluxImageUnit_NexusGen.get_editing_text_ids`` on DiffSynth's (B, 16, H/8, W/8) latents."""

    def grid_ids(height: int, width: int, t: float) -> torch.Tensor:
        ids = torch.zeros(height // 2, width // 2, 3)
        sh, sw = latents.shape[-2] / height, latents.shape[-1] / width
        ids[..., 0] = ids[..., 0] + t
        ids[..., 1] = ids[..., 1] + torch.arange(height // 2)[:, None] * sh
        ids[..., 2] = ids[..., 2] + torch.arange(width // 2)[None, :] * sw
        return ids[None].repeat(latents.shape[0], 1, 1, 1).reshape(latents.shape[0], height // 2 * width // 2, 3)

    return torch.cat([grid_ids(th, tw, 0.0), grid_ids(rh, rw, 1.0)], dim=1)


# ----------------------------------------------------------------------------------------------------------------------


def test_generation_adapter_equals_the_published_module(ng: ModuleType) -> None:
    state = ng.adapter_state(seed=3)
    head = GenerationHead.from_shapes({k: tuple(v.shape) for k, v in state.items()})
    head.load_state_dict(state)
    x = torch.randn(2, 81, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(head(x), oracle_adapter(state, x), atol=TOL, rtol=0)
    assert head(x).shape == (2, 81, 24)


def test_editing_merger_equals_the_published_module_over_target_and_reference(ng: ModuleType) -> None:
    state = ng.merger_state(seed=5)
    params = MergerParams.from_shapes(
        {k.removeprefix("embedding_merger."): tuple(v.shape) for k, v in state.items()}, **dict(ng.MERGER_CONFIG)
    )
    assert params == ng.merger_params()
    head = EditingHead(params)
    head.load_state_dict(state)
    gen = torch.Generator().manual_seed(1)
    target, ref = torch.randn(1, 81, 32, generator=gen), torch.randn(1, 12, 32, generator=gen)
    grid, ref_grid = torch.tensor([[1, 18, 18]]), torch.tensor([[1, 6, 8]])
    with torch.no_grad():
        got = head(target, grid[0].tolist(), ref, ref_grid[0].tolist())
        want = oracle_merger(state, params, target, grid, ref, ref_grid)
    assert got.shape == (1, 93, 24)
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)


def test_merger_heads_come_from_config_when_the_weights_cannot_tell(ng: ModuleType) -> None:
    state = ng.merger_state(seed=5)
    shapes = {k.removeprefix("embedding_merger."): tuple(v.shape) for k, v in state.items()}
    assert MergerParams.from_shapes(shapes, head_dim=16).heads == 2
    from diffstudio.errors import ConfigError

    with pytest.raises(ConfigError, match="heads"):
        MergerParams.from_shapes(shapes, heads=5)


@pytest.mark.parametrize("size", [(512, 512), (512, 768)])
def test_editing_text_ids_equal_diffsynths(size: tuple[int, int]) -> None:
    height, width = size
    latents = torch.zeros(1, 16, height // 8, width // 8)
    want = oracle_text_ids(latents, 18, 18, 36, 28)
    got = editing_text_ids((height // 8, width // 8), (1, 18, 18), (1, 36, 28), 1)
    assert got.shape == (1, 81 + 18 * 14, 3)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
