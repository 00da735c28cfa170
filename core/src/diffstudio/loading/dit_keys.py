"""Converter scaffolding for dual-stream DiTs: BFL (canonical) <-> diffusers key layouts from one table.

A family describes its DiT's names once, as a :class:`DitKeyMap` (top-level modules, double- and single-block
modules, the fused projections BFL keeps in one Linear and diffusers splits, the final norm whose (shift, scale)
halves diffusers stores swapped); :meth:`DitKeyMap.to_diffusers` and :meth:`DitKeyMap.to_bfl` convert state dicts
both ways, and :meth:`DitKeyMap.bfl_to_diffusers_modules` maps one module's rows (weights, biases, LoRA ``up``
matrices alike). Converters are pure: they return a new dict and never modify their input; unknown keys and
incomplete fused groups are a typed error naming the keys.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from diffstudio.errors import CheckpointError
from diffstudio.loading.convert import swap_halves

StateDict = Mapping[str, Tensor]
_BLOCK = re.compile(r"^(double_blocks|single_blocks|transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")
_BFL_BLOCKS = {"double_blocks": "transformer_blocks", "single_blocks": "single_transformer_blocks"}


def fail(error: type[CheckpointError], what: str, keys: list[str]) -> CheckpointError:
    """A conversion error (to raise) listing up to 12 of ``keys``."""
    shown = ", ".join(keys[:12]) + (f", ... ({len(keys)} in all)" if len(keys) > 12 else "")
    return error(f"{what}: {shown}")


def bfl_param(module: str, param: str) -> str:
    """The BFL parameter name: BFL's RMSNorm stores its gain as ``scale``, diffusers' as ``weight``."""
    return "scale" if module.endswith("_norm") and param == "weight" else param


@dataclass(frozen=True)
class DitKeyMap:
    """The BFL <-> diffusers names of one family's DiT.

    Attributes:
        what: The family for messages (``"FLUX.1"``).
        diffusers_class: The diffusers model class for messages (``"FluxTransformer2DModel"``).
        error: The family's conversion error class.
        top: BFL module -> diffusers module, outside the blocks.
        double: Inside ``double_blocks.N`` -> inside ``transformer_blocks.N``.
        single: Inside ``single_blocks.N`` -> inside ``single_transformer_blocks.N``.
        double_fused: A fused BFL projection in a double block -> its diffusers parts (q, k, v).
        single_fused: The same in a single block; a fourth part (FLUX.1's ``proj_mlp``) takes the rows after
            three ``hidden``-sized ones.
        swapped: The module whose (shift, scale) rows diffusers stores as (scale, shift).
    """

    what: str
    diffusers_class: str
    error: type[CheckpointError]
    top: Mapping[str, str]
    double: Mapping[str, str]
    single: Mapping[str, str]
    double_fused: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    single_fused: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    swapped: str = "final_layer.adaLN_modulation.1"

    def split_sizes(self, parts: int, rows: int, hidden: int | None) -> list[int]:
        """Row sizes of a fused projection's parts: equal thirds (q, k, v), or q, k, v of ``hidden`` + the rest."""
        if parts == 3:
            return [rows // 3] * 3
        if hidden is None:
            raise fail(self.error, "cannot tell the hidden size, missing", ["img_in.weight"])
        return [hidden] * 3 + [rows - 3 * hidden]

    def bfl_to_diffusers_modules(
        self, module: str, rows: Tensor, hidden: int | None
    ) -> list[tuple[str, Tensor]] | None:
        """A BFL DiT module and a tensor along its output rows -> ``[(diffusers module, its rows)]``.

        Fused projections are split into diffusers' parts, the swapped module's halves exchanged. Returns None for
        a module that is not part of the family's BFL DiT.
        """
        if module in self.top:
            return [(self.top[module], swap_halves(rows) if module == self.swapped else rows)]
        m = _BLOCK.match(module + ".")
        if m is None or m.group(1) not in _BFL_BLOCKS:
            return None
        kind, index, inner = m.group(1), m.group(2), m.group(3).rstrip(".")
        block = _BFL_BLOCKS[kind]
        fused = self.double_fused if kind == "double_blocks" else self.single_fused
        plain = self.double if kind == "double_blocks" else self.single
        if inner in fused:
            sizes = self.split_sizes(len(fused[inner]), rows.shape[0], hidden)
            return [(f"{block}.{index}.{n}", part) for n, part in zip(fused[inner], torch.split(rows, sizes, dim=0))]
        if inner in plain:
            return [(f"{block}.{index}.{plain[inner]}", rows)]
        return None

    def to_diffusers(self, sd: StateDict) -> dict[str, Tensor]:
        """BFL DiT keys -> the diffusers model's keys.

        Raises:
            CheckpointError: (the family's ``error``) a key is not part of the BFL layout.
        """
        hidden = int(sd["img_in.weight"].shape[0]) if "img_in.weight" in sd else None
        out: dict[str, Tensor] = {}
        unknown: list[str] = []
        for key, tensor in sd.items():
            module, param = key.rsplit(".", 1)
            parts = self.bfl_to_diffusers_modules(module, tensor, hidden)
            if parts is None:
                unknown.append(key)
                continue
            dparam = "weight" if param == "scale" else param
            for name, part in parts:
                out[f"{name}.{dparam}"] = part
        if unknown:
            raise fail(self.error, f"keys that are not part of a BFL {self.what} DiT", unknown)
        return out

    def to_bfl(self, sd: StateDict) -> dict[str, Tensor]:
        """The diffusers model's keys -> BFL DiT keys (the layout the family's DiT loads by identity).

        Raises:
            CheckpointError: (the family's ``error``) a key is unknown, or a fused group is incomplete.
        """
        top = {v: k for k, v in self.top.items()}
        inverse = {
            "transformer_blocks": ("double_blocks", {v: k for k, v in self.double.items()}, self.double_fused),
            "single_transformer_blocks": ("single_blocks", {v: k for k, v in self.single.items()}, self.single_fused),
        }
        parts_of = {
            kind: {n: (f, i, len(ns)) for f, ns in fused.items() for i, n in enumerate(ns)}
            for kind, (_, _, fused) in inverse.items()
        }
        out: dict[str, Tensor] = {}
        pending: dict[str, list[Tensor | None]] = {}
        unknown: list[str] = []
        for key, tensor in sd.items():
            module, param = key.rsplit(".", 1)
            if module in top:
                bfl = top[module]
                out[f"{bfl}.{bfl_param(bfl, param)}"] = swap_halves(tensor) if bfl == self.swapped else tensor
                continue
            m = _BLOCK.match(module + ".")
            if m is None or m.group(1) not in inverse:
                unknown.append(key)
                continue
            kind, index, inner = m.group(1), m.group(2), m.group(3).rstrip(".")
            bfl_kind, plain, _ = inverse[kind]
            part = parts_of[kind].get(inner)
            if part is not None:
                name, slot, count = part
                pending.setdefault(f"{bfl_kind}.{index}.{name}.{param}", [None] * count)[slot] = tensor
            elif inner in plain:
                bfl = plain[inner]
                out[f"{bfl_kind}.{index}.{bfl}.{bfl_param(bfl, param)}"] = tensor
            else:
                unknown.append(key)
        if unknown:
            raise fail(self.error, f"keys that are not part of a diffusers {self.diffusers_class}", unknown)
        incomplete = [key for key, parts in pending.items() if any(p is None for p in parts)]
        if incomplete:
            raise fail(self.error, "incomplete q/k/v projections (fused in BFL) for", incomplete)
        for key, parts in pending.items():
            out[key] = torch.cat([p for p in parts if p is not None], dim=0)
        return out
