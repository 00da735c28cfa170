"""First-Block-Cache and the StackRun split on a toy dual-stream DiT built from core's shared FLUX.1 blocks.

The oracle transcribes diffusers' ``hooks/first_block_cache.py`` (``FBCHeadBlockHook`` / ``FBCBlockHook``): the
head block always runs; its image residual is compared with the one stored at the last computed step
(``mean|r - r_prev| / mean|r_prev| > threshold`` computes); a computed step stores the head output, the head
residual and the tail residual (last block output minus head output); a skipped one returns head output + tail
residual. The blocks are run in a plain loop written here.
"""

from __future__ import annotations

import pytest
import torch
from diffstudio.cache import FirstBlockCache, StepCacheError
from diffstudio.dit.blocks import DoubleStreamBlock, SingleStreamBlock
from diffstudio.dit.layers import EmbedND
from diffstudio.dit.stack import DualStreamStack, StackRun
from diffstudio.nn import AttentionContext, modulate
from torch import nn

D, HEADS, TXT, IMG, STEPS = 64, 2, 5, 16, 10


class Toy(DualStreamStack):
    def __init__(self):
        super().__init__()
        self.use_gradient_checkpointing = False
        self.double_blocks = nn.ModuleList([DoubleStreamBlock(D, HEADS, 2.0, True) for _ in range(2)])
        self.single_blocks = nn.ModuleList([SingleStreamBlock(D, HEADS, 2.0) for _ in range(2)])
        self.pe_embedder = EmbedND(10_000, (4, 14, 14))

    def forward(self, img, txt, vec, stack_hook=None, block_residual=None):
        ids = torch.zeros(1, TXT + IMG, 3)
        ids[0, TXT:, 1] = torch.arange(IMG) // 4
        ids[0, TXT:, 2] = torch.arange(IMG) % 4
        pe = self.pe_embedder(ids)

        def modulated():
            (shift, scale, _), _ = self.double_blocks[0].img_mod(vec)
            return modulate(self.double_blocks[0].img_norm1(img), shift, scale)

        run = StackRun(self, img, txt, (vec, pe), (vec, pe), (TXT, IMG, 0), {}, frozenset(), block_residual, {},
                       modulated)  # fmt: skip
        return run() if stack_hook is None else stack_hook(img, vec, run), pe


class DiffusersFBC:
    """diffusers' First-Block-Cache state and rule, transcribed; the blocks run in a plain loop."""

    def __init__(self, model, threshold):
        self.model, self.threshold = model, threshold
        self.head_block_output = self.head_block_residual = self.tail_block_residuals = None
        self.mask = []

    def step(self, img, txt, vec, pe):
        ctx = lambda kind, i: AttentionContext(kind, i, TXT, IMG, 0, 0, {})  # noqa: E731
        head_img, head_txt = self.model.double_blocks[0](img, txt, vec, pe, ctx("double", 0))
        hidden_states_residual = head_img - img
        if self.head_block_residual is None:
            should_compute = True
        else:
            absmean = (hidden_states_residual - self.head_block_residual).abs().mean()
            diff = (absmean / self.head_block_residual.abs().mean()).item()
            should_compute = diff > self.threshold
        self.mask.append(should_compute)
        if not should_compute:
            return self.tail_block_residuals + head_img
        self.head_block_output, self.head_block_residual = head_img, hidden_states_residual
        img, txt = head_img, head_txt
        for i, block in enumerate(self.model.double_blocks[1:], start=1):
            img, txt = block(img, txt, vec, pe, ctx("double", i))
        seq = torch.cat((txt, img), dim=1)
        for i, block in enumerate(self.model.single_blocks):
            last = i == len(self.model.single_blocks) - 1
            seq = block(seq, vec, pe, ctx("single", i), None, TXT if last else 0)
        self.tail_block_residuals = seq - self.head_block_output
        return seq


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    model = Toy().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape) * 0.5 / p.shape[-1] ** 0.5)
    return model


def trajectory(toy, hook_or_oracle, oracle=False):
    gen = torch.Generator().manual_seed(4)
    img, txt = torch.randn(1, IMG, D, generator=gen), torch.randn(1, TXT, D, generator=gen)
    vecs = [torch.randn(1, D, generator=gen) * 0.1 + 1 for _ in range(STEPS)]
    outs = []
    with torch.no_grad():
        for step in range(STEPS):
            vec = vecs[0] + 0.02 * step * vecs[step]  # slowly moving conditioning
            if oracle:
                _, pe = toy(img, txt, vec)
                out = hook_or_oracle.step(img, txt, vec, pe)
            else:
                out, _ = toy(img, txt, vec, hook_or_oracle)
            outs.append(out)
            img = img + 0.05 * out  # the next step's input depends on this one
    return outs


@pytest.mark.parametrize("threshold", [0.05, 0.2])
def test_fbcache_matches_diffusers_rule_step_by_step(toy, threshold):
    ours, oracle = FirstBlockCache(threshold), DiffusersFBC(toy, threshold)
    got, want = trajectory(toy, ours), trajectory(toy, oracle, oracle=True)
    assert ours.computed == oracle.mask
    assert not all(ours.computed) and ours.computed[0]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_fbcache_threshold_zero_is_bit_identical_to_no_cache(toy):
    cache = FirstBlockCache(0.0)
    assert all(torch.equal(a, b) for a, b in zip(trajectory(toy, cache), trajectory(toy, None)))
    assert all(cache.computed)


def test_first_block_then_rest_equals_the_whole_stack(toy):
    gen = torch.Generator().manual_seed(5)
    img, txt, vec = torch.randn(2, IMG, D, generator=gen), torch.randn(2, TXT, D, generator=gen), torch.randn(2, D)
    calls = []

    def residual(kind, index, tokens):
        calls.append((kind, index))
        return torch.full_like(tokens, 0.1 * (index + 1))

    def split(img, vec, run):
        return run.rest(*run.first_block())

    with torch.no_grad():
        whole, _ = toy(img, txt, vec, block_residual=residual)
        order = list(calls)
        calls.clear()
        parts, _ = toy(img, txt, vec, split, block_residual=residual)
    assert torch.equal(whole, parts) and calls == order


def test_fbcache_refuses_gradients(toy):
    with pytest.raises(StepCacheError, match="gradients"):
        toy(torch.randn(1, IMG, D), torch.randn(1, TXT, D), torch.randn(1, D), FirstBlockCache(0.1))
