"""The attention slot both FLUX families share: context, default processor, K/V extension, QK norm."""

from __future__ import annotations

import pytest
import torch
from diffstudio.nn import (
    DEFAULT_PROCESSOR,
    AttentionContext,
    QKNorm,
    RMSNorm,
    attention,
    extend_kv,
    match_batch,
)


def test_context_img_slice_and_defaults() -> None:
    context = AttentionContext("double", 2, txt_len=5, img_len=16)
    assert context.img_slice == slice(5, 21)
    assert (context.ref_len, context.kv_len, dict(context.extras)) == (0, 0, {})
    with pytest.raises(AttributeError):
        context.index = 3  # type: ignore[misc]  # frozen


def test_default_processor_is_plain_attention() -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 7, 3, 8, generator=gen) for _ in range(3))
    out = DEFAULT_PROCESSOR(q, k, v, AttentionContext("single", 0, 3, 4))
    torch.testing.assert_close(out, attention(q, k, v))


def test_extend_kv_appends_tokens_and_broadcasts_batch_one() -> None:
    k, v = torch.randn(2, 5, 3, 4), torch.randn(2, 5, 3, 4)
    k_ext, v_ext = torch.randn(1, 2, 3, 4, dtype=torch.float64), torch.randn(1, 2, 3, 4)
    k2, v2 = extend_kv(k, v, (k_ext, v_ext))
    assert k2.shape == v2.shape == (2, 7, 3, 4) and k2.dtype == torch.float32
    torch.testing.assert_close(k2[1, 5:], k_ext[0].float())
    torch.testing.assert_close(v2[:, :5], v)
    assert extend_kv(k, v, None) == (k, v)


def test_extend_kv_names_shapes_that_do_not_fit() -> None:
    k = v = torch.randn(2, 5, 3, 4)
    with pytest.raises(ValueError, match=r"do not fit keys \(2, 5, 3, 4\) \(expected \(B, L_extra, 3, 4\)\)"):
        extend_kv(k, v, (torch.randn(2, 2, 4, 4), torch.randn(2, 2, 4, 4)))
    with pytest.raises(ValueError, match="K extension has batch size 3, expected 1 or 2"):
        extend_kv(k, v, (torch.randn(3, 2, 3, 4), torch.randn(3, 2, 3, 4)))
    assert match_batch(torch.ones(1, 2), 4, "x").shape == (4, 2)


def test_qknorm_normalises_per_head_and_casts_to_v() -> None:
    norm = QKNorm(4)
    with torch.no_grad():
        norm.query_norm.scale.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    q, k = torch.randn(1, 3, 2, 4), torch.randn(1, 3, 2, 4)
    qn, kn = norm(q, k, torch.zeros(1, 3, 2, 4, dtype=torch.float64))
    assert qn.dtype == kn.dtype == torch.float64
    expected = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + 1e-6) * torch.tensor([1.0, 2.0, 3.0, 4.0])
    torch.testing.assert_close(qn, expected.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kn, RMSNorm(4)(k).double())
    assert set(norm.state_dict()) == {"query_norm.scale", "key_norm.scale"}
