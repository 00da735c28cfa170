"""The layer-wise memory policy on a small declared model: exactness, budget, placeholders, fp8, hook, errors."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
import torch
from diffstudio import Runtime
from diffstudio.builtin.fallbacks import ResidentStrategy
from diffstudio.errors import ConfigError
from diffstudio.lora import LoraWeights, attach_lora
from diffstudio.nn import DeltaLinear
from diffstudio.types import MemoryBudget
from diffstudio.vram import DeviceLedger, LayerwiseStrategy, ModelLayout, spread_order
from torch import nn

F32, BF16, FP8 = torch.float32, torch.bfloat16, torch.float8_e4m3fn


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin1 = DeltaLinear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.lin2 = nn.Linear(16, 8)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.lin2(torch.nn.functional.gelu(self.norm(self.lin1(h))))


class Toy(nn.Module):
    """``(B, 4) -> (B, 4)`` through 4 residual blocks; ``scale`` is a pinned buffer read outside any leaf."""

    repeated_blocks = ("blocks",)
    memory_leaves = (nn.Linear, "*Norm")
    keep_in_high_precision = ("*norm*",)

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.blocks = nn.ModuleList([Block() for _ in range(4)])
        self.out = nn.Linear(8, 4)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.out(h) * self.scale


def toy(seed: int = 0, dtype: torch.dtype = BF16) -> Toy:
    torch.manual_seed(seed)
    model = Toy().eval().requires_grad_(False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape))
    return model.to(dtype)


def budget(store: Any = BF16, limit: int | None = None, device: str = "cpu", **kw: Any) -> MemoryBudget:
    return MemoryBudget(device, store, device, store, "cpu", store, "cpu", F32, limit, True, **kw)


def managed(store: Any = BF16, limit: int | None = None, device: str = "cpu") -> tuple[Toy, LayerwiseStrategy]:
    strategy = LayerwiseStrategy("toy", budget(store, limit, device), DeviceLedger("cpu", limit))
    return strategy.apply(toy()), strategy


X = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))


def reference() -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = toy().float()(X)
    return out


def test_metadata_is_read_with_defaults_and_checked() -> None:
    layout = ModelLayout.of(Toy())
    assert layout.repeated_blocks == ("blocks",) and layout.high_precision("blocks.0.norm.weight")
    names = [name for name, _ in layout.leaves_of(Toy())]
    assert names[:4] == ["inp", "blocks.0.lin1", "blocks.0.norm", "blocks.0.lin2"] and names[-1] == "out"
    assert [name for name, _ in layout.blocks(Toy())] == [f"blocks.{i}" for i in range(4)]
    assert ModelLayout.of(nn.Linear(2, 2)) == ModelLayout()

    class Bad(nn.Module):
        repeated_blocks = "blocks"

    with pytest.raises(TypeError, match="repeated_blocks"):
        ModelLayout.of(Bad())


def test_spread_order_is_a_permutation_with_spread_prefixes() -> None:
    assert spread_order(8)[:2] == [0, 4] and sorted(spread_order(8)) == list(range(8))
    assert sorted(spread_order(5)) == list(range(5)) and spread_order(0) == []


@pytest.mark.parametrize("limit", [None, 0, 1500, 2500, 10**6])
def test_exact_storage_is_bitwise_identical_for_every_budget(limit: int | None) -> None:
    model, strategy = managed(BF16, limit)
    with torch.no_grad():
        first, second = model(X), model(X)
    assert torch.equal(first, reference()) and torch.equal(second, reference())
    report = strategy.report()
    assert report.units == 6 and report.leaves == 14
    if limit == 0:
        assert report.streamed_units == 6
    elif limit in (None, 10**6):
        assert report.resident_units == 6
    else:
        assert 0 < report.resident_units < 6


def test_a_lora_side_path_attached_after_apply_still_applies() -> None:
    lora = {"blocks.1.lin1": LoraWeights(torch.randn(2, 8), torch.randn(16, 2), alpha=1.0)}
    plain = toy().float()
    attach_lora(plain, lora, "style")
    model, _ = managed(BF16, 0)
    attach_lora(model, lora, "style")
    with torch.no_grad():
        assert torch.equal(model(X), plain(X))
        assert not torch.equal(model(X), reference())


def test_placeholders_outside_forward() -> None:
    model, _ = managed(BF16, 0)
    weight = model.blocks[0].lin1.weight
    assert weight.shape == (16, 8) and weight.dtype == F32 and weight.device.type == "cpu"
    assert torch.isnan(weight).all() and weight.untyped_storage().nbytes() == 4
    with pytest.raises(RuntimeError):
        weight.add_(1)
    assert model.scale.dtype == BF16 or model.scale.dtype == F32  # pinned buffers are real tensors
    assert torch.isfinite(model.scale).all()


def test_gradients_reach_a_trainable_lora_on_a_streamed_base() -> None:
    lora = {"blocks.2.lin1": LoraWeights(torch.randn(2, 8), torch.zeros(16, 2))}
    plain = toy().float()
    ours, _ = managed(BF16, 0)
    grads = []
    for model in (plain, ours):
        deltas = attach_lora(model, lora, "train", trainable=True)
        model(X).square().sum().backward()
        grads.append(deltas["blocks.2.lin1"].up.grad)
    assert grads[1] is not None and torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5])
def test_budget_accounting_never_exceeds_the_limit(fraction: float) -> None:
    total = LayerwiseStrategy("probe", budget(BF16), DeviceLedger("cpu")).apply(toy())
    full = sum(p.numel() * 2 for p in total.parameters()) + 4 * 4  # bf16 weights + the f32 pinned buffer
    limit = int(fraction * full)
    model, strategy = managed(BF16, limit)
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(model(X), reference())
    ledger = strategy.ledger
    units = [u.preparing_bytes for u in strategy.units]
    window = max(units) + max(leaf.cast_bytes for u in strategy.units for leaf in u.leaves)
    pinned = sum(t.compute_bytes for t in strategy.pinned)  # placed whatever the budget: counted first
    assert pinned == 16 and ledger.peak_resident <= max(limit, pinned)
    assert ledger.peak_total <= max(limit, window + pinned)
    strategy.offload()
    assert ledger.resident_bytes == 0 and ledger.transient == 0


def test_fp8_storage_keeps_high_precision_tensors_and_stays_close() -> None:
    model, strategy = managed(FP8, None)
    stores = {t.name: t.offload.dtype for u in strategy.units for t in u.tensors}
    assert stores["blocks.0.lin1.weight"] == FP8 and stores["blocks.0.norm.weight"] == F32
    with torch.no_grad():
        out = model(X)
    cosine = torch.nn.functional.cosine_similarity(out.flatten(), reference().flatten(), dim=0)
    assert cosine > 0.99 and not torch.equal(out, reference())


def test_a_model_without_leaves_moves_as_one_piece() -> None:
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)).to(BF16)
    expected = net.float()(X)
    net = net.to(BF16)
    strategy = LayerwiseStrategy("whole", budget(BF16), DeviceLedger("cpu"))
    strategy.apply(net)
    assert not strategy.units and len(strategy.pinned) == 4
    strategy.onload()
    assert net[0].weight.dtype == F32 and torch.equal(net(X), expected)


class Tied(nn.Module):
    """T5's layout: one embedding under two names (``shared`` is ``encoder.embed``), a head tied to it."""

    memory_leaves = (nn.Linear, nn.Embedding)

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Embedding(10, 8)
        self.encoder = nn.Module()
        self.encoder.embed = self.shared  # the same module: its forward is the only reader of its weight
        self.encoder.mid = nn.Linear(8, 8)
        self.head = nn.Linear(8, 10, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.encoder.mid(self.encoder.embed(ids)))
        return out


def tied(tie_head: bool) -> Tied:
    torch.manual_seed(3)
    model = Tied().eval().requires_grad_(False)
    if tie_head:
        model.head.weight = nn.Parameter(torch.randn(10, 8), requires_grad=False)
        model.shared.weight = model.head.weight  # held by two modules: read outside the embedding's forward
    return model.to(BF16)


@pytest.mark.parametrize("tie_head", [False, True])
def test_an_aliased_module_streams_once_and_tied_weights_stay_pinned(tie_head: bool) -> None:
    ids = torch.tensor([[1, 4, 9, 0]])
    with torch.no_grad():
        expected = tied(tie_head).float()(ids)
    model = tied(tie_head)
    layer = LayerwiseStrategy("tied", budget(BF16, 0), DeviceLedger("cpu", 0))
    layer.apply(model)
    names = [t.name for u in layer.units for t in u.tensors]
    pinned = [t.name for t in layer.pinned]
    if tie_head:  # the tie spans two modules (read outside the embedding's forward): pinned for the whole stage
        assert sorted(pinned) == ["head.weight", "shared.weight"]
        assert names == ["encoder.mid.weight", "encoder.mid.bias"]
    else:  # one module, two names: one leaf, streamed like any other
        assert pinned == [] and names.count("shared.weight") == 1 and "encoder.embed.weight" not in names
        assert layer.report().pinned_bytes == 0
    assert model.shared.weight is model.encoder.embed.weight
    layer.onload()
    with torch.no_grad():
        assert torch.equal(model(ids), expected) and torch.equal(model(ids), expected)
    assert layer.ledger.peak_resident <= layer.report().pinned_bytes


def _runtime() -> Runtime:
    return Runtime(env={}, load_entrypoints=False)


def test_builtin_vram_policy_wraps_managed_models_only() -> None:
    hooks = _runtime().hooks
    plain = MemoryBudget("cpu", F32, "cpu", F32, "cpu", F32, "cpu", F32, None)
    assert isinstance(hooks.vram_policy(toy(), "toy", plain, None), ResidentStrategy)  # type: ignore[arg-type]
    strategy = hooks.vram_policy(toy(), "toy", budget(BF16), None)  # type: ignore[arg-type]
    assert isinstance(strategy, LayerwiseStrategy)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"offload_device": "gpu0"}, "offload_device"),
        ({"preparing_device": "disk"}, "preparing_device"),
        ({"computation_device": "disk"}, "computation_device"),
        ({"onload_dtype": "float7"}, "onload_dtype"),
        ({"computation_dtype": FP8}, "computation_dtype"),
        ({"vram_limit_bytes": -1}, "vram_limit"),
        ({"prefetch_depth": -2}, "vram_prefetch"),
    ],
)
def test_bad_budgets_are_typed_errors_naming_the_field(change: dict[str, Any], field: str) -> None:
    from dataclasses import replace

    bad = replace(budget(BF16), **change)
    with pytest.raises(ConfigError, match=field):
        _runtime().hooks.vram_policy(toy(), "toy", bad, None)  # type: ignore[arg-type]


def test_fp8_on_a_build_without_float8_names_the_field() -> None:
    code = (
        "import torch; del torch.float8_e4m3fn\n"
        "from diffstudio import ModelConfig\n"
        "from diffstudio.errors import ConfigError\n"
        "try:\n    ModelConfig(path='x.safetensors', offload_dtype='float8_e4m3fn')\n"
        "except ConfigError as e:\n    print('ERR', e)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "ERR offload_dtype='float8_e4m3fn'" in done.stdout and "has no float8_e4m3fn" in done.stdout
