"""``diffstudio templates``: the registered Diffusion Templates, their ids and the models they were made for.

Reads the template registry only: no template class is imported and torch is not loaded. The SDK's
``diffstudio template list`` prints the same table.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from diffstudio._markers import hookimpl
from diffstudio.types import CommandSpec

if TYPE_CHECKING:
    from diffstudio.runtime import Runtime

__all__ = ["add_list_arguments", "print_templates", "register_commands", "template_rows"]


def template_rows(runtime: Runtime) -> list[dict[str, Any]]:
    """One JSON-ready row per registered template, sorted by id.

    Keys: ``id`` (what ``--template`` / ``ModelConfig(model_id=...)`` take), ``plugin`` (who registers it),
    ``base_pipeline``, ``target_model`` (None when not declared), ``dit_geometry`` (None when not declared),
    ``description``.
    """
    registry = runtime.hooks.templates()
    rows = []
    for spec in registry:
        rows.append(
            {
                "id": spec.name,
                "plugin": registry.owner(spec.name),
                "base_pipeline": spec.base_pipeline,
                "target_model": spec.target_model,
                "dit_geometry": dict(spec.dit_geometry) if spec.dit_geometry is not None else None,
                "description": spec.description,
            }
        )
    return sorted(rows, key=lambda row: row["id"])


def _target(row: dict[str, Any]) -> str:
    target = row["target_model"] or f"any {row['base_pipeline']} model"
    geometry = row["dit_geometry"]
    if geometry:
        blocks = f"{geometry['double_blocks']}+{geometry['single_blocks']} blocks"
        target += f" ({blocks}, {geometry['heads']}x{geometry['head_dim']})"
    return target


def add_list_arguments(parser: argparse.ArgumentParser) -> None:
    """``--json``."""
    parser.add_argument("--json", action="store_true", help="print a JSON array (one object per template)")


def print_templates(args: argparse.Namespace, runtime: Runtime) -> int:
    """Print the registered templates as a table, or as a JSON array with ``--json``."""
    rows = template_rows(runtime)
    if args.json:
        text = json.dumps(rows, indent=2)
    elif not rows:
        text = "no templates are registered (install a template package, e.g. pip install ./examples/template-tint)"
    else:
        targets = [_target(r) for r in rows]
        width = max(len(r["id"]) for r in [*rows, {"id": "ID"}])
        twidth = max(len(t) for t in [*targets, "TARGET"])
        lines = [f"{'ID':<{width}}  {'TARGET':<{twidth}}  DESCRIPTION"]
        lines += [f"{r['id']:<{width}}  {t:<{twidth}}  {r['description']}" for r, t in zip(rows, targets)]
        text = "\n".join(lines)
    print(text)  # a closed pipe (`diffstudio templates | head`) is handled by diffstudio.cli
    return 0


@hookimpl
def register_commands(register: Callable[[CommandSpec], None]) -> None:
    """Register ``templates``."""
    register(
        CommandSpec(
            "templates",
            "list registered Diffusion Templates: ids, target models, DiT geometry",
            add_list_arguments,
            print_templates,
        )
    )
