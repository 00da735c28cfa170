"""Random LoRAs for the tiny FLUX.2 DiTs of conftest.py, written by hand in each published layout.

Nothing here uses diffstudio_flux2.lora: files are named the way the trainers name them, and the dense reference
merges ``W + (alpha / rank) * up @ down`` into a diffusers state dict (or a BFL one) and converts it with the
already-tested DiT converter, so it is independent of the code under test.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from diffstudio_flux2.convert import convert_diffusers_to_bfl_dit
from torch import Tensor, nn

RANKS = (4, 4, 2, 6)
ALPHAS = (2.0, 6.0, 3.0, 8.0, 5.0)


@dataclass
class Pair:
    """One layer's LoRA as a file stores it: down (r, in), up (out, r), alpha (None: factor 1)."""

    down: Tensor
    up: Tensor
    alpha: float | None

    def delta(self) -> Tensor:
        factor = 1.0 if self.alpha is None else self.alpha / self.down.shape[0]
        return factor * (self.up @ self.down)


Spec = dict[str, Pair]


def linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Module name -> (in, out) for every Linear (diffusers names for the reference, BFL names for ours)."""
    return {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def make_spec(shapes: dict[str, tuple[int, int]], seed: int, *, alphas: bool = True, rank: int | None = None) -> Spec:
    """Random pairs of mixed ranks (unless ``rank``) and alphas different from the rank."""
    gen = torch.Generator().manual_seed(seed)
    spec: Spec = {}
    for i, (name, (fan_in, fan_out)) in enumerate(sorted(shapes.items())):
        r = rank or RANKS[i % len(RANKS)]
        down = torch.randn(r, fan_in, generator=gen) / fan_in**0.5
        up = 0.4 * torch.randn(fan_out, r, generator=gen) / r**0.5
        spec[name] = Pair(down, up, ALPHAS[i % len(ALPHAS)] if alphas else None)
    return spec


def diffusers_keys(spec: Spec, prefix: str = "transformer.", adapter: str = "", alpha_tensors: bool = False) -> dict:
    """PEFT keys ``<prefix><name>.lora_A<adapter>.weight`` (+ ``.alpha`` scalars)."""
    sd: dict[str, Tensor] = {}
    for name, p in spec.items():
        sd[f"{prefix}{name}.lora_A{adapter}.weight"] = p.down.contiguous()
        sd[f"{prefix}{name}.lora_B{adapter}.weight"] = p.up.contiguous()
        if alpha_tensors and p.alpha is not None:
            sd[f"{prefix}{name}.alpha"] = torch.tensor(p.alpha)
    return sd


def peft_config(spec: Spec) -> dict[str, Any]:
    """The LoraConfig fields diffusers stores (``transformer.``-scoped), with rank and alpha patterns."""
    r, alpha = RANKS[0], ALPHAS[0]
    config = {
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(spec),
        "rank_pattern": {f"^{n}": p.down.shape[0] for n, p in spec.items() if p.down.shape[0] != r},
        "alpha_pattern": {f"^{n}": p.alpha for n, p in spec.items() if p.alpha != alpha},
    }
    return {f"transformer.{k}": v for k, v in config.items()}


def peft_metadata(spec: Spec) -> dict[str, str]:
    return {"format": "pt", "lora_adapter_metadata": json.dumps(peft_config(spec))}


def bfl_keys(spec: Spec, prefix: str = "diffusion_model.", names: tuple[str, str] = ("lora_A", "lora_B"),
             alphas: bool = True) -> dict[str, Tensor]:
    """BFL names (ComfyUI / ai-toolkit): ``<prefix><name>.lora_A.weight`` (+ ``.alpha``)."""
    sd: dict[str, Tensor] = {}
    for name, p in spec.items():
        sd[f"{prefix}{name}.{names[0]}.weight"] = p.down.contiguous()
        sd[f"{prefix}{name}.{names[1]}.weight"] = p.up.contiguous()
        if alphas and p.alpha is not None:
            sd[f"{prefix}{name}.alpha"] = torch.tensor(p.alpha)
    return sd


def kohya_keys(spec: Spec) -> dict[str, Tensor]:
    """``lora_unet_<name with underscores>.lora_down.weight`` / ``lora_up`` / ``alpha``."""
    sd: dict[str, Tensor] = {}
    for name, p in spec.items():
        key = "lora_unet_" + name.replace(".", "_")
        sd[f"{key}.lora_down.weight"] = p.down.contiguous()
        sd[f"{key}.lora_up.weight"] = p.up.contiguous()
        sd[f"{key}.alpha"] = torch.tensor(p.alpha if p.alpha is not None else float(p.down.shape[0]))
    return sd


def dense_reference(case: Any, helpers: ModuleType, diffusers_specs: list[tuple[Spec, float]] = (),
                    bfl_specs: list[tuple[Spec, float]] = ()) -> nn.Module:
    """Our DiT built from weights with every LoRA merged by hand (diffusers-named ones before conversion)."""
    sd = {k: v.detach().clone() for k, v in case.reference.state_dict().items()}
    for spec, scale in diffusers_specs:
        for name, p in spec.items():
            sd[f"{name}.weight"] = sd[f"{name}.weight"] + scale * p.delta()
    bfl = convert_diffusers_to_bfl_dit(sd)
    for spec, scale in bfl_specs:
        for name, p in spec.items():
            bfl[f"{name}.weight"] = bfl[f"{name}.weight"] + scale * p.delta()
    return helpers.build_dit({k: v.contiguous() for k, v in bfl.items()})


@torch.no_grad()
def diffusers_output(case: Any, helpers: ModuleType, lora: Any, metadata: dict | None = None) -> Tensor:
    """The diffusers transformer's output after diffusers itself loads ``lora`` (a copy; the fixture is shared).

    A path goes through ``Flux2KleinPipeline.load_lora_weights``; a state dict with a PEFT config through
    ``Flux2Transformer2DModel.load_lora_adapter``.
    """
    from diffusers import Flux2KleinPipeline

    model = copy.deepcopy(case.reference)
    if metadata is not None:
        model.load_lora_adapter(lora, prefix="transformer", metadata=metadata)
    else:
        pipe = Flux2KleinPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=model)
        pipe.load_lora_weights(lora)
    return helpers.run_reference(model, helpers.dit_inputs(), case.guidance)


@torch.no_grad()
def run(model: nn.Module, helpers: ModuleType) -> Tensor:
    out: Tensor = model(**helpers.dit_inputs())
    return out
