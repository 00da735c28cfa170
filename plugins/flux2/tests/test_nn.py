"""Core primitives (diffstudio.nn) against diffusers' equivalents and their own contracts."""

from __future__ import annotations

import pytest
import torch
from diffstudio.nn import (
    DeltaLinear,
    SDPAProcessor,
    apply_rope,
    attention,
    delta_linears,
    rope_frequencies,
    timestep_embedding,
    to_delta_linears,
)
from torch import nn


def test_rope_matches_diffusers():
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.transformers.transformer_flux2 import Flux2PosEmbed

    ids = torch.cat([torch.randint(0, 40, (9, 4)), torch.tensor([[20, 63, 63, 511]])])
    cos, sin = Flux2PosEmbed(theta=2000, axes_dim=(4, 8, 8, 12))(ids)
    x = torch.randn(2, 10, 3, 32)
    expected = apply_rotary_emb(x, (cos, sin), sequence_dim=1)
    got = apply_rope(x, rope_frequencies(ids, (4, 8, 8, 12), 2000))
    assert (got - expected).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="even"):
        rope_frequencies(ids, (3, 13), 2000)


def test_timestep_embedding_matches_diffusers():
    from diffusers.models.embeddings import Timesteps

    t = torch.tensor([0.0, 0.25, 0.999, 1.0])
    expected = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)(t * 1000)
    assert (timestep_embedding(t, 256) - expected).abs().max() <= 1e-5
    assert timestep_embedding(t.half(), 7).shape == (4, 7)


def test_attention_layout_and_processor():
    q, k, v = torch.randn(2, 5, 3, 8), torch.randn(2, 9, 3, 8), torch.randn(2, 9, 3, 8)
    weights = torch.softmax(torch.einsum("blhd,bmhd->bhlm", q, k) / 8**0.5, dim=-1)
    expected = torch.einsum("bhlm,bmhd->blhd", weights, v)
    assert (attention(q, k, v) - expected).abs().max() <= 1e-5
    assert torch.equal(SDPAProcessor()(q, k, v, object()), attention(q, k, v))


def test_delta_linear_state_dict_and_deltas():
    plain = nn.Linear(4, 3)
    layer = DeltaLinear(4, 3)
    assert set(layer.state_dict()) == set(plain.state_dict())
    layer.load_state_dict(plain.state_dict())
    x = torch.randn(5, 4)
    assert torch.equal(layer(x), plain(x))
    layer.add_delta("a", lambda t: torch.ones(*t.shape[:-1], 3))
    layer.add_delta("b", lambda t: 2 * torch.ones(*t.shape[:-1], 3))
    assert torch.allclose(layer(x), plain(x) + 3)
    assert list(layer.deltas) == ["a", "b"] and "deltas=['a', 'b']" in repr(layer)
    assert layer.remove_delta("missing", missing_ok=True) is None
    layer.clear_deltas()
    assert torch.equal(layer(x), plain(x))


def test_to_delta_linears_keeps_parameters():
    class Quantised(nn.Linear):
        pass

    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 2)), Quantised(2, 2))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(3, 4)
    expected = net(x)
    assert to_delta_linears(net) == 2
    assert isinstance(net[0], DeltaLinear) and isinstance(net[2][0], DeltaLinear)
    assert type(net[3]) is Quantised
    assert set(net.state_dict()) == set(before) and torch.equal(net(x), expected)
    assert [name for name, _ in delta_linears(net)] == ["0", "2.0"]
