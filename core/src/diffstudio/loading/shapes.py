"""Reading a model's sizes off its tensor shapes (safetensors headers; no tensor data).

The families' ``params.py`` infer DiT and autoencoder sizes from canonical (BFL) tensor names; the probing is
the same everywhere: a tensor must exist with a given rank, blocks are counted from contiguous indices, and a
failure names the file, the tensor and the model kind. :class:`ShapeProbe` does that;
:func:`ldm_autoencoder_sizes` reads the sizes every LDM-style autoencoder (``ae.safetensors``) shares.

Errors: :class:`ParamsShapeError` (the shapes do not give consistent sizes: a damaged or foreign file) and
:class:`SizesNotStoredError` (a size the weights do not store could not be guessed: pass it in a config).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from diffstudio.errors import CheckpointError, ConfigError

Shapes = Mapping[str, Sequence[int]]
"""Tensor name -> shape, e.g. read from a safetensors header without loading data."""


class ParamsShapeError(CheckpointError, ValueError):
    """A checkpoint's tensor shapes do not give consistent sizes (a tensor is missing or has another rank)."""


class SizesNotStoredError(ParamsShapeError, ConfigError):
    """A size that checkpoints do not store (e.g. the RoPE axes split) cannot be guessed; a config must give it."""


class ShapeProbe:
    """Typed access to the shapes of one checkpoint, for inferring a model's sizes.

    Args:
        shapes: Tensor name -> shape (canonical names).
        what: The model kind for messages, e.g. ``"FLUX.1"`` or ``"FLUX.2 AE"``.
        source: The file or folder the shapes come from, for messages.
    """

    def __init__(self, shapes: Shapes, what: str, source: str = "the checkpoint") -> None:
        self.shapes = shapes
        self.what = what
        self.source = source

    def __contains__(self, key: object) -> bool:
        return key in self.shapes

    def fail(self, problem: str) -> ParamsShapeError:
        """The error for shapes that do not give consistent sizes (to raise)."""
        return ParamsShapeError(
            f"Cannot read the {self.what} sizes off {self.source}: {problem}. The file is damaged or is not a "
            f"{self.what} checkpoint (check the file, or pass another one)."
        )

    def not_stored(self, problem: str, how: str) -> SizesNotStoredError:
        """The error for a size the weights do not store and no config gave (to raise); ``how`` says how to pass it."""
        return SizesNotStoredError(f"Cannot read the {self.what} sizes off {self.source}: {problem}; {how}.")

    def need(self, key: str, ndim: int) -> tuple[int, ...]:
        """The shape of ``key``, which must exist with ``ndim`` dimensions.

        Raises:
            ParamsShapeError: The tensor is missing or has another rank.
        """
        if key not in self.shapes:
            raise self.fail(f"tensor {key!r} is missing (BFL key names expected)")
        shape = tuple(int(s) for s in self.shapes[key])
        if len(shape) != ndim:
            raise self.fail(f"tensor {key!r} has shape {list(shape)}, expected {ndim} dimension(s)")
        return shape

    def blocks(self, prefix: str) -> int:
        """Number of ``{prefix}.{i}.*`` blocks; the indices must be contiguous from 0.

        Raises:
            ParamsShapeError: The indices have gaps.
        """
        pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
        indices = {int(m.group(1)) for k in self.shapes if (m := pattern.match(k))}
        if indices and indices != set(range(max(indices) + 1)):
            shown = sorted(indices)
            raise self.fail(f"{prefix} indices are not contiguous: {shown[:20]}{' ...' * (len(shown) > 20)}")
        return len(indices)


def count_blocks(shapes: Shapes, prefix: str, source: str = "the checkpoint", what: str = "model") -> int:
    """Number of ``{prefix}.{i}.*`` blocks in ``shapes``; the indices must be contiguous from 0.

    Raises:
        ParamsShapeError: The indices have gaps.
    """
    return ShapeProbe(shapes, what, source).blocks(prefix)


def check_norm_groups(ch: int, ch_mult: Sequence[int], norm_groups: int) -> None:
    """Check that every level's channel count of an LDM autoencoder is divisible by its GroupNorm groups.

    Raises:
        ConfigError: A channel count is not divisible (a ``ValueError``).
    """
    bad = [ch * m for m in ch_mult if norm_groups <= 0 or (ch * m) % norm_groups]
    if bad:
        raise ConfigError(f"channel counts {bad} are not divisible by norm_groups {norm_groups}")


@dataclass
class LdmAutoEncoderParams:
    """Sizes every LDM-style autoencoder (BFL ``ae.safetensors``) has; the base of the families' ``AutoEncoderParams``.

    Attributes:
        resolution: Nominal training resolution (informational).
        in_channels: Image channels.
        ch: Base channel count.
        out_ch: Decoded image channels.
        ch_mult: Channel multiplier per level; each level but the last halves the size.
        num_res_blocks: Resnet blocks per encoder level (the decoder has one more).
        norm_groups: GroupNorm groups (not stored in the weights; a diffusers config carries ``norm_num_groups``).
    """

    resolution: int = 256
    in_channels: int = 3
    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    norm_groups: int = 32

    def __post_init__(self) -> None:
        """Check that every level's channel count is divisible by the GroupNorm groups.

        Raises:
            ConfigError: A channel count is not divisible (a ``ValueError``).
        """
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        check_norm_groups(self.ch, self.ch_mult, self.norm_groups)


def ldm_autoencoder_sizes(probe: ShapeProbe) -> dict[str, Any]:
    """The sizes every LDM-style autoencoder in BFL layout stores (``encoder.conv_in``, ``encoder.down.*``, ...).

    Returns:
        ``in_channels``, ``ch``, ``out_ch``, ``ch_mult``, ``num_res_blocks`` and ``z_channels``, keyword
        arguments of the families' ``AutoEncoderParams``.

    Raises:
        ParamsShapeError: A needed tensor is missing, has another rank, or the sizes are inconsistent.
    """
    ch, in_channels = probe.need("encoder.conv_in.weight", 4)[:2]
    out_ch = probe.need("decoder.conv_out.weight", 4)[0]
    two_z = probe.need("encoder.conv_out.weight", 4)[0]
    levels = probe.blocks("encoder.down")
    if levels == 0:
        raise probe.fail("no encoder.down.* tensors")
    if ch <= 0 or two_z < 2:
        raise probe.fail(f"encoder.conv_in has {ch} and encoder.conv_out {two_z} output channels")
    return {
        "in_channels": in_channels,
        "ch": ch,
        "out_ch": out_ch,
        "ch_mult": tuple(probe.need(f"encoder.down.{i}.block.0.conv1.weight", 4)[0] // ch for i in range(levels)),
        "num_res_blocks": probe.blocks("encoder.down.0.block"),
        "z_channels": two_z // 2,
    }
