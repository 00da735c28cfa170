"""Fuzz LoRA loading: generated LoRA files through ``apply_lora`` of tiny FLUX.1 and FLUX.2 DiTs.

Each case starts from a valid LoRA for the model (random layers, ranks, alphas and dtypes, written by the family's
own writer in one of its layouts), saves it as a file and applies one mutation. The oracle decides where it can:

- no mutation, or a float16/bfloat16 copy: must apply, and change exactly the layers generated (``ok``);
- a NaN/Inf or two-valued alpha, NaN/Inf values, down/up ranks that differ, a width the layer does not have,
  matrices that are not 2-D, complex matrices, a block index beyond the model's depth, metadata naming another
  base model, no tensors at all: must be refused with a typed error;
- renamed or dropped keys, integer or bool matrices: either is fine, but a refusal must be typed.

Half the cases fuse the LoRA into the weights instead of adding a side path; every applied LoRA is removed again,
and the model must be left with no side path and its original weights, bit for bit.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from diffstudio.lora import LoraWeights
from diffstudio.nn import delta_linears
from diffstudio.testing import import_file
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import Tensor, nn

harness = import_file(Path(__file__).resolve().parent / "harness.py")

EXAMPLES = int(os.environ.get("DIFFSTUDIO_FUZZ_LORA_EXAMPLES", 3000 if harness.LONG else 150))
MUTATIONS = ("none", "half", "alpha_nan", "alpha_inf", "alpha_pair", "value_nan", "value_inf", "rank", "width",
             "ndim1", "ndim3", "complex", "beyond", "metadata", "empty", "drop_up", "rename", "int",
             "bool")  # fmt: skip
MUST_FAIL = {"alpha_nan", "alpha_inf", "alpha_pair", "value_nan", "value_inf", "rank", "width", "ndim1", "ndim3",
             "complex", "beyond", "metadata", "empty"}  # fmt: skip
MAY_FAIL = {"drop_up", "rename", "int", "bool"}


@dataclass
class Family:
    name: str
    model: nn.Module
    layouts: dict[str, Callable[[dict[str, LoraWeights]], tuple[dict[str, Tensor], dict[str, str]]]]
    apply: Callable[..., Any]
    remove: Callable[[nn.Module, str], None]
    other_base: str

    def __post_init__(self) -> None:
        self.original = {k: v.detach().clone() for k, v in self.model.state_dict().items()}


def _flux1() -> Family:
    from diffstudio_flux1.lora import apply_lora, remove_lora
    from diffstudio_flux1.lora_formats import layouts
    from diffstudio_flux1.model import Flux
    from diffstudio_flux1.params import FluxParams

    params = FluxParams(hidden_size=64, num_heads=2, depth=2, depth_single_blocks=2, vec_in_dim=8, context_in_dim=16,
                        mlp_ratio=2.0, axes_dim=(4, 14, 14))  # fmt: skip
    writers = {fmt.name: fmt.from_canonical for fmt in layouts() if fmt.from_canonical is not None}
    return Family("flux1", Flux(params).eval(), writers, apply_lora, remove_lora, "flux-2-klein-4b/lora")  # type: ignore[arg-type]


def _flux2() -> Family:
    from diffstudio_flux2.lora import apply_lora, remove_lora
    from diffstudio_flux2.lora_formats import layouts
    from diffstudio_flux2.model import Flux2
    from diffstudio_flux2.params import Flux2Params

    params = Flux2Params(in_channels=16, context_in_dim=24, hidden_size=32, num_heads=2, depth=2,
                         depth_single_blocks=2, axes_dim=(4, 4, 4, 4), mlp_ratio=3.0,
                         use_guidance_embed=False)  # fmt: skip
    writers = {fmt.name: fmt.from_canonical for fmt in layouts() if fmt.from_canonical is not None}
    return Family("flux2", Flux2(params).eval(), writers, apply_lora, remove_lora, "flux-1-dev/lora")  # type: ignore[arg-type]


@pytest.fixture(scope="module", params=["flux1", "flux2"])
def family(request: pytest.FixtureRequest) -> Family:
    pytest.importorskip(f"diffstudio_{request.param}")
    torch.manual_seed(0)
    return _flux1() if request.param == "flux1" else _flux2()


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz-lora") / "lora.safetensors"


def canonical(model: nn.Module, rng: random.Random) -> dict[str, LoraWeights]:
    layers = sorted(delta_linears(model), key=lambda item: item[0])
    chosen = rng.sample(layers, rng.randint(1, min(6, len(layers))))
    lora = {}
    for path, layer in chosen:
        rank = rng.choice([1, 2, 4])
        alpha = rng.choice([None, float(rank), 0.5, 16.0])
        down = torch.randn(rank, layer.in_features, generator=torch.Generator().manual_seed(rng.randrange(2**31)))
        up = torch.randn(layer.out_features, rank, generator=torch.Generator().manual_seed(rng.randrange(2**31)))
        lora[path] = LoraWeights(down * 0.1, up * 0.1, alpha)
    return lora


def _first(state: dict[str, Tensor], *marks: str) -> str | None:
    return next((key for key in state if any(mark in key for mark in marks)), None)


def mutate(state: dict[str, Tensor], metadata: dict[str, str], what: str, rng: random.Random, fam: Family) -> None:
    """Apply one mutation (see the module docstring) to a written LoRA, in place."""
    down = _first(state, "lora_A", "lora_down")
    up = _first(state, "lora_B", "lora_up")
    assert down is not None and up is not None
    if what in ("alpha_nan", "alpha_inf", "alpha_pair"):
        value = {"alpha_nan": torch.tensor(float("nan")), "alpha_inf": torch.tensor(float("inf")),
                 "alpha_pair": torch.tensor([1.0, 2.0])}[what]  # fmt: skip
        module = down.rsplit(".lora_", 1)[0]
        state[f"{module}.alpha"] = value
    elif what in ("value_nan", "value_inf"):
        target = rng.choice([down, up])
        state[target] = state[target].clone()
        state[target].view(-1)[rng.randrange(state[target].numel())] = float("nan" if what == "value_nan" else "inf")
    elif what == "rank":
        state[up] = torch.randn(state[up].shape[0], state[up].shape[1] + 1)
    elif what == "width":
        state[down] = torch.randn(state[down].shape[0], state[down].shape[1] + 3)
    elif what == "ndim1":
        state[down] = state[down].reshape(-1).clone()
    elif what == "ndim3":
        state[up] = state[up].reshape(1, *state[up].shape).clone()
    elif what == "complex":
        for key in (down, up):
            state[key] = state[key].to(torch.complex64)
    elif what == "metadata":
        metadata["modelspec.architecture"] = fam.other_base
    elif what == "empty":
        state.clear()
    elif what == "drop_up":
        del state[up]
    elif what == "rename":
        key = rng.choice(sorted(state))
        state[key.replace("blocks", "blokcs", 1) if rng.random() < 0.5 else "x" + key] = state.pop(key)
    elif what in ("int", "bool", "half"):
        dtype = {"int": torch.int32, "bool": torch.bool, "half": rng.choice([torch.float16, torch.bfloat16])}[what]
        for key in [k for k in state if not k.endswith(".alpha")]:
            state[key] = state[key].to(dtype)


class WrongMatchError(Exception):
    """A valid LoRA changed other layers than the ones generated (counted as untyped: it fails the suite)."""


def apply_case(fam: Family, path: Path, expected: int | None, fuse: bool) -> None:
    report = fam.apply(fam.model, path, name="fuzz", fuse=fuse)
    try:
        if expected is not None and report.modules_matched != expected:
            raise WrongMatchError(f"applied to {report.modules_matched} layers, generated {expected}: {report}")
    finally:
        fam.remove(fam.model, "fuzz")


@settings(max_examples=EXAMPLES)
@given(seed=st.integers(0, 2**32), what=st.sampled_from(MUTATIONS), layout=st.integers(0, 2), fuse=st.booleans())
def test_fuzz_lora_files(family: Family, scratch: Path, seed: int, what: str, layout: int, fuse: bool) -> None:
    rng = random.Random(seed)
    lora = canonical(family.model, rng)
    if what == "beyond":  # a block the model does not have, with the shapes of one it has (FLUX.1 vs FLUX.2)
        layer = dict(delta_linears(family.model))["double_blocks.0.img_attn.qkv"]
        lora["double_blocks.40.img_attn.qkv"] = LoraWeights(torch.randn(2, layer.in_features),
                                                            torch.randn(layer.out_features, 2))  # fmt: skip
    fmt = sorted(family.layouts)[layout % len(family.layouts)]
    state, metadata = family.layouts[fmt](lora)
    state = {key: value.detach().clone().contiguous() for key, value in state.items()}
    metadata = dict(metadata)
    mutate(state, metadata, what, rng, family)
    save_file(state, str(scratch), metadata=metadata or None)
    should_fail = True if what in MUST_FAIL else None if what in MAY_FAIL else False
    expected = len(lora) if should_fail is False else None
    example = f"{family.name} {fmt} {what} fuse={fuse} seed={seed} keys={sorted(state)[:6]}"
    harness.check(f"lora-{family.name}", lambda: apply_case(family, scratch, expected, fuse),
                  should_fail=should_fail, example=example)  # fmt: skip
    assert not [name for _, layer in delta_linears(family.model) for name in layer.deltas], "a side path was left"
    changed = [k for k, v in family.model.state_dict().items() if not torch.equal(v, family.original[k])]
    assert not changed, f"weights not restored after remove: {changed[:3]} <- {example}"
