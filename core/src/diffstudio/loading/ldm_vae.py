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

import functools
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
_ATTN_PROJ = re.compile(r"(encoder|decoder)\.mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)")

_RULES = (  # (BFL module, diffusers module); each {field} is translated by _FIELDS, in either direction
    ("encoder.down.{i}.block.{j}.{resnet}", "encoder.down_blocks.{i}.resnets.{j}.{resnet}"),
    ("encoder.down.{i}.downsample.conv", "encoder.down_blocks.{i}.downsamplers.0.conv"),
    ("decoder.up.{up}.block.{j}.{resnet}", "decoder.up_blocks.{up}.resnets.{j}.{resnet}"),
    ("decoder.up.{up}.upsample.conv", "decoder.up_blocks.{up}.upsamplers.0.conv"),
    ("{side}.mid.block_{mid}.{resnet}", "{side}.mid_block.resnets.{mid}.{resnet}"),
    ("{side}.mid.attn_1.{attn}", "{side}.mid_block.attentions.0.{attn}"),
)
_FIELDS: Mapping[str, Mapping[str, str] | None] = {  # BFL value -> diffusers value; None: a number
    "i": None,
    "j": None,
    "up": None,  # decoder levels are numbered in reverse: n - 1 - i, its own inverse
    "side": {"encoder": "encoder", "decoder": "decoder"},
    "mid": {"1": "0", "2": "1"},
    "resnet": {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"},
    "attn": _ATTN,
}
_FIELD = re.compile(r"\{(\w+)\}")


@functools.cache
def _values(field: str, to_diffusers: bool) -> Mapping[str, str] | None:
    table = _FIELDS[field]
    return table if table is None or to_diffusers else {v: k for k, v in table.items()}


def _translate(field: str, value: str, up_levels: int, to_diffusers: bool) -> str:
    if field == "up":
        return str(up_levels - 1 - int(value))
    values = _values(field, to_diffusers)
    return value if values is None else values[value]


@functools.cache
def _pattern(template: str, to_diffusers: bool) -> re.Pattern[str]:
    """``template`` with each field as a named group matching that field's values on the source side."""
    pieces: list[str] = []
    last = 0
    for m in _FIELD.finditer(template):
        values = _values(m.group(1), to_diffusers)
        choices = r"\d+" if values is None else "|".join(re.escape(v) for v in values)
        pieces += [re.escape(template[last : m.start()]), f"(?P<{m.group(1)}>{choices})"]
        last = m.end()
    return re.compile("".join([*pieces, re.escape(template[last:])]))


def _rename(module: str, top: Mapping[str, str], up_levels: int, to_diffusers: bool) -> str | None:
    """The other layout's name of ``module``; ``top`` is already oriented source -> target."""
    if module in top:
        return top[module]
    for bfl, diffusers in _RULES:
        source, target = (bfl, diffusers) if to_diffusers else (diffusers, bfl)
        if m := _pattern(source, to_diffusers).fullmatch(module):
            found = m.groupdict().items()
            return target.format(**{field: _translate(field, value, up_levels, to_diffusers) for field, value in found})
    return None


def _levels(keys: Sequence[str], pattern: str) -> int:
    indices = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(indices) + 1 if indices else 0


def _convert(
    sd: Mapping[str, Tensor], top: Mapping[str, str], to_diffusers: bool, what: str, fail: Fail
) -> dict[str, Tensor]:
    names = top if to_diffusers else {v: k for k, v in top.items()}
    up_levels = _levels(list(sd), r"decoder\.up\.(\d+)\." if to_diffusers else r"decoder\.up_blocks\.(\d+)\.")
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, tensor in sd.items():
        module, param = key.rsplit(".", 1)
        new = _rename(module, names, up_levels, to_diffusers)
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
