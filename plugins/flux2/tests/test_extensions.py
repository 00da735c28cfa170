"""Each DiT extension point: effect when used, exactly no effect when empty or zero."""

from __future__ import annotations

import pytest
import torch
from diffstudio.nn import DeltaLinear, attention, delta_linears
from diffstudio_flux2.layers import AttentionContext
from diffstudio_flux2.model import Flux2
from torch import nn


@pytest.fixture
def model(dit_cases):
    return dit_cases["klein"].load("bfl")


@pytest.fixture
def inp(helpers):
    return helpers.dit_inputs()


def test_block_residual_hook(model, inp):
    calls = []

    def zero(kind, index, img):
        calls.append((kind, index, tuple(img.shape)))
        return torch.zeros_like(img)

    with torch.no_grad():
        base = model(**inp)
        assert torch.equal(model(**inp, block_residual=zero), base)
        assert torch.equal(model(**inp, block_residual=lambda kind, index, img: None), base)
        extra = torch.randn(1, 6, 16)
        ids = torch.zeros(1, 6, 4, dtype=torch.long)
        calls.clear()
        model(**inp, extra_x=extra, extra_x_ids=ids, block_residual=zero)
        shape = (2, inp["x"].shape[1], model.hidden_size)  # target-image tokens only
        assert calls == [
            ("double", 0, shape),
            ("double", 1, shape),
            ("single", 0, shape),
            ("single", 1, shape),
        ]

        def push_last(kind, index, img):
            # a constant would vanish in the final LayerNorm: use a varying residual
            return torch.randn_like(img) if (kind, index) == ("single", 1) else None

        assert (model(**inp, block_residual=push_last) - base).abs().max() > 1e-3
        with pytest.raises(ValueError, match="block residual must have shape"):
            model(**inp, block_residual=lambda kind, index, img: img[:, :2])


def test_skip_blocks(model, inp):
    with torch.no_grad():
        base = model(**inp)
        assert torch.equal(model(**inp, skip_blocks=()), base)
        assert (model(**inp, skip_blocks={"single_0"}) - base).abs().max() > 1e-3


def test_every_linear_carries_deltas(model):
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(isinstance(m, DeltaLinear) for m in linears)
    assert len(dict(delta_linears(model))) == len(linears)


def test_lora_delta_equals_merged_weights(dit_cases, model, inp, helpers):
    name = "double_blocks.0.img_attn.qkv"
    layer = dict(delta_linears(model))[name]
    gen = torch.Generator().manual_seed(3)
    down = torch.randn(4, layer.in_features, generator=gen) * 0.3
    up = torch.randn(layer.out_features, 4, generator=gen) * 0.3
    keys = set(model.state_dict())
    with torch.no_grad():
        base = model(**inp)
        layer.add_delta("zero", lambda x: torch.zeros(*x.shape[:-1], layer.out_features))
        assert torch.equal(model(**inp), base)
        layer.add_delta("lora", lambda x: x @ down.T @ up.T)
        assert set(model.state_dict()) == keys  # deltas never enter the state dict
        with_lora = model(**inp)
        sd = helpers.load_file(dit_cases["klein"].files["bfl"])
        sd[f"{name}.weight"] = sd[f"{name}.weight"] + up @ down
        merged = helpers.build_dit(sd)(**inp)
        assert (with_lora - merged).abs().max() <= helpers.TOL
        assert (with_lora - base).abs().max() > 1e-3
        with pytest.raises(ValueError, match="already registered"):
            layer.add_delta("lora", lambda x: x)
        layer.remove_delta("lora")
        layer.remove_delta("zero")
        assert torch.equal(model(**inp), base)
        with pytest.raises(KeyError):
            layer.remove_delta("lora")


class Recorder:
    def __init__(self):
        self.seen: list[tuple[AttentionContext, tuple[int, ...], tuple[int, ...]]] = []

    def __call__(self, q, k, v, context):
        self.seen.append((context, tuple(q.shape), tuple(k.shape)))
        return attention(q, k, v)


def test_attention_processor_slot(model, inp):
    rec = Recorder()
    with torch.no_grad():
        base = model(**inp)
        model.set_attn_processor(rec)
        assert "processor" not in dict(model.named_modules()) and set(model.attn_processors.values()) == {rec}
        kv = {"single_1": (torch.randn(1, 3, 2, 16), torch.randn(1, 3, 2, 16))}
        model(**inp, kv_extension=kv, attention_kwargs={"mask_id": 7})
        model.set_attn_processor(rec, blocks=[])  # no-op
        assert torch.equal(model(**{**inp}), base)
    contexts = [c for c, _, _ in rec.seen[:4]]
    assert [(c.kind, c.index) for c in contexts] == [
        ("double", 0),
        ("double", 1),
        ("single", 0),
        ("single", 1),
    ]
    last, q_shape, k_shape = rec.seen[3]
    assert (last.txt_len, last.img_len, last.ref_len, last.kv_len) == (7, 24, 0, 3)
    assert last.extras == {"mask_id": 7} and q_shape == (2, 31, 2, 16) and k_shape == (2, 34, 2, 16)
    model.reset_attn_processors()
    with pytest.raises(ValueError, match="unknown block names"):
        model.set_attn_processor(rec, blocks=["double_5"])


def test_masking_processor(model, inp):
    """An EliGen-style processor: image queries may not see text keys in the named blocks."""

    def masked(q, k, v, context):
        mask = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool)
        mask[context.txt_len :, : context.txt_len] = False
        return attention(q, k, v, mask=mask)

    def all_true(q, k, v, context):
        return attention(q, k, v, mask=torch.ones(q.shape[1], k.shape[1], dtype=torch.bool))

    with torch.no_grad():
        base = model(**inp)
        model.set_attn_processor(all_true)
        assert (model(**inp) - base).abs().max() <= 1e-5
        model.set_attn_processor(masked, blocks=["double_0", "single_1"])
        assert (model(**inp) - base).abs().max() > 1e-3
    model.reset_attn_processors()


def test_batch_one_extensions_broadcast(model, inp, helpers):
    extra = torch.randn(1, 6, 16)
    ids = helpers.image_ids(1, 2, 3, t=10)
    with torch.no_grad():
        broadcast = model(**inp, extra_x=extra, extra_x_ids=ids)
        explicit = model(**inp, extra_x=extra.expand(2, -1, -1), extra_x_ids=ids.expand(2, -1, -1))
    assert torch.equal(broadcast, explicit)
    same_t = {**inp, "timesteps": torch.full((2,), 0.4), "x_ids": inp["x_ids"][:1]}
    with torch.no_grad():
        full = model(**same_t, extra_x=extra, extra_x_ids=ids.expand(2, -1, -1))
        short = model(**{**same_t, "timesteps": torch.tensor(0.4)}, extra_x=extra, extra_x_ids=ids)
    assert torch.equal(full, short)


def test_gradient_checkpointing_is_transparent(model, inp):
    assert Flux2.supports_gradient_checkpointing and Flux2.repeated_blocks == (
        "double_blocks",
        "single_blocks",
    )
    assert "*norm*" in Flux2.keep_in_high_precision
    model.train()
    grads = []
    for flag in (False, True):
        model.use_gradient_checkpointing = flag
        model.zero_grad()
        out = model(**inp)
        out.square().mean().backward()
        grads.append((out.detach(), model.double_blocks[0].img_attn.qkv.weight.grad.clone()))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-6)
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-6)


def test_empty_extensions_are_exact_noops(model, inp):
    empty_x = torch.zeros(2, 0, 16)
    empty_ids = torch.zeros(2, 0, 4, dtype=torch.long)
    with torch.no_grad():
        base = model(**inp)
        same = model(
            **inp,
            extra_x=empty_x,
            extra_x_ids=empty_ids,
            extra_ctx=torch.zeros(1, 0, 24),
            kv_extension={"double_0": (torch.zeros(1, 0, 2, 16), torch.zeros(1, 0, 2, 16))},
            block_residual=None,
            attention_kwargs={},
            skip_blocks=(),
        )
        with_text = model(**inp, extra_ctx=torch.randn(1, 2, 24))
    assert torch.equal(same, base)
    assert (with_text - base).abs().max() > 1e-3
