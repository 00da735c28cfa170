"""Merge rules and shape validation of the template media."""

from __future__ import annotations

import pytest
import torch
from diffstudio.errors import CacheFormatError, CacheMergeError
from diffstudio.lora import LoraWeights
from diffstudio_template_sdk import media


def kv(tokens: int, batch: int = 1, heads: int = 2, dim: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, tokens, heads, dim, generator=gen), torch.randn(batch, tokens, heads, dim, generator=gen)


def test_kv_caches_concatenate_along_tokens_in_template_order() -> None:
    a = {"double_0": kv(3, seed=1), "single_0": kv(2, seed=2)}
    b = {"double_0": kv(5, seed=3)}
    merged = media.merge_kv_caches([a, b])
    k, v = merged["double_0"]
    assert k.shape == (1, 8, 2, 4)
    torch.testing.assert_close(k[:, :3], a["double_0"][0])
    torch.testing.assert_close(v[:, 3:], b["double_0"][1])
    assert merged["single_0"][0] is not None and merged["single_0"][0].shape == (1, 2, 2, 4)


def test_kv_batch_one_broadcasts_and_mismatched_heads_are_rejected() -> None:
    merged = media.merge_kv_caches([{"double_0": kv(2, batch=1)}, {"double_0": kv(3, batch=4)}])
    assert merged["double_0"][0].shape == (4, 5, 2, 4)
    with pytest.raises(CacheMergeError, match="heads, head_dim"):
        media.merge_kv_caches([{"double_0": kv(2, heads=2)}, {"double_0": kv(2, heads=3)}])
    with pytest.raises(CacheMergeError, match="batch sizes"):
        media.merge_kv_caches([{"double_0": kv(2, batch=2)}, {"double_0": kv(2, batch=3)}])


def test_kv_cache_validation_names_the_problem() -> None:
    with pytest.raises(CacheFormatError, match="block name"):
        media.check_kv_cache({"block0": kv(2)})
    with pytest.raises(CacheFormatError, match="both be"):
        media.check_kv_cache({"double_0": (torch.zeros(1, 2, 2, 4), torch.zeros(1, 3, 2, 4))})
    with pytest.raises(CacheFormatError, match="pair"):
        media.check_kv_cache({"double_0": torch.zeros(1, 2, 2, 4)})


def lora(rank: int, alpha: float | None, seed: int, out: int = 6, inp: int = 5) -> LoraWeights:
    gen = torch.Generator().manual_seed(seed)
    return LoraWeights(torch.randn(rank, inp, generator=gen), torch.randn(out, rank, generator=gen), alpha)


def test_lora_concatenated_along_rank_equals_the_sum_of_updates() -> None:
    a, b = lora(2, 4.0, seed=1), lora(3, None, seed=2)
    c = lora(1, 0.5, seed=3)
    merged = media.merge_lora_caches([{"x.qkv": a, "y.proj": c}, {"x.qkv": b}])
    assert merged["x.qkv"].rank == 5 and merged["x.qkv"].alpha is None
    torch.testing.assert_close(merged["x.qkv"].delta_weight(), a.delta_weight() + b.delta_weight())
    torch.testing.assert_close(merged["y.proj"].delta_weight(), c.delta_weight())


def test_flat_lora_tensors_are_read_and_mismatched_features_rejected() -> None:
    a = lora(2, 2.0, seed=1)
    flat = {"x.qkv.lora_A.weight": a.down, "x.qkv.lora_B.weight": a.up, "x.qkv.alpha": torch.tensor(2.0)}
    canonical = media.check_lora_cache(flat)
    assert canonical["x.qkv"].down is a.down and canonical["x.qkv"].alpha == 2.0
    with pytest.raises(CacheFormatError, match="both lora_A"):
        media.check_lora_cache({"x.qkv.lora_A.weight": a.down})
    with pytest.raises(CacheMergeError, match="different features"):
        media.merge_lora_caches([{"x": lora(2, None, 1, out=6)}, {"x": lora(2, None, 2, out=7)}])


def test_lora_merge_keeps_gradients() -> None:
    a = lora(2, None, seed=1)
    up = a.up.clone().requires_grad_(True)
    merged = media.merge_lora_caches([{"x": LoraWeights(a.down, up)}, {"x": lora(1, None, seed=2)}])
    merged["x"].delta_weight().sum().backward()
    assert up.grad is not None and up.grad.abs().sum() > 0


def test_residuals_are_summed_and_other_resolutions_rejected() -> None:
    r1, r2 = torch.randn(1, 8, 4, 6), torch.randn(1, 8, 4, 6)
    merged = media.merge_residuals([{"double_0": r1}, {"double_0": r2, "single_1": r1}])
    torch.testing.assert_close(merged["double_0"], r1 + r2)
    torch.testing.assert_close(merged["single_1"], r1)
    with pytest.raises(CacheMergeError, match=r"D=8 at 4x6, D=8 at 8x12"):
        media.merge_residuals([{"double_0": r1}, {"double_0": torch.randn(1, 8, 8, 12)}])
    with pytest.raises(CacheFormatError, match="latent grid"):
        media.check_residuals({"double_0": torch.randn(8, 4, 6)})


def test_residual_tokens_are_row_major() -> None:
    grid = torch.arange(2 * 3 * 4, dtype=torch.float32).view(1, 2, 3, 4)  # (B, D, h, w)
    tokens = media.residual_tokens(grid)
    assert tokens.shape == (1, 12, 2)
    assert tokens[0, 5].tolist() == [grid[0, 0, 1, 1].item(), grid[0, 1, 1, 1].item()]


def test_extra_text_tokens_concatenate() -> None:
    merged = media.merge_extra_text([torch.zeros(1, 2, 8), torch.ones(3, 4, 8)])
    assert merged.shape == (3, 6, 8) and merged[:, 2:].eq(1).all()
    with pytest.raises(CacheMergeError, match="widths"):
        media.merge_extra_text([torch.zeros(1, 2, 8), torch.zeros(1, 2, 9)])
