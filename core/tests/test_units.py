"""Unit declarations and ordering by named anchors (never registration order)."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import pytest
from diffstudio.errors import UnitGraphError
from diffstudio.pipeline.units import (
    InputParam,
    OutputParam,
    PipelineUnit,
    check_unit_declaration,
    order_units,
)


def make_unit(name: str, *, after: tuple[str, ...] = (), before: tuple[str, ...] = (), stage: str = "prepare",
              description: str = "does a thing") -> PipelineUnit:
    cls = type(name, (PipelineUnit,), {"name": name, "after": after, "before": before, "stage": stage,
                                       "description": description})
    unit: PipelineUnit = cls()
    return unit


def names(units: list[PipelineUnit]) -> list[str]:
    return [u.name for u in units]


def test_order_follows_anchors_in_every_registration_order() -> None:
    units = [
        make_unit("decode", stage="finish"),
        make_unit("encode_prompt", after=("check",)),
        make_unit("check"),
        make_unit("noise", after=("encode_prompt",)),
        make_unit("controlnet", after=("noise",), before=("ids",)),
        make_unit("ids", after=("noise",)),
        make_unit("residual", stage="step"),
    ]
    expected = ["check", "encode_prompt", "noise", "controlnet", "ids", "residual", "decode"]
    for perm in itertools.permutations(units):
        assert names(order_units(list(perm))) == expected


def test_anchor_on_absent_unit_is_ignored() -> None:
    units = [make_unit("b", after=("not_installed",)), make_unit("a")]
    assert names(order_units(units)) == ["a", "b"]


def test_cycle_is_reported_with_its_units() -> None:
    with pytest.raises(UnitGraphError, match=r"cycle: \['a', 'b'\]"):
        order_units([make_unit("a", after=("b",)), make_unit("b", after=("a",)), make_unit("c")])


def test_duplicate_names_rejected() -> None:
    with pytest.raises(UnitGraphError, match="two units are named 'a'"):
        order_units([make_unit("a"), make_unit("a")])


def test_empty_description_rejected() -> None:
    with pytest.raises(UnitGraphError, match="empty description"):
        check_unit_declaration(make_unit("a", description="  "))


def test_param_descriptions_required() -> None:
    class Bad(PipelineUnit):
        name = "bad"
        description = "bad unit"
        inputs = (InputParam("x", ""),)

    with pytest.raises(UnitGraphError, match="parameter 'x'"):
        check_unit_declaration(Bad())


def test_per_branch_input_keys() -> None:
    p = InputParam("prompt", "the prompt", per_branch=True)
    assert p.key_for("positive") == "prompt"
    assert p.key_for("negative") == "negative_prompt"
    q = InputParam("edit", "x", per_branch=True, negative_name="negative_edit_images")
    assert q.key_for("negative") == "negative_edit_images"
    assert InputParam("seed", "s").key_for("negative") == "seed"


class _Writes(PipelineUnit):
    name = "writes"
    description = "writes a declared output"
    outputs = (OutputParam("a", "declared"),)

    def process(self, pipe: Any, **inputs: Any) -> Mapping[str, Any]:
        return {"a": 1}


def test_unit_default_process_is_abstract() -> None:
    with pytest.raises(NotImplementedError):
        make_unit("x").process(None)  # type: ignore[arg-type]
    assert _Writes().process(None) == {"a": 1}  # type: ignore[arg-type]
