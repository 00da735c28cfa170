"""Exact state-dict conversion primitives that family plugins compose into named :class:`Converter` s.

Every function is pure: it takes a mapping of names to tensors and returns a new dict, leaving the input
untouched. Nothing does arithmetic on values: tensors are renamed, concatenated, split or reshaped, so a
conversion followed by its reverse gives back bit-identical tensors. Splits and reshapes return views that
share
memory with their input (zero copy); call ``.clone()`` on them before saving with ``safetensors``, which
refuses
tensors that share storage.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeAlias

from diffstudio.errors import CheckpointError

if TYPE_CHECKING:
    import torch

__all__ = [
    "ConversionError",
    "Converter",
    "StateDict",
    "register_bfl_diffusers",
    "conv_to_linear",
    "fuse_qkv",
    "linear_to_conv",
    "map_tensors",
    "rename_keys",
    "split_qkv",
    "swap_halves",
]

StateDict: TypeAlias = "dict[str, torch.Tensor]"
RenameRule: TypeAlias = "tuple[str | re.Pattern[str], str]"


class ConversionError(CheckpointError):
    """A state dict does not have the keys or shapes a conversion step needs."""


def _require(sd: Mapping[str, torch.Tensor], keys: Sequence[str], step: str) -> None:
    missing = [key for key in keys if key not in sd]
    if missing:
        raise ConversionError(
            f"{step}: the state dict has no {', '.join(repr(k) for k in missing)} ({len(sd)} keys). The "
            f"checkpoint is not in the source format this converter expects."
        )


def rename_keys(
    sd: Mapping[str, torch.Tensor], rules: Sequence[RenameRule], *, keep_unmatched: bool = True
) -> StateDict:
    r"""Rename keys with ordered regex rules; the first rule that matches a key wins.

    A rule ``(pattern, replacement)`` matches when ``re.search`` finds ``pattern`` in the key; the key becomes
    ``pattern.sub(replacement, key)`` (group references like ``\1`` allowed). Anchor patterns with
    ``^``/``$``
    to match whole keys.

    Args:
        sd: Names -> tensors.
        rules: Ordered ``(pattern, replacement)`` pairs.
        keep_unmatched: Keep keys that no rule matches unchanged; if False, they are an error.

    Returns:
        A new dict, in the order of ``sd``, holding the same tensor objects.

    Raises:
        ConversionError: unmatched keys (with ``keep_unmatched=False``), or two keys renamed to one name.
    """
    compiled = [(re.compile(p) if isinstance(p, str) else p, r) for p, r in rules]
    result: StateDict = {}
    origin: dict[str, str] = {}
    unmatched: list[str] = []
    for key, tensor in sd.items():
        new_key = None
        for pattern, replacement in compiled:
            if pattern.search(key):
                new_key = pattern.sub(replacement, key)
                break
        if new_key is None:
            if not keep_unmatched:
                unmatched.append(key)
                continue
            new_key = key
        if new_key in result:
            raise ConversionError(f"rename_keys: both {origin[new_key]!r} and {key!r} become {new_key!r}.")
        origin[new_key] = key
        result[new_key] = tensor
    if unmatched:
        raise ConversionError(
            f"rename_keys: {len(unmatched)} key(s) match no rule: {', '.join(unmatched[:20])}"
            f"{' ...' if len(unmatched) > 20 else ''}."
        )
    return result


def map_tensors(
    sd: Mapping[str, torch.Tensor],
    pattern: str | re.Pattern[str],
    fn: Callable[[torch.Tensor], torch.Tensor],
) -> StateDict:
    """Return a copy of ``sd`` with ``fn`` applied to the tensors whose key contains ``pattern`` (a regex)."""
    compiled = re.compile(pattern) if isinstance(pattern, str) else pattern
    return {key: fn(tensor) if compiled.search(key) else tensor for key, tensor in sd.items()}


def fuse_qkv(sd: Mapping[str, torch.Tensor], q_key: str, k_key: str, v_key: str, out_key: str) -> StateDict:
    """Concatenate three projections along dim 0 into one, e.g. ``[3 * D, D]`` from three ``[D, D]``.

    Args:
        sd: Names -> tensors; must hold ``q_key``, ``k_key``, ``v_key`` (weights ``[O_i, I]`` or biases
            ``[O_i]`` with equal trailing dims).
        q_key: Name of the query projection.
        k_key: Name of the key projection.
        v_key: Name of the value projection.
        out_key: Name of the fused ``[O_q + O_k + O_v, ...]`` tensor.

    Returns:
        A new dict without the three inputs and with ``out_key``, placed where ``q_key`` was.

    Raises:
        ConversionError: a key is missing, ``out_key`` already exists, or the trailing dims differ.
    """
    import torch

    _require(sd, (q_key, k_key, v_key), "fuse_qkv")
    parts = [sd[q_key], sd[k_key], sd[v_key]]
    if len({tuple(p.shape[1:]) for p in parts}) != 1 or parts[0].dim() == 0:
        shapes = ", ".join(str(list(p.shape)) for p in parts)
        raise ConversionError(f"fuse_qkv: {q_key}, {k_key}, {v_key} cannot be stacked on dim 0 ({shapes}).")
    consumed = {q_key, k_key, v_key}
    if out_key in sd and out_key not in consumed:
        raise ConversionError(f"fuse_qkv: the output key {out_key!r} already exists.")
    result: StateDict = {}
    for key, tensor in sd.items():
        if key == q_key:
            result[out_key] = torch.cat(parts, dim=0)
        elif key not in consumed:
            result[key] = tensor
    return result


def split_qkv(
    sd: Mapping[str, torch.Tensor], key: str, out_keys: Sequence[str], sizes: Sequence[int] | None = None
) -> StateDict:
    """Split one tensor along dim 0 into several, e.g. ``[3 * D, D]`` into three ``[D, D]`` views.

    Args:
        sd: Names -> tensors; must hold ``key``.
        key: The fused tensor ``[sum(sizes), ...]``.
        out_keys: Names of the parts, in order.
        sizes: Rows of each part; default: equal parts.

    Returns:
        A new dict without ``key`` and with the parts (views of it), placed where ``key`` was.

    Raises:
        ConversionError: ``key`` is missing, an output key exists, or the sizes do not add up.
    """
    _require(sd, (key,), "split_qkv")
    tensor = sd[key]
    rows = tensor.shape[0] if tensor.dim() else 0
    if sizes is None:
        if not out_keys or rows % len(out_keys):
            raise ConversionError(f"split_qkv: {key} has {rows} rows, not divisible into {len(out_keys)} parts.")
        sizes = [rows // len(out_keys)] * len(out_keys)
    if len(sizes) != len(out_keys) or sum(sizes) != rows or any(s < 0 for s in sizes):
        raise ConversionError(f"split_qkv: sizes {list(sizes)} for {list(out_keys)} do not split {key}'s {rows} rows.")
    clashes = [k for k in out_keys if k in sd and k != key]
    if clashes or len(set(out_keys)) != len(out_keys):
        raise ConversionError(f"split_qkv: output keys {list(out_keys)} repeat or already exist ({clashes}).")
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    parts = [tensor.narrow(0, start, size) for start, size in zip(starts, sizes)]
    result: StateDict = {}
    for name, value in sd.items():
        if name == key:
            result.update(zip(out_keys, parts))
        else:
            result[name] = value
    return result


def swap_halves(tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Swap the two halves of ``tensor`` along ``dim``: ``[A; B]`` -> ``[B; A]``.

    FLUX's final layer stores its modulation as ``(shift, scale)`` in BFL checkpoints and ``(scale, shift)``
    in
    diffusers; this is that conversion, in both directions (it is its own inverse).

    Args:
        tensor: Any tensor whose size along ``dim`` is even, e.g. a ``[2 * D, C]`` weight or ``[2 * D]`` bias.
        dim: The dimension to swap along.

    Returns:
        A new tensor of the same shape.

    Raises:
        ConversionError: the size along ``dim`` is odd.
    """
    import torch

    if tensor.dim() == 0 or tensor.shape[dim] % 2:
        raise ConversionError(f"swap_halves: size {list(tensor.shape)} has no even dimension {dim}.")
    first, second = tensor.chunk(2, dim=dim)
    return torch.cat([second, first], dim=dim)


def conv_to_linear(weight: torch.Tensor) -> torch.Tensor:
    """Turn a 1x1 convolution weight ``[O, I, 1, 1]`` into a linear weight ``[O, I]`` (a view).

    Raises:
        ConversionError: the weight is not ``[O, I, 1, 1]``.
    """
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (1, 1):
        raise ConversionError(f"conv_to_linear: expected a [O, I, 1, 1] weight, got {list(weight.shape)}.")
    return weight.reshape(weight.shape[0], weight.shape[1])


def linear_to_conv(weight: torch.Tensor) -> torch.Tensor:
    """Turn a linear weight ``[O, I]`` into a 1x1 convolution weight ``[O, I, 1, 1]`` (a view).

    Raises:
        ConversionError: the weight is not 2-D.
    """
    if weight.dim() != 2:
        raise ConversionError(f"linear_to_conv: expected a [O, I] weight, got {list(weight.shape)}.")
    return weight.reshape(weight.shape[0], weight.shape[1], 1, 1)


ConvertFn: TypeAlias = "Callable[[Mapping[str, torch.Tensor]], StateDict]"


@dataclass(frozen=True)
class Converter:
    """A named, registrable state-dict conversion between two on-disk formats.

    Attributes:
        name: Registry name, ``convert_<source>_to_<target>`` (e.g. ``convert_bfl_to_diffusers``); a family
            prefix is allowed (``convert_flux2_bfl_to_diffusers``).
        source: Source format, e.g. ``"bfl"``.
        target: Target format, e.g. ``"diffusers"``.
        fn: The conversion: names -> tensors in ``source`` format to a new dict in ``target`` format.
        reverse: The converter back, when there is one (see :meth:`pair`).
        description: One line for listings.
    """

    name: str
    source: str
    target: str
    fn: ConvertFn = field(repr=False)
    reverse: Converter | None = field(default=None, repr=False, compare=False)
    description: str = ""

    def __post_init__(self) -> None:
        if not (self.name.startswith("convert_") and self.name.endswith(f"{self.source}_to_{self.target}")):
            raise ValueError(
                f"Converter name {self.name!r} must look like 'convert_{self.source}_to_{self.target}' "
                f"(optionally with a family prefix after 'convert_')."
            )

    def __call__(self, sd: Mapping[str, torch.Tensor]) -> StateDict:
        """Convert ``sd`` from :attr:`source` to :attr:`target` format."""
        return self.fn(sd)

    @classmethod
    def pair(
        cls,
        source: str,
        target: str,
        forward: ConvertFn,
        backward: ConvertFn,
        *,
        family: str = "",
        description: str = "",
    ) -> Converter:
        """Build a converter and its reverse, each pointing at the other.

        Args:
            source: Source format of ``forward``.
            target: Target format of ``forward``.
            forward: ``source`` -> ``target``.
            backward: ``target`` -> ``source``.
            family: Optional family prefix for the names (``convert_<family>_<source>_to_<target>``).
            description: One line for listings (used for both).

        Returns:
            The forward converter; ``.reverse`` is the backward one, whose ``.reverse`` is the forward one.
        """
        prefix = f"convert_{family}_" if family else "convert_"
        back = cls(f"{prefix}{target}_to_{source}", target, source, backward, None, description)
        front = cls(f"{prefix}{source}_to_{target}", source, target, forward, back, description)
        object.__setattr__(back, "reverse", front)
        return front


def register_bfl_diffusers(
    register: Callable[[Converter], None],
    family: str,
    what: str,
    *,
    dit: tuple[ConvertFn, ConvertFn, str],
    vae: tuple[ConvertFn, ConvertFn, str],
) -> None:
    """Register a family's BFL <-> diffusers converters of its DiT and its autoencoder, both directions.

    The body of a family plugin's ``register_converters`` hook (converters are named
    ``convert_{family}_dit_bfl_to_diffusers`` and so on).

    Args:
        register: The hook's ``register``.
        family: The family name, e.g. ``"flux1"``.
        what: The family for descriptions, e.g. ``"FLUX.1"``.
        dit: ``(bfl -> diffusers, diffusers -> bfl, diffusers class name)`` of the DiT.
        vae: The same for the autoencoder.
    """
    for part, (forward, backward, diffusers_class), bfl_name in (
        ("dit", dit, "BFL single-file names"),
        ("vae", vae, "BFL ae.safetensors"),
    ):
        kind = "DiT" if part == "dit" else "autoencoder"
        front = Converter.pair(
            "bfl",
            "diffusers",
            forward,
            backward,
            family=f"{family}_{part}",
            description=f"{what} {kind}: {bfl_name} <-> diffusers {diffusers_class}",
        )
        register(front)
        if front.reverse is not None:
            register(front.reverse)
