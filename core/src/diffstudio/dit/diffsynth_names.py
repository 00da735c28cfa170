"""DiffSynth-Studio FLUX.1 layer names (LoRA-Encoder and LoRAFusion keys) <-> BFL paths of the DiT's Linears.

Both files name each of the 304 LoRA-capable DiT Linears by its DiffSynth module name with ``.`` written as
``___`` (``blocks___0___attn___a_to_qkv``, ``single_blocks___3___to_qkv_mlp``). diffstudio's DiT uses BFL names
(``double_blocks.0.img_attn.qkv``, ``single_blocks.3.linear1``), the names canonical LoRAs use. The fused layers
have the same output order in both (q|k|v, q|k|v|mlp, shift|scale|gate), so a layer maps to a layer 1:1.
"""

from __future__ import annotations

import re

DOUBLE = {
    "attn.a_to_qkv": "img_attn.qkv", "attn.a_to_out": "img_attn.proj", "ff_a.0": "img_mlp.0",
    "ff_a.2": "img_mlp.2", "norm1_a.linear": "img_mod.lin",
    "attn.b_to_qkv": "txt_attn.qkv", "attn.b_to_out": "txt_attn.proj", "ff_b.0": "txt_mlp.0",
    "ff_b.2": "txt_mlp.2", "norm1_b.linear": "txt_mod.lin",
}  # fmt: skip
"""Double-block layer (DiffSynth suffix -> BFL suffix), in DiffSynth's order."""

SINGLE = {"to_qkv_mlp": "linear1", "proj_out": "linear2", "norm.linear": "modulation.lin"}
"""Single-block layer (DiffSynth suffix -> BFL suffix), in DiffSynth's order."""

_KEY = re.compile(r"^(blocks|single_blocks)___(\d+)___(.+)$")


def bfl_path(key: str) -> str | None:
    """``blocks___0___attn___a_to_qkv`` -> ``double_blocks.0.img_attn.qkv``; None for a name of no DiT layer."""
    match = _KEY.match(key)
    if match is None:
        return None
    kind, index, suffix = match.group(1), match.group(2), match.group(3).replace("___", ".")
    table = DOUBLE if kind == "blocks" else SINGLE
    if suffix not in table:
        return None
    return f"{'double_blocks' if kind == 'blocks' else 'single_blocks'}.{index}.{table[suffix]}"


def diffsynth_key(path: str) -> str | None:
    """``double_blocks.0.img_attn.qkv`` -> ``blocks___0___attn___a_to_qkv``; None for a path of no such layer."""
    match = re.match(r"^(double_blocks|single_blocks)\.(\d+)\.(.+)$", path)
    if match is None:
        return None
    table = DOUBLE if match.group(1) == "double_blocks" else SINGLE
    inverse = {bfl: ds for ds, bfl in table.items()}
    if match.group(3) not in inverse:
        return None
    kind = "blocks" if match.group(1) == "double_blocks" else "single_blocks"
    return f"{kind}___{match.group(2)}___{inverse[match.group(3)].replace('.', '___')}"


def official_layers(double: int = 19, single: int = 38) -> list[str]:
    """The DiffSynth keys of a DiT's LoRA-capable Linears, in DiffSynth's order (19 + 38 blocks: 304 names)."""
    names = [f"blocks___{i}___{s.replace('.', '___')}" for i in range(double) for s in DOUBLE]
    return names + [f"single_blocks___{i}___{s.replace('.', '___')}" for i in range(single) for s in SINGLE]


def layer_type(key: str) -> str | None:
    """``blocks___0___attn___a_to_qkv`` -> ``attn___a_to_qkv`` (the ``proj_dict`` key); None for other names."""
    match = _KEY.match(key)
    if match is None or bfl_path(key) is None:
        return None
    return match.group(3)
