"""EliGen's regional attention is architecture-neutral: it runs on a tiny FLUX.2 DiT (4-axis ids, shared
modulation, SwiGLU blocks) and matches a hand-built oracle there."""

from __future__ import annotations

import pytest
import torch
from diffstudio.nn import DEFAULT_PROCESSOR

pytest.importorskip("diffstudio_flux2")
from diffstudio_eligen.mask import MASK_KEY, regional_mask  # noqa: E402
from diffstudio_eligen.units import install_processor  # noqa: E402
from diffstudio_flux2.math import image_ids, text_ids  # noqa: E402
from diffstudio_flux2.model import Flux2  # noqa: E402
from diffstudio_flux2.params import Flux2Params  # noqa: E402

CTX, CH, GLOBAL, ENTITY = 24, 16, 3, 2
INSIDE = {0: {0, 1, 3}, 1: {2, 5}}  # entity -> image tokens of its region on the 2 x 3 grid


def tiny(single: int) -> Flux2:
    torch.manual_seed(0)
    params = Flux2Params(in_channels=CH, context_in_dim=CTX, hidden_size=64, num_heads=2, depth=1,
                         depth_single_blocks=single, axes_dim=(8, 8, 8, 8), theta=2000, mlp_ratio=2.0,
                         use_guidance_embed=False)  # fmt: skip
    model = Flux2(params).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def inputs(entities: torch.Tensor) -> dict:
    gen = torch.Generator().manual_seed(1)
    return {
        "x": torch.randn(1, 6, CH, generator=gen), "x_ids": image_ids(1, 2, 3), "timesteps": torch.tensor([0.6]),
        "ctx": torch.randn(1, GLOBAL, CTX, generator=gen), "ctx_ids": text_ids(1, GLOBAL), "extra_txt": entities,
    }  # fmt: skip


def entity_tokens(seed: int = 2) -> torch.Tensor:
    return torch.randn(1, 2 * ENTITY, CTX, generator=torch.Generator().manual_seed(seed))


def hand_mask() -> torch.Tensor:
    """The rules of EliGen's mask written out token by token for [global | entity 0 | entity 1 | image]."""
    kind = ["g"] * GLOBAL + [0] * ENTITY + [1] * ENTITY + [("img", p) for p in range(6)]
    total = len(kind)
    mask = torch.zeros(1, total, total)
    for i, a in enumerate(kind):
        for j, b in enumerate(kind):
            if "g" in (a, b) or (isinstance(a, tuple) and isinstance(b, tuple)):
                continue
            if isinstance(a, int) and isinstance(b, int):
                ok = a == b
            else:
                entity, (_, p) = (a, b) if isinstance(a, int) else (b, a)
                ok = p in INSIDE[entity]
            if not ok:
                mask[0, i, j] = float("-inf")
    return mask


class NaiveMasked:
    """Oracle: softmax(q k^T / sqrt(d) + mask) v, written out (no SDPA)."""

    def __init__(self, mask: torch.Tensor) -> None:
        self.mask = mask

    def __call__(self, q, k, v, context):
        scores = torch.einsum("blhd,bmhd->bhlm", q, k) / q.shape[-1] ** 0.5 + self.mask[:, None]
        return torch.einsum("bhlm,bmhd->blhd", scores.softmax(-1), v)


def regions() -> torch.Tensor:
    return torch.tensor([[[p in INSIDE[e] for p in range(6)] for e in (0, 1)]])


@torch.no_grad()
def test_eligen_mask_and_processor_match_the_oracle_on_flux2():
    model = tiny(single=1)
    mask = regional_mask(GLOBAL, [ENTITY, ENTITY], regions())
    assert torch.equal(mask[:, 0], hand_mask())
    plain = model(**inputs(entity_tokens()))
    install_processor(model)
    assert all(p is not DEFAULT_PROCESSOR for p in model.attn_processors.values())
    got = model(**inputs(entity_tokens()), attention_kwargs={MASK_KEY: mask})
    model.set_attn_processor(NaiveMasked(hand_mask()))
    want = model(**inputs(entity_tokens()))
    assert torch.allclose(got, want, atol=1e-5)
    assert (got - plain).abs().max() > 1e-3


@torch.no_grad()
def test_an_entity_reaches_only_the_image_tokens_of_its_region_on_flux2():
    """One double block: image tokens outside entity 0's region never see its tokens, so changing them moves only
    the velocity inside the region."""
    model = tiny(single=0)
    install_processor(model)
    extras = {MASK_KEY: regional_mask(GLOBAL, [ENTITY, ENTITY], regions())}
    base = model(**inputs(entity_tokens()), attention_kwargs=extras)
    changed_tokens = entity_tokens()
    changed_tokens[:, :ENTITY] += torch.randn(1, ENTITY, CTX)
    changed = model(**inputs(changed_tokens), attention_kwargs=extras)
    moved = (changed - base).abs().amax(-1)[0]  # per image token
    inside = sorted(INSIDE[0])
    outside = [p for p in range(6) if p not in INSIDE[0]]
    assert torch.all(moved[outside] == 0) and torch.all(moved[inside] > 1e-4)
