"""FLUX.1 LoRA layouts and their conversion to the canonical form of :mod:`diffstudio.lora`.

The canonical form maps a module path of the DiT (BFL names, e.g. ``double_blocks.0.img_attn.qkv``) or, under
the ``text_encoder.`` prefix, of the CLIP text model (transformers-5 names, e.g.
``text_encoder.encoder.layers.0.self_attn.q_proj``) to ``LoraWeights(down, up, alpha)``. Layouts read:

* ``flux1/diffusers``: diffusers / PEFT (``transformer.transformer_blocks.0.attn.to_q.lora_A.weight``, with or
  without ``transformer.`` / ``base_model.model.`` prefixes and PEFT's ``.default``; ``text_encoder.*`` for CLIP).
* ``flux1/kohya``: sd-scripts (``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight``, ``.alpha``,
  ``lora_te1_text_model_encoder_layers_0_self_attn_q_proj`` for CLIP).
* ``flux1/bfl``: BFL names, bare or under ComfyUI's ``diffusion_model.`` (``lora_A``/``lora_B`` or
  ``lora_down``/``lora_up`` with ``.alpha``).
* ``flux1/xlabs``: XLabs (``double_blocks.0.processor.qkv_lora1.down.weight``, ``proj_lora1``, ``qkv_lora2``,
  ``proj_lora2``; single blocks ``qkv_lora`` / ``proj_lora``), no alphas.
* ``flux1/diffsynth``: DiffSynth-Studio's own DiT names (``blocks.0.attn.a_to_qkv.lora_A.default.weight``,
  ``single_blocks.0.to_qkv_mlp``), as its trainer writes them without ``--align_to_opensource_format``.

Split projections (diffusers' ``to_q/to_k/to_v``, ``proj_mlp``; XLabs' shared-down q/k/v) become one LoRA on the
fused BFL layer: the downs are stacked along the rank and the ups placed block-diagonally at their rows, so the
update is exactly the sum of the parts. When all parts have the same ``alpha / rank`` factor the fused pair
keeps it (rank and alpha scaled together); otherwise each part's factor is folded into its up block. diffusers'
final norm stores (scale, shift) where BFL stores (shift, scale), so that LoRA's up rows are swapped.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from diffstudio.lora import LoraError as LoraError  # the family's base LoRA error lives in core
from diffstudio.lora import LoraFormatError, LoraWeights, alpha_value
from diffstudio.types import LoraFormat
from torch import Tensor

from diffstudio_flux1.convert import (
    DIT_DOUBLE,
    DIT_DOUBLE_FUSED,
    DIT_SINGLE,
    DIT_SINGLE_FUSED,
    DIT_TOP,
    bfl_to_diffusers_modules,
    swap_halves,
)

TEXT_PREFIX = "text_encoder."
DIFFUSERS, KOHYA, BFL, XLABS, DIFFSYNTH = (f"flux1/{n}" for n in ("diffusers", "kohya", "bfl", "xlabs", "diffsynth"))


@dataclass
class ParsedLora:
    """A LoRA in canonical form, with the file keys behind each layer and the keys that were not understood."""

    lora: dict[str, LoraWeights]
    sources: dict[str, list[str]]
    unmatched: list[str] = field(default_factory=list)


@dataclass
class _Part:
    target: str  # canonical module path
    slot: int  # position among the fused parts (q, k, v[, mlp]); 0 for unfused layers
    parts: int  # number of parts of the fused layer
    down: Tensor
    up: Tensor
    factor: float
    keys: list[str]
    swap: bool = False


_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".down.weight", "down"), (".up.weight", "up"), (".alpha", "alpha"),
)  # fmt: skip


def _group(state: Mapping[str, Tensor]) -> tuple[dict[str, dict[str, Tensor]], dict[str, dict[str, str]], list[str]]:
    """Group file tensors by module: ``{module: {"down"|"up"|"alpha": tensor}}``, their keys, and leftovers."""
    groups: dict[str, dict[str, Tensor]] = {}
    keys: dict[str, dict[str, str]] = {}
    other: list[str] = []
    for key, tensor in state.items():
        for suffix, kind in _SUFFIXES:
            if key.endswith(suffix):
                module = key[: -len(suffix)]
                groups.setdefault(module, {})[kind] = tensor
                keys.setdefault(module, {})[kind] = key
                break
        else:
            other.append(key)
    return groups, keys, other


def _factor(group: Mapping[str, Tensor], rank: int, module: str) -> float:
    alpha = group.get("alpha")
    return 1.0 if alpha is None else alpha_value(alpha, f"{module}.alpha") / rank


Resolver = Callable[[str], list[tuple[str, int, int, bool]] | None]
"""File module name -> ``[(canonical path, slot, parts, swap rows)]``; several entries for a shared-down split."""


def _assemble(state: Mapping[str, Tensor], resolve: Resolver) -> ParsedLora:
    groups, keys, unmatched = _group(state)
    parts: dict[str, list[_Part]] = {}
    for module, group in groups.items():
        names = sorted(keys[module].values())
        targets = resolve(module)
        if targets is None or "down" not in group or "up" not in group:
            unmatched.extend(names)
            continue
        if group["down"].is_complex() or group["up"].is_complex():
            raise LoraFormatError(f"{module}: the LoRA matrices are complex numbers ({group['down'].dtype})")
        down, up = group["down"].float(), group["up"].float()
        if down.ndim == 4:  # 1x1 conv LoRAs of some trainers
            down, up = down.flatten(1), up.flatten(1)
        if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
            raise LoraFormatError(f"{module}: down {tuple(down.shape)} and up {tuple(up.shape)} do not form a pair")
        if down.shape[0] == 0:
            raise LoraFormatError(f"{module}: down {tuple(down.shape)} has rank 0")
        factor = _factor(group, down.shape[0], module)
        ups = up.chunk(len(targets), dim=0) if len(targets) > 1 else (up,)
        for (target, slot, count, swap), piece in zip(targets, ups):
            parts.setdefault(target, []).append(_Part(target, slot, count, down, piece, factor, names, swap))
    lora: dict[str, LoraWeights] = {}
    sources: dict[str, list[str]] = {}
    for target, group_parts in parts.items():
        lora[target] = _fuse(group_parts)
        sources[target] = sorted({k for p in group_parts for k in p.keys})
    return ParsedLora(lora, sources, sorted(unmatched))


def _fuse(parts: Sequence[_Part]) -> LoraWeights:
    """One pair from the parts of a (possibly fused) layer: downs stacked, ups block-diagonal at their rows."""
    if len(parts) == 1 and parts[0].parts == 1:
        p = parts[0]
        up = swap_halves(p.up) if p.swap else p.up
        return LoraWeights(p.down, up, None if p.factor == 1.0 else p.factor * p.down.shape[0])
    count = parts[0].parts
    widths = {p.down.shape[1] for p in parts}
    if len(widths) > 1:
        names = sorted({k for p in parts for k in p.keys})
        raise LoraFormatError(
            f"{parts[0].target}: the parts {', '.join(names[:6])} read inputs of different widths {sorted(widths)}"
        )
    rows = {p.slot: p.up.shape[0] for p in parts}
    if count == 4 and 3 not in rows:  # single-block linear1 without a proj_mlp part: FLUX.1's MLP is 4 x hidden
        rows[3] = 4 * next(iter(rows.values()))
    sizes = [rows.get(slot, next(iter(rows.values()))) for slot in range(count)]
    offsets = [sum(sizes[:slot]) for slot in range(count)]
    same = len({p.factor for p in parts}) == 1
    rank = sum(p.down.shape[0] for p in parts)
    up = torch.zeros(sum(sizes), rank)
    downs, column = [], 0
    for p in sorted(parts, key=lambda q: q.slot):
        r = p.down.shape[0]
        up[offsets[p.slot] : offsets[p.slot] + p.up.shape[0], column : column + r] = p.up * (1.0 if same else p.factor)
        downs.append(p.down)
        column += r
    factor = parts[0].factor if same else 1.0
    return LoraWeights(torch.cat(downs, dim=0), up, None if factor == 1.0 else factor * rank)


# --- name resolvers

_BLOCK = re.compile(r"^(double_blocks|single_blocks|transformer_blocks|single_transformer_blocks|blocks)\.(\d+)\.(.+)$")
_BFL_INNER = {
    "double_blocks": set(DIT_DOUBLE) | set(DIT_DOUBLE_FUSED),
    "single_blocks": set(DIT_SINGLE) | set(DIT_SINGLE_FUSED),
}
_BFL_INNER["double_blocks"] -= {k for k in DIT_DOUBLE if k.endswith("_norm")}
_BFL_INNER["single_blocks"] -= {k for k in DIT_SINGLE if k.endswith("_norm")}
_BFL_TOP = set(DIT_TOP)


def _bfl(module: str) -> list[tuple[str, int, int, bool]] | None:
    if module in _BFL_TOP:
        return [(module, 0, 1, False)]
    m = _BLOCK.match(module)
    if m and m.group(1) in _BFL_INNER and m.group(3) in _BFL_INNER[m.group(1)]:
        return [(module, 0, 1, False)]
    return None


def _diffusers_dit(module: str) -> list[tuple[str, int, int, bool]] | None:
    top = {v: k for k, v in DIT_TOP.items()}
    if module in top:
        return [(top[module], 0, 1, top[module] == "final_layer.adaLN_modulation.1")]
    m = _BLOCK.match(module)
    if m is None or m.group(1) not in ("transformer_blocks", "single_transformer_blocks"):
        return None
    double = m.group(1) == "transformer_blocks"
    kind, index, inner = ("double_blocks" if double else "single_blocks"), m.group(2), m.group(3)
    plain = {v: k for k, v in (DIT_DOUBLE if double else DIT_SINGLE).items()}
    if inner in plain:
        return [(f"{kind}.{index}.{plain[inner]}", 0, 1, False)]
    for fused, names in (DIT_DOUBLE_FUSED if double else DIT_SINGLE_FUSED).items():
        if inner in names:
            return [(f"{kind}.{index}.{fused}", names.index(inner), len(names), False)]
    return None


_CLIP_LINEAR = re.compile(r"^encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$")


def _clip(module: str) -> list[tuple[str, int, int, bool]] | None:
    inner = module.removeprefix("text_model.")
    return [(TEXT_PREFIX + inner, 0, 1, False)] if _CLIP_LINEAR.match(inner) else None


def _strip_diffusers(module: str) -> str:
    return module.removeprefix("base_model.model.").replace(".default", "")


def _resolve_diffusers(module: str) -> list[tuple[str, int, int, bool]] | None:
    module = _strip_diffusers(module)
    if module.startswith(TEXT_PREFIX):
        return _clip(module[len(TEXT_PREFIX) :])
    return _diffusers_dit(module.removeprefix("transformer."))


def _kohya_tables() -> tuple[dict[str, str], dict[str, str]]:
    """Underscored kohya names -> BFL module names (DiT) and CLIP module names, for up to 64 / 48 blocks."""
    dit: dict[str, str] = {name.replace(".", "_"): name for name in _BFL_TOP}
    for kind, inners in _BFL_INNER.items():
        for i in range(64):
            dit.update({f"{kind}.{i}.{inner}".replace(".", "_"): f"{kind}.{i}.{inner}" for inner in inners})
    clip: dict[str, str] = {}
    for i in range(48):
        for inner in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1",
                      "mlp.fc2"):  # fmt: skip
            clip[f"text_model_encoder_layers_{i}_{inner}".replace(".", "_")] = f"encoder.layers.{i}.{inner}"
    return dit, clip


_KOHYA_DIT, _KOHYA_CLIP = _kohya_tables()


def _resolve_kohya(module: str) -> list[tuple[str, int, int, bool]] | None:
    if module.startswith("lora_unet_") and module[len("lora_unet_") :] in _KOHYA_DIT:
        return [(_KOHYA_DIT[module[len("lora_unet_") :]], 0, 1, False)]
    for prefix in ("lora_te1_", "lora_te_"):
        if module.startswith(prefix) and module[len(prefix) :] in _KOHYA_CLIP:
            return [(TEXT_PREFIX + _KOHYA_CLIP[module[len(prefix) :]], 0, 1, False)]
    return None


def _resolve_bfl(module: str) -> list[tuple[str, int, int, bool]] | None:
    for prefix in ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer."):
        module = module.removeprefix(prefix)
    return _bfl(module.replace(".default", ""))


_XLABS = {"qkv_lora1": "img_attn.qkv", "proj_lora1": "img_attn.proj", "qkv_lora2": "txt_attn.qkv",
          "proj_lora2": "txt_attn.proj"}  # fmt: skip


def _resolve_xlabs(module: str) -> list[tuple[str, int, int, bool]] | None:
    m = re.fullmatch(r"(?:diffusion_model\.)?(double_blocks|single_blocks)\.(\d+)\.processor\.(\w+)", module)
    if m is None:
        return None
    kind, index, name = m.groups()
    if kind == "double_blocks" and name in _XLABS:
        return [(f"double_blocks.{index}.{_XLABS[name]}", 0, 1, False)]
    if kind == "single_blocks" and name == "qkv_lora":  # q, k, v rows of linear1 (shared down), not the MLP
        return [(f"single_blocks.{index}.linear1", slot, 4, False) for slot in range(3)]
    if kind == "single_blocks" and name == "proj_lora":
        return [(f"single_blocks.{index}.linear2", 0, 1, False)]
    return None


_DIFFSYNTH_DOUBLE = {
    "attn.a_to_qkv": "img_attn.qkv", "attn.b_to_qkv": "txt_attn.qkv", "attn.a_to_out": "img_attn.proj",
    "attn.b_to_out": "txt_attn.proj", "ff_a.0": "img_mlp.0", "ff_a.2": "img_mlp.2", "ff_b.0": "txt_mlp.0",
    "ff_b.2": "txt_mlp.2", "norm1_a.linear": "img_mod.lin", "norm1_b.linear": "txt_mod.lin",
}  # fmt: skip
_DIFFSYNTH_SINGLE = {"to_qkv_mlp": "linear1", "proj_out": "linear2", "norm.linear": "modulation.lin"}
_DIFFSYNTH_TOP = {
    "x_embedder": "img_in", "context_embedder": "txt_in", "final_proj_out": "final_layer.linear",
    "final_norm_out.linear": "final_layer.adaLN_modulation.1",
    "time_embedder.timestep_embedder.0": "time_in.in_layer", "time_embedder.timestep_embedder.2": "time_in.out_layer",
    "guidance_embedder.timestep_embedder.0": "guidance_in.in_layer",
    "guidance_embedder.timestep_embedder.2": "guidance_in.out_layer",
    "pooled_text_embedder.0": "vector_in.in_layer", "pooled_text_embedder.2": "vector_in.out_layer",
}  # fmt: skip


def _resolve_diffsynth(module: str) -> list[tuple[str, int, int, bool]] | None:
    module = _strip_diffusers(module).removeprefix("pipe.dit.")
    if module in _DIFFSYNTH_TOP:
        return [(_DIFFSYNTH_TOP[module], 0, 1, False)]
    m = _BLOCK.match(module)
    if m and m.group(1) == "blocks" and m.group(3) in _DIFFSYNTH_DOUBLE:
        return [(f"double_blocks.{m.group(2)}.{_DIFFSYNTH_DOUBLE[m.group(3)]}", 0, 1, False)]
    if m and m.group(1) == "single_blocks" and m.group(3) in _DIFFSYNTH_SINGLE:
        return [(f"single_blocks.{m.group(2)}.{_DIFFSYNTH_SINGLE[m.group(3)]}", 0, 1, False)]
    return None


# --- detection


def _detect_xlabs(keys: Sequence[str]) -> bool:
    return any(".processor." in k for k in keys)


def _detect_kohya(keys: Sequence[str]) -> bool:
    return not _detect_xlabs(keys) and any(k.startswith(("lora_unet_", "lora_te1_", "lora_te_")) for k in keys)


def _detect_diffsynth(keys: Sequence[str]) -> bool:
    marks = (".a_to_qkv.", ".b_to_qkv.", ".to_qkv_mlp.", "final_proj_out.", ".ff_a.")
    return any(k.startswith(("blocks.", "pipe.dit.blocks.")) or any(m in k for m in marks) for k in keys)


def _detect_diffusers(keys: Sequence[str]) -> bool:
    if _detect_xlabs(keys) or _detect_kohya(keys) or _detect_diffsynth(keys):
        return False
    names = [_strip_diffusers(k) for k in keys]
    return any(
        n.startswith(("transformer.", TEXT_PREFIX, "transformer_blocks.", "single_transformer_blocks.")) for n in names
    )


def _detect_bfl(keys: Sequence[str]) -> bool:
    if _detect_xlabs(keys) or _detect_kohya(keys) or _detect_diffsynth(keys) or _detect_diffusers(keys):
        return False
    return any("double_blocks." in k or "single_blocks." in k or k.startswith("diffusion_model.") for k in keys)


PARSERS: dict[str, Callable[[Mapping[str, Tensor]], ParsedLora]] = {
    DIFFUSERS: lambda sd: _assemble(sd, _resolve_diffusers),
    KOHYA: lambda sd: _assemble(sd, _resolve_kohya),
    BFL: lambda sd: _assemble(sd, _resolve_bfl),
    XLABS: lambda sd: _assemble(sd, _resolve_xlabs),
    DIFFSYNTH: lambda sd: _assemble(sd, _resolve_diffsynth),
}


# --- writers (canonical -> published layouts)


def _write_kohya(lora: Mapping[str, LoraWeights]) -> tuple[dict[str, Tensor], dict[str, str]]:
    out: dict[str, Tensor] = {}
    for path, w in lora.items():
        if path.startswith(TEXT_PREFIX):
            name = "lora_te1_text_model_" + path[len(TEXT_PREFIX) :].replace(".", "_")
        else:
            name = "lora_unet_" + path.replace(".", "_")
        out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = w.down, w.up
        out[f"{name}.alpha"] = torch.tensor(float(w.alpha if w.alpha is not None else w.rank))
    return out, {}


def _write_bfl(lora: Mapping[str, LoraWeights]) -> tuple[dict[str, Tensor], dict[str, str]]:
    out: dict[str, Tensor] = {}
    for path, w in lora.items():
        if path.startswith(TEXT_PREFIX):
            raise LoraFormatError(f"the BFL/ComfyUI layout holds DiT layers only, not {path}")
        out[f"diffusion_model.{path}.lora_down.weight"], out[f"diffusion_model.{path}.lora_up.weight"] = w.down, w.up
        out[f"diffusion_model.{path}.alpha"] = torch.tensor(float(w.alpha if w.alpha is not None else w.rank))
    return out, {}


def _write_diffusers(lora: Mapping[str, LoraWeights]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Canonical -> diffusers PEFT keys (``transformer.*`` / ``text_encoder.*``, ``lora_A`` / ``lora_B``).

    Fused BFL layers are split the way diffusers names them (q/k/v; single blocks also ``proj_mlp``): every part
    gets the whole ``down`` and its rows of ``up``, which is exact. ``alpha / rank`` is folded into ``up``, so
    the file needs no alpha (diffusers then uses ``alpha = rank``), and the final norm's up rows are swapped back
    to diffusers' (scale, shift) order (the DiT converter's own mapping, ``bfl_to_diffusers_modules``).
    """
    out: dict[str, Tensor] = {}
    for path, w in lora.items():
        up = w.up * (1.0 if w.alpha is None else w.alpha / w.rank)
        if path.startswith(TEXT_PREFIX):
            parts = [(f"text_encoder.text_model.{path[len(TEXT_PREFIX) :]}", up)]
        else:
            split = bfl_to_diffusers_modules(path, up, w.down.shape[1])  # hidden = the layer's in_features
            if split is None:
                raise LoraFormatError(f"{path} is not a FLUX.1 DiT layer the diffusers layout can name")
            parts = [(f"transformer.{name}", piece) for name, piece in split]
        for name, piece in parts:
            out[f"{name}.lora_A.weight"] = w.down.clone()  # one tensor per key: files must not share storage
            out[f"{name}.lora_B.weight"] = piece.clone()
    return out, {}


def layouts() -> list[LoraFormat]:
    """Every FLUX.1 LoRA layout (for the plugin's ``register_lora_formats`` hook)."""
    return [
        LoraFormat(DIFFUSERS, "flux1", _detect_diffusers, PARSERS[DIFFUSERS], _write_diffusers),
        LoraFormat(KOHYA, "flux1", _detect_kohya, PARSERS[KOHYA], _write_kohya),
        LoraFormat(BFL, "flux1", _detect_bfl, PARSERS[BFL], _write_bfl),
        LoraFormat(XLABS, "flux1", _detect_xlabs, PARSERS[XLABS]),
        LoraFormat(DIFFSYNTH, "flux1", _detect_diffsynth, PARSERS[DIFFSYNTH]),
    ]


def module_kind(path: str) -> str:
    """``double_blocks.3.img_attn.qkv`` -> ``double_blocks.*.img_attn.qkv`` (for match reports)."""
    return re.sub(r"\.\d+\.", ".*.", path)
