"""Key renames between BFL's LDM autoencoder layout and diffusers' ``AutoencoderKL`` / ``AutoencoderKLFlux2``.

Both FLUX families' VAEs are the same LDM stack (:mod:`diffstudio.nn.ldm`), so their converters share these:

* ``{encoder,decoder}.{conv_in,conv_out}`` keep their names; ``norm_out`` <-> ``conv_norm_out``;
* ``encoder.down.i.block.j`` <-> ``encoder.down_blocks.i.resnets.j`` and ``down.i.downsample.conv`` <->
  ``down_blocks.i.downsamplers.0.conv``;
* the decoder's levels are numbered in reverse: BFL's ``up.i`` is diffusers' ``up_blocks.(n - 1 - i)``;
* ``mid.block_1/2`` <-> ``mid_block.resnets.0/1``; ``mid.attn_1.{norm,q,k,v,proj_out}`` <->
  ``mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}``, whose 1x1 convs ``(C, C, 1, 1)`` are linear
  weights ``(C, C)`` in diffusers;
* a resnet's ``nin_shortcut`` <-> ``conv_shortcut``.

A family passes its top-level table (:data:`LDM_VAE_TOP` plus, for FLUX.2, the quant convs and ``bn``), a name
for messages and its error type. Converters are pure and reject unknown keys.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["LDM_VAE_TOP", "ldm_vae_bfl_to_diffusers", "ldm_vae_diffusers_to_bfl"]

LDM_VAE_TOP: Mapping[str, str] = {  # BFL module -> diffusers module
    "encoder.conv_in": "encoder.conv_in",
    "encoder.conv_out": "encoder.conv_out",
    "encoder.norm_out": "encoder.conv_norm_out",
    "decoder.conv_in": "decoder.conv_in",
    "decoder.conv_out": "decoder.conv_out",
    "decoder.norm_out": "decoder.conv_norm_out",
}
"""The top-level modules every LDM autoencoder has (FLUX.1's AE has exactly these)."""

Fail = Callable[[str, list[str]], Exception]
"""``fail(what, keys)`` builds the family's error for keys that do not belong to the layout."""

_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_ATTN_BACK = {v: k for k, v in _ATTN.items()}
_RESNET_PARTS = {"norm1", "conv1", "norm2", "conv2"}
_ATTN_PROJ = re.compile(r"(encoder|decoder)\.mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)")


def _resnet_part(part: str, to_diffusers: bool) -> str | None:
    if part in _RESNET_PARTS:
        return part
    if to_diffusers:
        return "conv_shortcut" if part == "nin_shortcut" else None
    return "nin_shortcut" if part == "conv_shortcut" else None


def _levels(keys: Sequence[str], pattern: str) -> int:
    indices = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(indices) + 1 if indices else 0


def _to_diffusers(module: str, top: Mapping[str, str], up_levels: int) -> str | None:
    if module in top:
        return top[module]
    if m := re.fullmatch(r"encoder\.down\.(\d+)\.block\.(\d+)\.(\w+)", module):
        part = _resnet_part(m.group(3), True)
        return None if part is None else f"encoder.down_blocks.{m.group(1)}.resnets.{m.group(2)}.{part}"
    if m := re.fullmatch(r"encoder\.down\.(\d+)\.downsample\.conv", module):
        return f"encoder.down_blocks.{m.group(1)}.downsamplers.0.conv"
    if m := re.fullmatch(r"decoder\.up\.(\d+)\.block\.(\d+)\.(\w+)", module):
        part = _resnet_part(m.group(3), True)
        level = up_levels - 1 - int(m.group(1))
        return None if part is None else f"decoder.up_blocks.{level}.resnets.{m.group(2)}.{part}"
    if m := re.fullmatch(r"decoder\.up\.(\d+)\.upsample\.conv", module):
        return f"decoder.up_blocks.{up_levels - 1 - int(m.group(1))}.upsamplers.0.conv"
    if m := re.fullmatch(r"(encoder|decoder)\.mid\.block_([12])\.(\w+)", module):
        part = _resnet_part(m.group(3), True)
        return None if part is None else f"{m.group(1)}.mid_block.resnets.{int(m.group(2)) - 1}.{part}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid\.attn_1\.(\w+)", module):
        attn = _ATTN.get(m.group(2))
        return None if attn is None else f"{m.group(1)}.mid_block.attentions.0.{attn}"
    return None


def _to_bfl(module: str, top: Mapping[str, str], up_levels: int) -> str | None:
    back = {v: k for k, v in top.items()}
    if module in back:
        return back[module]
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)", module):
        part = _resnet_part(m.group(3), False)
        return None if part is None else f"encoder.down.{m.group(1)}.block.{m.group(2)}.{part}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv", module):
        return f"encoder.down.{m.group(1)}.downsample.conv"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)", module):
        part = _resnet_part(m.group(3), False)
        level = up_levels - 1 - int(m.group(1))
        return None if part is None else f"decoder.up.{level}.block.{m.group(2)}.{part}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv", module):
        return f"decoder.up.{up_levels - 1 - int(m.group(1))}.upsample.conv"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.([01])\.(\w+)", module):
        part = _resnet_part(m.group(3), False)
        return None if part is None else f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.{part}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(\w+(?:\.0)?)", module):
        attn = _ATTN_BACK.get(m.group(2))
        return None if attn is None else f"{m.group(1)}.mid.attn_1.{attn}"
    return None


def _convert(
    sd: Mapping[str, Tensor], top: Mapping[str, str], to_diffusers: bool, what: str, fail: Fail
) -> dict[str, Tensor]:
    module_map = _to_diffusers if to_diffusers else _to_bfl
    up_levels = _levels(list(sd), r"decoder\.up\.(\d+)\." if to_diffusers else r"decoder\.up_blocks\.(\d+)\.")
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, tensor in sd.items():
        module, param = key.rsplit(".", 1)
        new = module_map(module, top, up_levels)
        if new is None:
            unknown.append(key)
            continue
        if param == "weight" and _ATTN_PROJ.fullmatch(new if to_diffusers else module):
            # diffusers' attention uses Linear (C, C), BFL's 1x1 Conv2d (C, C, 1, 1)
            tensor = tensor.reshape(tensor.shape[:2]) if to_diffusers else tensor.reshape(*tensor.shape, 1, 1)
        out[f"{new}.{param}"] = tensor
    if unknown:
        raise fail(f"keys that are not part of a {what}", unknown)
    return out


def ldm_vae_bfl_to_diffusers(
    sd: Mapping[str, Tensor], *, top: Mapping[str, str], what: str, fail: Fail
) -> dict[str, Tensor]:
    """BFL autoencoder keys -> diffusers keys; a key outside the layout raises ``fail(...)`` naming ``what``."""
    return _convert(sd, top, True, what, fail)


def ldm_vae_diffusers_to_bfl(
    sd: Mapping[str, Tensor], *, top: Mapping[str, str], what: str, fail: Fail
) -> dict[str, Tensor]:
    """Diffusers autoencoder keys -> BFL keys (the inverse of :func:`ldm_vae_bfl_to_diffusers`)."""
    return _convert(sd, top, False, what, fail)
