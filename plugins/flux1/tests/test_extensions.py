"""The DiT's extension points behave as the README documents them."""

from __future__ import annotations

import pytest
import torch
from diffstudio.nn import attention, delta_linears
from diffstudio_flux1.layers import DEFAULT_PROCESSOR, AttentionContext, MaskedAttentionProcessor


class Recorder:
    """Attends normally and keeps each block's post-RoPE keys/values and context."""

    def __init__(self):
        self.kv, self.contexts = {}, []

    def __call__(self, q, k, v, context: AttentionContext):
        self.kv[f"{context.kind}_{context.index}"] = (k.clone(), v.clone())
        self.contexts.append(context)
        return attention(q, k, v)


@pytest.fixture()
def dev(dit_cases):
    return dit_cases["dev"].load("bfl")


def test_kv_extension_with_the_blocks_own_keys_changes_nothing(dev, helpers):
    """Appending a copy of every block's own K/V doubles every softmax weight alike: same output."""
    inp = helpers.dit_inputs()
    recorder = Recorder()
    dev.set_attn_processor(recorder)
    with torch.no_grad():
        base = dev(**inp)
        dev.reset_attn_processors()
        same = dev(**inp, kv_extension=recorder.kv)
        shifted = dev(**inp, kv_extension={"double_0": recorder.kv["double_1"]})
    assert (same - base).abs().max() <= helpers.TOL
    assert (shifted - base).abs().max() > 1e-3
    with pytest.raises(ValueError, match="unknown block"):
        dev(**inp, kv_extension={"double_9": recorder.kv["double_0"]})


def test_processor_context_describes_the_sequence(dev, helpers):
    inp = helpers.dit_inputs()
    extra = torch.randn(1, 5, helpers.IN_CHANNELS)
    ids = torch.ones(1, 5, 3, dtype=torch.long)
    recorder = Recorder()
    dev.set_attn_processor(recorder, ["double_1", "single_0"])
    assert dev.attn_processors["double_0"] is DEFAULT_PROCESSOR and dev.attn_processors["single_0"] is recorder
    with torch.no_grad():
        dev(**inp, extra_img=extra, extra_img_ids=ids, attention_kwargs={"tag": 1})
    dev.reset_attn_processors()
    assert [(c.kind, c.index) for c in recorder.contexts] == [("double", 1), ("single", 0)]
    c = recorder.contexts[0]
    assert (c.txt_len, c.img_len, c.ref_len, c.kv_len, dict(c.extras)) == (7, 24, 5, 0, {"tag": 1})
    assert c.img_slice == slice(7, 31)
    with pytest.raises(ValueError, match="unknown block"):
        dev.set_attn_processor(recorder, ["double_7"])


def test_masked_processor_applies_an_additive_mask(dev, helpers):
    inp = helpers.dit_inputs()
    length = 7 + 24
    zero = torch.zeros(1, 1, length, length)
    separate = torch.zeros(1, 1, length, length)
    separate[..., :7, 7:] = float("-inf")  # text cannot see the image, image cannot see the text
    separate[..., 7:, :7] = float("-inf")
    with torch.no_grad():
        base = dev(**inp)
        dev.set_attn_processor(MaskedAttentionProcessor())
        unmasked = dev(**inp)
        zero_mask = dev(**inp, attention_kwargs={"attention_mask": zero})
        regional = dev(**inp, attention_kwargs={"attention_mask": separate})
    dev.reset_attn_processors()
    assert torch.allclose(unmasked, base, atol=1e-6) and (zero_mask - base).abs().max() <= helpers.TOL
    assert (regional - base).abs().max() > 1e-3


def test_decoupled_cross_attention_processor(dev, helpers):
    """IP-Adapter style: a second attention of the image queries over extra K/V, added to the image outputs."""
    inp = helpers.dit_inputs()
    ip_k = torch.randn(2, 4, helpers.HEADS, helpers.HEAD_DIM)
    ip_v = torch.randn(2, 4, helpers.HEADS, helpers.HEAD_DIM)

    def ip_adapter(q, k, v, context):
        out = attention(q, k, v)
        scale = context.extras["ip_scale"]
        image = q[:, context.img_slice]
        extra = torch.zeros_like(out)
        extra[:, context.img_slice] = scale * attention(image, ip_k, ip_v)
        return out + extra

    dev.set_attn_processor(ip_adapter)
    with torch.no_grad():
        off = dev(**inp, attention_kwargs={"ip_scale": 0.0})
        on = dev(**inp, attention_kwargs={"ip_scale": 0.7})
    dev.reset_attn_processors()
    with torch.no_grad():
        base = dev(**inp)
    assert torch.allclose(off, base, atol=1e-6) and (on - base).abs().max() > 1e-3


def test_skipping_every_block_leaves_the_embedding(dev, helpers):
    from diffstudio.nn import timestep_embedding

    inp = helpers.dit_inputs()
    with torch.no_grad():
        got = dev(**inp, skip_blocks=dev.block_names)
        vec = dev.time_in(timestep_embedding(inp["timesteps"], 256))
        vec = vec + dev.guidance_in(timestep_embedding(inp["guidance"], 256)) + dev.vector_in(inp["y"])
        expected = dev.final_layer(dev.img_in(inp["img"]), vec)
        partial = dev(**inp, skip_blocks=["single_1"])
        base = dev(**inp)
    assert torch.allclose(got, expected, atol=1e-5)
    assert (partial - base).abs().max() > 1e-3


def test_stack_hook_can_reuse_a_cached_residual(dev, helpers):
    """TeaCache-style: a step that skips the stack and adds the previous residual reproduces the full pass."""
    inp = helpers.dit_inputs()
    cache = {}

    def compute(img, vec, run):
        out = run()
        cache["residual"] = out - img
        return out

    def reuse(img, vec, run):
        return img + cache["residual"]

    with torch.no_grad():
        base = dev(**inp)
        first = dev(**inp, stack_hook=compute)
        cached = dev(**inp, stack_hook=reuse)
    assert torch.equal(first, base) and (cached - base).abs().max() <= helpers.TOL


def test_delta_linear_side_path_equals_a_weight_change(dev, helpers):
    inp = helpers.dit_inputs()
    layers = dict(delta_linears(dev))
    assert "double_blocks.0.img_attn.qkv" in layers and "single_blocks.1.linear1" in layers
    layer = layers["single_blocks.0.linear2"]
    delta = torch.randn(layer.out_features, layer.in_features, generator=torch.Generator().manual_seed(1)) * 0.05
    with torch.no_grad():
        layer.add_delta("test", lambda x: x @ delta.T)
        side = dev(**inp)
        layer.remove_delta("test")
        base = dev(**inp)
        layer.weight += delta
        merged = dev(**inp)
        layer.weight -= delta
    assert (side - merged).abs().max() <= helpers.TOL and (side - base).abs().max() > 1e-3
    assert set(dev.state_dict()) == set(dict(dev.named_parameters()))  # deltas never enter the state dict
