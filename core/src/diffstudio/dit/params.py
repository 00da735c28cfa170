"""The base of a dual-stream (MM-)DiT's sizes: checks, presets, and config-first inference.

A family's params dataclass (``FluxParams``, ``Flux2Params``) declares its fields in the order of BFL's reference
code and derives from :class:`DitParams`, which holds what every such DiT shares: the width / heads / RoPE axes
checks, ``head_dim`` and ``mlp_hidden_dim``, presets by name, and :meth:`DitParams.settle`, the config-first rule
of DESIGN.md section 2:

1. the component's configuration (the diffusers ``config.json`` beside the weights, or ``ModelConfig(config=)``;
   see :mod:`diffstudio.loading.component_config`) gives every field it carries, translated by the family's
   :attr:`DitParams.CONFIG_FIELDS`;
2. the tensor shapes give the rest, and must agree with the configuration where both speak;
3. a field neither stores (e.g. the RoPE axes split) takes the family's default rule, whose failure says how to
   pass the value.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from diffstudio.errors import ConfigError
from diffstudio.loading.component_config import HOW_TO_PASS, ComponentConfig
from diffstudio.loading.shapes import ShapeProbe

if TYPE_CHECKING:
    from typing import Self


class DitParams:
    """Sizes every dual-stream DiT has; the base of the families' params dataclasses.

    Subclasses are dataclasses declaring at least ``hidden_size``, ``num_heads``, ``axes_dim`` (RoPE channels
    per id axis; their sum is the head dim) and ``mlp_ratio``, and set the class variables below.

    Attributes:
        FAMILY: The family's name in messages (``"FLUX.1"``).
        CONFIG_FIELDS: diffusers ``config.json`` field -> (params field, kind: ``"int"``, ``"float"``, ``"bool"``
            or ``"ints"``, see :meth:`~diffstudio.loading.component_config.ComponentConfig.typed`).
            ``num_attention_heads`` x ``attention_head_dim`` gives ``hidden_size`` without an entry.
        FIXED_CONFIG: ``config.json`` fields the family's model has one value of (``patch_size``: 1); another
            value is a :class:`~diffstudio.errors.ConfigError`.
        DIFFUSERS_CLASSES: ``_class_name`` values of the DiT's diffusers ``config.json``.
    """

    FAMILY: ClassVar[str] = "DiT"
    CONFIG_FIELDS: ClassVar[Mapping[str, tuple[str, str]]] = {}
    FIXED_CONFIG: ClassVar[Mapping[str, Any]] = {"patch_size": 1}
    DIFFUSERS_CLASSES: ClassVar[tuple[str, ...]] = ()

    hidden_size: int
    num_heads: int
    axes_dim: tuple[int, ...]
    mlp_ratio: float

    def __post_init__(self) -> None:
        """Check the widths and the RoPE split.

        Raises:
            ConfigError: ``hidden_size`` is not divisible by ``num_heads``, or ``axes_dim`` does not split the head
                dim into even parts.
        """
        self.axes_dim = tuple(int(a) for a in self.axes_dim)
        if self.num_heads <= 0 or self.hidden_size <= 0 or self.hidden_size % self.num_heads != 0:
            raise ConfigError(f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}")
        if sum(self.axes_dim) != self.head_dim:
            raise ConfigError(f"axes_dim {self.axes_dim} must sum to the head dim {self.head_dim}")
        if any(d % 2 or d < 0 for d in self.axes_dim):
            raise ConfigError(f"every entry of axes_dim {self.axes_dim} must be even")

    @property
    def head_dim(self) -> int:
        """Channels per attention head."""
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        """Hidden width of the MLPs (the gated half for SwiGLU)."""
        return int(self.hidden_size * self.mlp_ratio)

    @classmethod
    def presets(cls) -> Mapping[str, Self]:
        """The family's official presets by name (a subclass provides them)."""
        return {}

    @classmethod
    def preset(cls, name: str) -> Self:
        """Return a copy of an official preset (see :meth:`presets`).

        Raises:
            ConfigError: No preset has that name.
        """
        known = cls.presets()
        if name not in known:
            raise ConfigError(f"unknown {cls.FAMILY} preset {name!r}; known: {sorted(known)}")
        return copy.copy(known[name])

    @staticmethod
    def read_blocks(probe: ShapeProbe, hidden: int, double_mlp: tuple[str, int]) -> tuple[int, int, int, int]:
        """Read the block counts, the head dim (QK-norm scale) and the MLP width off BFL-named shapes.

        Args:
            probe: The shapes.
            hidden: The model width (``img_in.weight`` rows).
            double_mlp: The double block's MLP weight that tells the width (after ``double_blocks.0.``) and the
                axis to read; single blocks tell it by ``linear2``'s input width minus ``hidden``.

        Returns:
            ``(depth, depth_single_blocks, head_dim, mlp_hidden)``.

        Raises:
            ParamsShapeError: No blocks, a tensor missing or of another rank, or a head dim that does not divide
                ``hidden``.
        """
        depth, depth_single = probe.blocks("double_blocks"), probe.blocks("single_blocks")
        if depth:
            (head_dim,) = probe.need("double_blocks.0.img_attn.norm.query_norm.scale", 1)
            mlp_hidden = probe.need(f"double_blocks.0.{double_mlp[0]}", 2)[double_mlp[1]]
        elif depth_single:
            (head_dim,) = probe.need("single_blocks.0.norm.query_norm.scale", 1)
            mlp_hidden = probe.need("single_blocks.0.linear2.weight", 2)[1] - hidden
        else:
            raise probe.fail("no double_blocks.* or single_blocks.* tensors")
        if head_dim <= 0 or hidden <= 0 or hidden % head_dim:
            raise probe.fail(f"head dim {head_dim} (from the QK-norm scale) does not divide hidden size {hidden}")
        return depth, depth_single, head_dim, mlp_hidden

    @classmethod
    def fields_from_config(cls, config: ComponentConfig) -> dict[str, Any]:
        """Translate the ``config.json`` fields the family understands into params fields.

        Raises:
            ConfigError: A field has a value of the wrong type, or one the family's model cannot express.
        """
        fields = {ours: config.typed(name, kind) for name, (ours, kind) in cls.CONFIG_FIELDS.items() if name in config}
        if "num_attention_heads" in config and "attention_head_dim" in config:
            heads, head_dim = config.typed("num_attention_heads", "int"), config.typed("attention_head_dim", "int")
            fields["hidden_size"] = heads * head_dim
        for name, only in cls.FIXED_CONFIG.items():
            if name in config and config.get(name) != only:
                raise ConfigError(
                    f"{config.source}: {name}={config.get(name)!r} is not supported by the {cls.FAMILY} DiT "
                    f"(only {only!r}); pass a config of this family's architecture"
                )
        return fields

    @classmethod
    def settle(
        cls,
        probe: ShapeProbe,
        inferred: dict[str, Any],
        config: ComponentConfig | None,
        defaults: Mapping[str, Callable[[int], Any]],
        mlp_hidden: int | None = None,
    ) -> Self:
        """Build the params: configuration first, then the inferred sizes, then the family's default rules.

        Args:
            probe: The shapes, for messages.
            inferred: Fields read off the tensor shapes (must include ``hidden_size`` and ``num_heads``).
            config: The component's configuration, if any.
            defaults: Field -> rule from the head dim, for fields neither the config nor the shapes give
                (e.g. ``axes_dim``); a rule raises ConfigError when it cannot decide.
            mlp_hidden: The MLP width read off the shapes; the params must reproduce it.

        Raises:
            ParamsShapeError: The shapes contradict the configuration, or give inconsistent sizes.
            SizesNotStoredError: A default rule failed; the message says how to pass the value.
            ConfigError: The configuration is malformed or names what the family cannot express.
        """
        given = cls.fields_from_config(config) if config is not None else {}
        for name, value in given.items():
            if name in inferred and not _same(inferred[name], value):
                raise probe.fail(
                    f"{config.source if config else 'the config'} gives {name}={value!r} but the weights have "
                    f"{inferred[name]!r}; the config belongs to another model"
                )
        fields = {**inferred, **given}
        head_dim = fields["hidden_size"] // fields["num_heads"] if fields["num_heads"] > 0 else 0
        for name, rule in defaults.items():
            if name not in fields:
                try:
                    fields[name] = rule(head_dim)
                except ConfigError as exc:
                    theirs = next((t for t, (ours, _) in cls.CONFIG_FIELDS.items() if ours == name), name)
                    raise probe.not_stored(
                        f"{exc}, and the weights do not store {name} ({theirs!r} in a diffusers config)",
                        HOW_TO_PASS.format(example=f"{{{theirs!r}: ...}}"),
                    ) from None
        try:
            params: Self = cls(**fields)  # the subclass is a dataclass
        except ConfigError as exc:
            if config is not None and given:
                raise ConfigError(
                    f"the {cls.FAMILY} sizes of {config.source} do not fit the weights {probe.source}: {exc}; "
                    "fix the config or pass the one these weights came with"
                ) from None
            raise probe.fail(str(exc)) from None
        if mlp_hidden is not None and params.mlp_hidden_dim != mlp_hidden:
            raise probe.fail(f"MLP width {mlp_hidden} is not representable with hidden size {params.hidden_size}")
        return params


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(float(a), float(b), rel_tol=1e-9)
    return bool(a == b)
