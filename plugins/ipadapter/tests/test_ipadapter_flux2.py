"""The IP-Adapter's decoupled-attention processor is architecture-neutral: it runs on a tiny FLUX.2 DiT (4-axis
RoPE ids, SwiGLU blocks), its math matches an oracle built from the blocks' own pre-RoPE queries, and it composes
with EliGen's regional processor in either order."""

from __future__ import annotations

import pytest
import torch
from diffstudio.nn import RopeFreqs

pytest.importorskip("diffstudio_flux2")
from diffstudio_flux2.math import image_ids, text_ids  # noqa: E402
from diffstudio_flux2.model import Flux2  # noqa: E402
from diffstudio_flux2.params import Flux2Params  # noqa: E402
from diffstudio_ipadapter.units import IP_KEY, IPState, install_processor  # noqa: E402

CTX, CH, HEADS, HEAD_DIM, TXT, IMG, REF, IP_TOKENS = 24, 16, 2, 32, 3, 6, 2, 4


def tiny() -> Flux2:
    torch.manual_seed(0)
    params = Flux2Params(in_channels=CH, context_in_dim=CTX, hidden_size=HEADS * HEAD_DIM, num_heads=HEADS, depth=1,
                         depth_single_blocks=1, axes_dim=(8, 8, 8, 8), theta=2000, mlp_ratio=2.0,
                         use_guidance_embed=False)  # fmt: skip
    model = Flux2(params).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def inputs() -> dict:
    gen = torch.Generator().manual_seed(1)
    return {
        "x": torch.randn(1, IMG, CH, generator=gen), "x_ids": image_ids(1, 2, 3), "timesteps": torch.tensor([0.4]),
        "ctx": torch.randn(1, TXT, CTX, generator=gen), "ctx_ids": text_ids(1, TXT),
        "extra_img": torch.randn(1, REF, CH, generator=gen), "extra_img_ids": image_ids(1, 1, 2, t=10),
    }  # fmt: skip


def ip_state(model: Flux2, scale: float = 0.7) -> IPState:
    gen = torch.Generator().manual_seed(3)
    kv = {(kind, 0): (torch.randn(1, IP_TOKENS, HEADS, HEAD_DIM, generator=gen),
                      torch.randn(1, IP_TOKENS, HEADS, HEAD_DIM, generator=gen), scale)
          for kind in ("double", "single")}  # fmt: skip
    ids = torch.cat([image_ids(1, 2, 3), image_ids(1, 1, 2, t=10)], dim=1)  # target then reference tokens
    freqs = model.pe_embedder(ids)
    return IPState("instantx", kv, RopeFreqs(freqs.cos, -freqs.sin))


def naive(q, k, v):
    scores = torch.einsum("blhd,bmhd->bhlm", q, k) / q.shape[-1] ** 0.5
    return torch.einsum("bhlm,bmhd->blhd", scores.softmax(-1), v)


class Oracle:
    """Block attention plus ``scale * attention(pre-RoPE q of the image rows, K_ip, V_ip)``, the pre-RoPE queries
    recorded from the blocks themselves (double: the image stream's projection; single: the QK norm's output)."""

    def __init__(self, model: Flux2, state: IPState) -> None:
        self.state, self.pre = state, {}
        double, single = model.double_blocks[0], model.single_blocks[0]
        project = double.img_attn.project

        def recording(x):
            q, k, v = project(x)
            self.pre["double"] = q
            return q, k, v

        double.img_attn.project = recording
        single.norm.register_forward_hook(lambda module, args, out: self.pre.__setitem__("single", out[0]))

    def __call__(self, q, k, v, context):
        out = naive(q, k, v)
        k_ip, v_ip, scale = self.state.kv[(context.kind, context.index)]
        start, stop = TXT, TXT + IMG + REF
        if context.kind == "double":
            ip = scale * naive(self.pre["double"], k_ip, v_ip)
            return torch.cat([out[:, :start], out[:, start:stop] + ip], dim=1)
        rows = torch.cat([q[:, :start], self.pre["single"][:, start:stop]], dim=1)  # text rows as the block has them
        return out + scale * naive(rows, k_ip, v_ip)


@torch.no_grad()
def test_ipadapter_processor_matches_the_oracle_on_flux2():
    model = tiny()
    plain = model(**inputs())
    state = ip_state(model)
    install_processor(model, model.block_names)
    got = model(**inputs(), attention_kwargs={IP_KEY: state})
    model.set_attn_processor(Oracle(model, state))
    want = model(**inputs())
    assert torch.allclose(got, want, atol=1e-5)
    assert (got - plain).abs().max() > 1e-3


@torch.no_grad()
def test_ipadapter_and_eligen_chains_compose_in_either_order_on_flux2():
    eligen_units = pytest.importorskip("diffstudio_eligen.units")
    from diffstudio_eligen.mask import MASK_KEY, regional_mask

    entities = torch.randn(1, 4, CTX, generator=torch.Generator().manual_seed(4))
    regions = torch.tensor([[[1, 1, 0, 1, 0, 0], [0, 0, 1, 0, 0, 1]]], dtype=torch.bool)
    extras = {MASK_KEY: regional_mask(TXT, [2, 2], regions, REF)}
    outputs = []
    for order in ("ip_first", "eligen_first"):
        model = tiny()
        state = ip_state(model)
        if order == "ip_first":
            install_processor(model, model.block_names)
            eligen_units.install_processor(model)
        else:
            eligen_units.install_processor(model)
            install_processor(model, model.block_names)
        outputs.append(model(**inputs(), extra_txt=entities, attention_kwargs={**extras, IP_KEY: state}))
        only_eligen = tiny()
        eligen_units.install_processor(only_eligen)
        eligen_out = only_eligen(**inputs(), extra_txt=entities, attention_kwargs=extras)
    assert torch.allclose(outputs[0], outputs[1], atol=1e-6)
    assert (outputs[0] - eligen_out).abs().max() > 1e-3  # the IP-Adapter acts inside the regional chain
