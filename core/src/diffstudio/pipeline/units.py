"""Pipeline units: stateless, declared blocks ordered by named anchors.

A unit declares what it needs (components, inputs) and what it writes (outputs), with descriptions. The runner
checks the declarations: a required input that is missing, or a declared output a unit did not write, is a
``UnitGraphError`` naming the unit. Units are ordered by ``stage`` and by ``after``/``before`` anchors naming
other units; ties are broken by unit name, so registration order never matters.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Literal

from typing_extensions import TypeVar

from diffstudio.errors import UnitGraphError
from diffstudio.types import PipelineLike

Stage = Literal["prepare", "step", "finish"]
Branch = Literal["shared", "positive", "negative"]
STAGES: tuple[Stage, ...] = ("prepare", "step", "finish")

#: The pipeline class a unit serves (``PipelineUnit[Flux2ImagePipeline]``); a bare ``PipelineUnit`` takes any.
P = TypeVar("P", bound=PipelineLike, default=Any)


@dataclass(frozen=True)
class InputParam:
    """One input a unit reads.

    Attributes:
        name: Key in the pipeline state (a call argument or another unit's output).
        description: What it is, with its shape for tensors.
        required: A missing or None value is an error (otherwise the unit sees None).
        per_branch: For units that run once per CFG branch: read from the branch (e.g. ``prompt`` is read as
            ``negative_prompt`` on the negative branch, see ``negative_name``), not from the shared state.
        negative_name: The state key read on the negative branch (default ``negative_<name>``).
    """

    name: str
    description: str
    required: bool = False
    per_branch: bool = False
    negative_name: str | None = None

    def key_for(self, branch: Branch) -> str:
        """Return the state key this input is read from on ``branch``."""
        if self.per_branch and branch == "negative":
            return self.negative_name or f"negative_{self.name}"
        return self.name


@dataclass(frozen=True)
class OutputParam:
    """One output a unit writes (checked by the runner).

    Attributes:
        name: Key written into the state.
        description: What it is, with its shape for tensors.
        optional: The unit may legitimately not write it (e.g. only when an optional input is given).
    """

    name: str
    description: str
    optional: bool = False


class PipelineUnit(Generic[P]):
    """Base class of every unit. Subclasses set the class attributes and implement :meth:`process`.

    The unit is generic in the pipeline it serves: ``class Encode(PipelineUnit[MyPipeline])`` gets ``pipe`` typed
    as ``MyPipeline`` in :meth:`process` (no cast); a bare ``PipelineUnit`` accepts any pipeline.

    Class attributes:
        name: Unique name within a pipeline; other units anchor on it.
        description: Non-empty, one or two sentences.
        stage: ``"prepare"`` (before the denoising loop), ``"step"`` (every denoising step, before the model
            call) or ``"finish"`` (after the loop: decoding).
        components: Pipeline slots the unit uses; the runner onloads them (memory policy) before it runs. A unit
            whose required components are absent is skipped only if ``optional_components`` lists them.
        optional_components: Components the unit can do without.
        inputs: What it reads.
        outputs: What it writes.
        after: Units that must run before it (names that do not exist in a pipeline are ignored).
        before: Units that must run after it.
        per_branch: Run once for the positive and, when CFG is active, once for the negative branch; outputs go
            into that branch's state.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    stage: ClassVar[Stage] = "prepare"
    components: ClassVar[tuple[str, ...]] = ()
    optional_components: ClassVar[tuple[str, ...]] = ()
    inputs: ClassVar[tuple[InputParam, ...]] = ()
    outputs: ClassVar[tuple[OutputParam, ...]] = ()
    after: ClassVar[tuple[str, ...]] = ()
    before: ClassVar[tuple[str, ...]] = ()
    per_branch: ClassVar[bool] = False

    def process(self, pipe: P, **inputs: Any) -> Mapping[str, Any]:
        """Compute the outputs from the inputs. Must not keep state between calls.

        Args:
            pipe: The pipeline (components, device, dtype, scheduler).
            **inputs: One keyword per declared input (None when absent and not required). ``step`` units also
                receive ``step_index`` and ``timestep``.

        Returns:
            A mapping with (a subset of) the declared outputs.
        """
        raise NotImplementedError(f"unit {type(self).__name__} must implement process()")

    def __repr__(self) -> str:
        return f"<unit {self.name} ({self.stage})>"


def check_unit_declaration(unit: PipelineUnit) -> None:
    """Raise ``UnitGraphError`` if a unit's declaration is incomplete."""
    cls = type(unit).__name__
    if not unit.name:
        raise UnitGraphError(f"unit class {cls} has no name")
    if not unit.description.strip():
        raise UnitGraphError(f"unit {unit.name!r} ({cls}) has an empty description")
    if unit.stage not in STAGES:
        raise UnitGraphError(f"unit {unit.name!r} has stage {unit.stage!r}; expected one of {STAGES}")
    params: list[InputParam | OutputParam] = [*unit.inputs, *unit.outputs]
    for param in params:
        if not param.description.strip():
            raise UnitGraphError(f"unit {unit.name!r}: parameter {param.name!r} has an empty description")


def order_units(units: Sequence[PipelineUnit]) -> list[PipelineUnit]:
    """Order units by stage, then by their ``after``/``before`` anchors; ties by name.

    Raises:
        UnitGraphError: duplicate names, an anchor across stages that contradicts the stage order, or a cycle
            (the message lists the units involved).
    """
    by_name: dict[str, PipelineUnit] = {}
    for unit in units:
        check_unit_declaration(unit)
        if unit.name in by_name:
            raise UnitGraphError(
                f"two units are named {unit.name!r}: {type(by_name[unit.name]).__name__} and "
                f"{type(unit).__name__}; unit names must be unique within a pipeline"
            )
        by_name[unit.name] = unit
    ordered: list[PipelineUnit] = []
    for stage in STAGES:
        members = {name: unit for name, unit in by_name.items() if unit.stage == stage}
        edges: dict[str, set[str]] = {name: set() for name in members}  # name -> successors
        indegree = dict.fromkeys(members, 0)

        pairs = [(anchor, name) for name, unit in members.items() for anchor in unit.after if anchor in members]
        pairs += [(name, anchor) for name, unit in members.items() for anchor in unit.before if anchor in members]
        for first, then in pairs:
            if then not in edges[first]:
                edges[first].add(then)
                indegree[then] += 1
        ready = [name for name, deg in indegree.items() if deg == 0]
        heapq.heapify(ready)
        stage_order: list[str] = []
        while ready:
            name = heapq.heappop(ready)
            stage_order.append(name)
            for succ in sorted(edges[name]):
                indegree[succ] -= 1
                if indegree[succ] == 0:
                    heapq.heappush(ready, succ)
        if len(stage_order) != len(members):
            stuck = sorted(set(members) - set(stage_order))
            raise UnitGraphError(f"the after/before anchors of these {stage} units form a cycle: {stuck}")
        ordered.extend(members[name] for name in stage_order)
    return ordered
