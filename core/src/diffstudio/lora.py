"""Family-independent LoRA primitives: the canonical form and the side path.

Every family converts the LoRA layouts people publish into one *canonical* form, a mapping from the module path
of one of its :class:`~diffstudio.nn.DeltaLinear` layers (a state-dict prefix such as
``double_blocks.0.img_attn.qkv``) to :class:`LoraWeights`. Applying and removing LoRAs, training them and writing
them back out in a published layout all work on that form, so the trainer and the template media never need to
know a family's key names.

A LoRA on a layer ``y = W x`` adds ``scale * (alpha / rank) * up @ down @ x``, with ``down`` of shape
``(rank, in_features)`` and ``up`` of shape ``(out_features, rank)``; ``alpha=None`` means ``alpha = rank`` (a
factor of 1), which is how PEFT files without alphas behave.

A file is checked before it changes a model (the families call these checks when they read one): its alphas are
finite numbers, one per layer (:func:`alpha_value`); its tensors hold no NaN or Inf (:func:`check_finite`); its
metadata does not name another base model (:func:`check_base_model`); and it names no block index the model lacks
(:func:`check_block_range`). FLUX.1 and FLUX.2 use the same BFL layer names, so a FLUX.1-dev attention LoRA has the
shapes of FLUX.2-klein-4B's layers; the last two checks are what tell them apart.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from diffstudio.errors import CheckpointError
from diffstudio.loading.finite import is_finite
from diffstudio.nn.delta import DeltaLinear, delta_linears

__all__ = [
    "BASE_MODEL_KEYS",
    "AmbiguousLoraFormatError",
    "AppliedLora",
    "CanonicalLora",
    "LoraError",
    "LoraFormatError",
    "LoraMatchError",
    "LoraMergerActiveError",
    "LoraNameError",
    "LoraReport",
    "LoraState",
    "UnknownLoraFormatError",
    "keep_originals",
    "lora_name",
    "lora_state",
    "match_layers",
    "restore_fused",
    "LoraAlphaError",
    "LoraArchitectureError",
    "LoraBaseModelError",
    "LoraDelta",
    "LoraNonFiniteError",
    "LoraShapeError",
    "LoraTargetError",
    "LoraWeights",
    "alpha_value",
    "attach_lora",
    "base_model_family",
    "check_base_model",
    "check_block_range",
    "check_finite",
    "collect_lora",
    "detach_lora",
    "lora_names",
    "merge_lora",
]

BASE_MODEL_KEYS = ("ss_base_model_version", "modelspec.architecture", "base_model", "base_model_version")
"""Safetensors metadata keys that trainers use to record a LoRA's base model (kohya, ai-toolkit, modelspec)."""


class LoraShapeError(CheckpointError, ValueError):
    """A LoRA's down and up matrices do not form a pair, or do not fit the layer they target."""


class LoraAlphaError(CheckpointError, ValueError):
    """A LoRA alpha is not one finite number (NaN, Inf, several values, not a number)."""


class LoraNonFiniteError(CheckpointError):
    """A LoRA's tensors hold NaN or Inf values."""


class LoraBaseModelError(CheckpointError):
    """A LoRA's metadata names a different base model than the one it is applied to."""


class LoraArchitectureError(CheckpointError):
    """A LoRA names layers the model does not have (block indices beyond its depth, another family's layers)."""


class LoraTargetError(CheckpointError, KeyError):
    """A canonical LoRA names a module that is not a ``DeltaLinear`` of the model."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def alpha_value(value: object, where: str) -> float:
    """The alpha ``value`` (a tensor, number or numeric string) as a float, checked.

    Args:
        value: The alpha as the file holds it.
        where: The key or module it comes from, for the message.

    Raises:
        LoraAlphaError: Not exactly one value, not a number, NaN or infinite.
    """
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise LoraAlphaError(f"LoRA alpha {where} must be one number, but it has shape {list(value.shape)}")
        if value.is_complex() or value.dtype == torch.bool:
            raise LoraAlphaError(f"LoRA alpha {where} must be a real number, but it is {value.dtype}")
        number = float(value.detach().reshape(()).float().item())
    elif isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise LoraAlphaError(f"LoRA alpha {where} must be a number, got {type(value).__name__} {value!r:.40}")
    else:
        try:
            number = float(value)
        except (ValueError, OverflowError):
            raise LoraAlphaError(f"LoRA alpha {where} must be a number, got {value!r:.40}") from None
    if not math.isfinite(number):
        raise LoraAlphaError(f"LoRA alpha {where} is {number}; it must be a finite number. The file is damaged.")
    return number


@dataclass
class LoraWeights:
    """One layer's LoRA pair.

    Attributes:
        down: ``A``, shape ``(rank, in_features)``.
        up: ``B``, shape ``(out_features, rank)``.
        alpha: The file's alpha; None means ``rank`` (factor 1).
    """

    down: Tensor
    up: Tensor
    alpha: float | None = None

    def __post_init__(self) -> None:
        if self.down.ndim != 2 or self.up.ndim != 2 or self.down.shape[0] != self.up.shape[1]:
            raise LoraShapeError(
                f"LoRA down {tuple(self.down.shape)} and up {tuple(self.up.shape)} do not form a pair: "
                "expected down (rank, in_features) and up (out_features, rank)"
            )
        if self.down.shape[0] == 0:
            raise LoraShapeError(f"LoRA down {tuple(self.down.shape)} has rank 0")
        if self.down.is_complex() or self.up.is_complex():
            raise LoraShapeError(f"LoRA matrices must be real numbers, not {self.down.dtype} / {self.up.dtype}")
        if self.alpha is not None:
            self.alpha = alpha_value(self.alpha, "of the pair")

    @property
    def rank(self) -> int:
        """The LoRA rank ``r``."""
        return int(self.down.shape[0])

    @property
    def factor(self) -> float:
        """``alpha / rank`` (1.0 when alpha is None)."""
        return 1.0 if self.alpha is None else float(self.alpha) / self.rank

    def delta_weight(self) -> Tensor:
        """The dense update ``factor * up @ down``, shape ``(out_features, in_features)``, float32."""
        return self.factor * (self.up.float() @ self.down.float())


CanonicalLora = dict[str, LoraWeights]
"""Module path of a ``DeltaLinear`` -> its LoRA pair."""


class LoraDelta(nn.Module):
    """A LoRA side path for :meth:`DeltaLinear.add_delta`: ``x -> scale * factor * (x @ down.T) @ up.T``.

    The tensors are parameters (trainable when ``trainable``), moved to the input's device and dtype on the fly
    when they differ, so a delta follows its layer under any memory strategy.
    """

    def __init__(self, weights: LoraWeights, scale: float = 1.0, *, trainable: bool = False) -> None:
        super().__init__()
        self.down = nn.Parameter(weights.down.detach().clone(), requires_grad=trainable)
        self.up = nn.Parameter(weights.up.detach().clone(), requires_grad=trainable)
        self.alpha = weights.alpha
        self.scale = float(scale)

    @property
    def rank(self) -> int:
        """The LoRA rank."""
        return int(self.down.shape[0])

    def weights(self) -> LoraWeights:
        """The current pair (detached), e.g. to save a trained LoRA."""
        return LoraWeights(self.down.detach(), self.up.detach(), self.alpha)

    def forward(self, x: Tensor) -> Tensor:
        """``(..., in_features) -> (..., out_features)``."""
        down: Tensor = self.down
        up: Tensor = self.up
        if down.device != x.device or down.dtype != x.dtype:
            down, up = down.to(x), up.to(x)
        factor = 1.0 if self.alpha is None else float(self.alpha) / self.rank
        out: Tensor = (x @ down.T) @ up.T
        return out * (self.scale * factor)


def attach_lora(
    model: nn.Module,
    lora: Mapping[str, LoraWeights],
    name: str,
    scale: float = 1.0,
    *,
    trainable: bool = False,
) -> dict[str, LoraDelta]:
    """Add one LoRA as side paths named ``name`` on the model's ``DeltaLinear`` layers (never merged).

    Args:
        model: The model (e.g. a DiT) whose layers are :class:`DeltaLinear`.
        lora: Canonical LoRA; every key must name a ``DeltaLinear`` of ``model``.
        name: Side-path name (several LoRAs stack under different names).
        scale: Multiplier of the whole LoRA.
        trainable: Make the LoRA tensors trainable parameters.

    Returns:
        The side paths by module path (their parameters are what a trainer optimises).

    Raises:
        KeyError: a key names no ``DeltaLinear`` of the model (the message lists close layers).
        ValueError: shapes do not fit the layer, or ``name`` is already attached.
    """
    layers = dict(delta_linears(model))
    unknown = [key for key in lora if key not in layers]
    if unknown:
        raise KeyError(
            f"LoRA targets {len(unknown)} module(s) the model does not have, e.g. {unknown[:3]}; "
            f"LoRA-capable layers look like {sorted(layers)[:3]}"
        )
    deltas: dict[str, LoraDelta] = {}
    for key, weights in lora.items():
        layer = layers[key]
        if weights.down.shape[1] != layer.in_features or weights.up.shape[0] != layer.out_features:
            raise LoraShapeError(
                f"LoRA for {key} maps {weights.down.shape[1]} -> {weights.up.shape[0]} features but the layer "
                f"is {layer.in_features} -> {layer.out_features}"
            )
        deltas[key] = LoraDelta(weights, scale, trainable=trainable).to(layer.weight.device)
    for key, delta in deltas.items():
        layers[key].add_delta(name, delta)
    return deltas


def detach_lora(model: nn.Module, name: str) -> int:
    """Remove the side paths named ``name`` from every layer; return how many were removed."""
    removed = 0
    for _, layer in delta_linears(model):
        if layer.remove_delta(name, missing_ok=True) is not None:
            removed += 1
    return removed


def lora_names(model: nn.Module) -> list[str]:
    """Names of the side paths attached anywhere in ``model``, sorted."""
    names: set[str] = set()
    for _, layer in delta_linears(model):
        names.update(layer.deltas)
    return sorted(names)


def collect_lora(model: nn.Module, name: str) -> CanonicalLora:
    """Read back the LoRA attached as ``name`` (e.g. after training) in canonical form."""
    found: CanonicalLora = {}
    for key, layer in delta_linears(model):
        delta = layer.deltas.get(name)
        if isinstance(delta, LoraDelta):
            found[key] = delta.weights()
    return found


def merge_lora(model: nn.Module, lora: Mapping[str, LoraWeights], scale: float = 1.0) -> None:
    """Fuse a LoRA into the base weights in place (``W += scale * factor * up @ down``); subtract with -scale."""
    layers = dict(delta_linears(model))
    gated = [key for key in lora if key in layers and layers[key].combiner is not None]
    if gated:
        raise LoraMergerActiveError(
            f"cannot fuse a LoRA into {len(gated)} layer(s) whose side paths a LoRA merger gates (e.g. "
            f"{', '.join(gated[:3])}): the merger needs each LoRA's output separately. Load it as a side path "
            "(fuse=False), or disable the merger first"
        )
    with torch.no_grad():
        for key, weights in lora.items():
            layer = layers[key]
            layer.weight.add_((scale * weights.delta_weight()).to(layer.weight))


# -- checks before a LoRA changes a model ----------------------------------------------------------------------


def check_finite(lora: Mapping[str, LoraWeights], source: str) -> None:
    """Refuse a LoRA whose matrices hold NaN or Inf (it would turn every image into NaN).

    Raises:
        LoraNonFiniteError: names the layers at fault and the source.
    """
    bad = [path for path, weights in lora.items() if not (is_finite(weights.down) and is_finite(weights.up))]
    if bad:
        shown = ", ".join(bad[:6]) + (f" ... ({len(bad)} layers)" if len(bad) > 6 else "")
        raise LoraNonFiniteError(
            f"The LoRA {source} holds NaN or Inf values in {shown}; it would produce a NaN image. The file is "
            "damaged or was saved from a diverged training run; use another checkpoint of it."
        )


def base_model_family(metadata: Mapping[str, str] | None) -> tuple[str, str] | None:
    """The base model family a LoRA's metadata names: ``(family, "key=value")``, or None when it names none.

    Families: ``flux1``, ``flux2``, ``sdxl``, ``sd3``, ``sd1``, ``sd2`` (from values such as ``flux1``,
    ``flux-1-dev/lora``, ``flux-2-klein-4b/lora``, ``sdxl_base_v1-0``, ``stable-diffusion-xl-v1-base/lora``).
    """
    for key in BASE_MODEL_KEYS:
        value = (metadata or {}).get(key)
        if not isinstance(value, str):
            continue
        norm = re.sub(r"[^a-z0-9]", "", value.lower())
        for family, pattern in _FAMILY_PATTERNS:
            if re.search(pattern, norm):
                return family, f"{key}={value!r:.60}"
    return None


_FAMILY_PATTERNS = (
    ("flux1", r"flux1"),
    ("flux2", r"flux2"),
    ("sdxl", r"sdxl|stablediffusionxl"),
    ("sd3", r"sd3|stablediffusion3"),
    ("sd2", r"^sd2|^sdv2|stablediffusionv?2"),
    ("sd1", r"^sd1|^sdv1|stablediffusionv?1"),
)


def check_base_model(metadata: Mapping[str, str] | None, family: str, what: str, source: str) -> None:
    """Refuse a LoRA whose metadata names another base model family than ``family``.

    Args:
        metadata: The LoRA file's safetensors metadata.
        family: The model's family, e.g. ``"flux2"``.
        what: The model, for the message, e.g. ``"this FLUX.2 DiT"``.
        source: The LoRA, for the message.

    Raises:
        LoraBaseModelError: the metadata names another family.
    """
    named = (base_model_family({key: value}) for key, value in (metadata or {}).items() if key in BASE_MODEL_KEYS)
    found = next((item for item in named if item is not None and item[0] != family), None)  # any key naming another
    if found is not None:
        raise LoraBaseModelError(
            f"The LoRA {source} was made for {found[0]} (its metadata says {found[1]}), not for {what}. Both "
            "families may share layer names and widths, so it could load but would change the images "
            "meaninglessly; use a LoRA trained for this model."
        )


_BLOCK_INDEX = re.compile(r"^(\w+)\.(\d+)\.")


def check_block_range(paths: Iterable[str], layers: Iterable[str], what: str, source: str) -> None:
    """Refuse a LoRA that names block indices beyond the model's depth (it was made for a deeper model).

    For every ``<blocks>.<i>.`` prefix the model's layer names use, the LoRA's paths must stay below the model's
    block count; prefixes the model does not use are left to the caller's match report.

    Raises:
        LoraArchitectureError: names the blocks, the model's count and the source.
    """
    depth: dict[str, int] = {}
    for name in layers:
        match = _BLOCK_INDEX.match(name)
        if match:
            depth[match.group(1)] = max(depth.get(match.group(1), 0), int(match.group(2)) + 1)
    beyond: dict[str, int] = {}
    for path in paths:
        match = _BLOCK_INDEX.match(path)
        if match and match.group(1) in depth and int(match.group(2)) >= depth[match.group(1)]:
            beyond[match.group(1)] = max(beyond.get(match.group(1), 0), int(match.group(2)) + 1)
    if beyond:
        shown = "; ".join(f"{kind} up to index {top - 1}, the model has {depth[kind]}" for kind, top in beyond.items())
        raise LoraArchitectureError(
            f"The LoRA {source} names blocks {what} does not have ({shown}): it was made for a deeper model "
            "(e.g. a FLUX.1-dev LoRA on FLUX.2-klein, whose layers have the same names and widths). Use a LoRA "
            "trained for this model."
        )


# ----------------------------------------------------------------------------------------------------------
# What a family's apply_lora / remove_lora share: errors, the report, the per-model state, matching, fusing
# ----------------------------------------------------------------------------------------------------------


class LoraError(CheckpointError):
    """Base class of the errors a family's LoRA functions raise (a file or state dict unusable with its model)."""


class LoraFormatError(LoraError):
    """A LoRA's tensors are inconsistent (a pair that does not fit, a duplicate, an unknown module to write)."""


class UnknownLoraFormatError(LoraError):
    """No LoRA layout of the family recognises a file's keys."""


class AmbiguousLoraFormatError(LoraError):
    """More than one LoRA layout of the family recognises a file's keys."""


class LoraMatchError(LoraError):
    """A LoRA does not fit the model: it matches none of its layers, or a matched layer has other sizes."""


class LoraNameError(LoraError, KeyError):
    """A LoRA name is unknown (remove) or already in use (apply)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclass(frozen=True)
class LoraReport:
    """What a family's ``apply_lora`` did.

    Attributes:
        name: The name the LoRA is applied under (pass it to ``remove_lora``).
        format: The layout read, e.g. ``"flux2/kohya"`` (``"canonical"`` for a canonical LoRA).
        source: Where it came from (a path, or ``"<state dict>"``).
        scale: The multiplier it was applied with.
        fused: True when merged into the weights, False for a side path.
        tensors_matched: File tensors (``down``/``up``/``alpha``) that went into applied layers.
        modules: Applied layers counted per kind, e.g. ``{"double_blocks.*.img_attn.qkv": 2}``.
        unmatched_keys: File keys that were not applied (unknown names, layers this model lacks, half pairs).
    """

    name: str
    format: str
    source: str
    scale: float
    fused: bool
    tensors_matched: int
    modules: dict[str, int]
    unmatched_keys: list[str] = field(default_factory=list)

    @property
    def modules_matched(self) -> int:
        """Number of layers the LoRA changes."""
        return sum(self.modules.values())

    def __str__(self) -> str:
        how = "fused into the weights" if self.fused else "as a side path"
        kinds = ", ".join(f"{kind} x{count}" for kind, count in sorted(self.modules.items()))
        text = (
            f"LoRA {self.name!r} ({self.format}, from {self.source}) applied {how} with scale {self.scale:g}: "
            f"{self.tensors_matched} tensors matched {self.modules_matched} layers ({kinds})."
        )
        if self.unmatched_keys:
            shown = ", ".join(self.unmatched_keys[:8]) + (" ..." if len(self.unmatched_keys) > 8 else "")
            return text + f" {len(self.unmatched_keys)} keys were not applied: {shown}."
        return text + " Every key was applied."


@dataclass
class AppliedLora:
    """One LoRA applied to a model: its report and the canonical layers that matched."""

    report: LoraReport
    lora: CanonicalLora


@dataclass
class LoraState:
    """The LoRAs a family applied to one model, and the weights fused LoRAs changed.

    Attributes:
        applied: Name -> applied LoRA, in application order.
        originals: Layer path -> its weight (on the CPU) before the first fused LoRA touched it.
    """

    applied: dict[str, AppliedLora] = field(default_factory=dict)
    originals: dict[str, Tensor] = field(default_factory=dict)


def lora_state(model: nn.Module, attribute: str) -> LoraState:
    """The :class:`LoraState` a family keeps on ``model`` under ``attribute`` (created on first use)."""
    state = model.__dict__.get(attribute)
    if not isinstance(state, LoraState):
        state = model.__dict__[attribute] = LoraState()
    return state


def lora_name(requested: str | None, description: str, taken: Iterable[str], remove_hint: str) -> str:
    """The name to apply a LoRA under: ``requested``, or the source's stem (``lora`` for dicts) made unique.

    Raises:
        LoraNameError: ``requested`` is taken; ``remove_hint`` (e.g. ``"remove_lora(dit, 'x')"``) says what to do.
    """
    used = set(taken)
    if requested is not None:
        if requested in used:
            raise LoraNameError(f"a LoRA named {requested!r} is already applied; {remove_hint} first")
        return requested
    stem = (Path(description).stem if not description.startswith("<") else "lora") or "lora"
    name, counter = stem, 1
    while name in used:
        counter += 1
        name = f"{stem}_{counter}"
    return name


def match_layers(
    lora: Mapping[str, LoraWeights],
    sources: Mapping[str, list[str]],
    unmatched: Iterable[str],
    layers: Mapping[str, DeltaLinear],
    description: str,
    what: str,
) -> tuple[CanonicalLora, list[str]]:
    """Keep the LoRA layers the model has; return them and the file keys of the rest (in file order).

    Args:
        lora: The parsed canonical LoRA.
        sources: Layer path -> the file keys it came from.
        unmatched: File keys the parser could not map.
        layers: The model's LoRA-capable layers (``DeltaLinear``) by canonical path.
        description: The LoRA's source, for messages.
        what: The model, for messages (``"FLUX.2"``).

    Raises:
        LoraMatchError: A matched layer has other sizes, or no layer matches.
    """
    matched = {path: w for path, w in lora.items() if path in layers}
    missing = [key for path in lora if path not in layers for key in sources.get(path, [path])]
    rest = list(unmatched) + missing

    def sizes(path: str) -> tuple[int, int]:
        return layers[path].in_features, layers[path].out_features

    wrong = [
        f"{path} (LoRA {w.down.shape[1]} -> {w.up.shape[0]}, layer {sizes(path)[0]} -> {sizes(path)[1]})"
        for path, w in matched.items()
        if (w.down.shape[1], w.up.shape[0]) != sizes(path)
    ]
    if wrong:
        raise LoraMatchError(
            f"{description} does not fit this model: {len(wrong)} layer(s) have other sizes, e.g. "
            f"{'; '.join(wrong[:3])}. The LoRA was trained for another {what} variant."
        )
    if not matched:
        raise LoraMatchError(
            f"{description} matches none of the model's layers ({len(rest)} keys, e.g. {', '.join(rest[:6])}). "
            f"The model's LoRA-capable layers look like {', '.join(sorted(layers)[:4])} (BFL names; diffusers and "
            "kohya names are mapped onto them). The LoRA is for another model or variant."
        )
    return matched, rest


def keep_originals(state: LoraState, layers: Mapping[str, DeltaLinear], paths: Iterable[str]) -> None:
    """Copy (to the CPU) the weights of ``paths`` a fused LoRA is about to change, unless already kept."""
    with torch.no_grad():
        for path in paths:
            if path not in state.originals:
                state.originals[path] = layers[path].weight.detach().to("cpu", copy=True)


def restore_fused(state: LoraState, layers: Mapping[str, DeltaLinear], removed: AppliedLora) -> None:
    """Undo a fused LoRA exactly: reset its layers to the kept weights and merge the still-fused ones again, in order.

    ``removed`` must already be out of ``state.applied``; kept weights no fused LoRA needs any more are dropped.
    """
    with torch.no_grad():
        for path in removed.lora:
            weight = layers[path].weight
            weight.copy_(state.originals[path].to(weight.device))
            again = [a for a in state.applied.values() if a.report.fused and path in a.lora]
            for other in again:
                weight.add_((other.report.scale * other.lora[path].delta_weight()).to(weight))
            if not again:
                del state.originals[path]


class LoraMergerActiveError(LoraError):
    """A LoRA was to be fused into weights whose side paths a LoRA merger (a ``DeltaLinear`` combiner) gates."""
