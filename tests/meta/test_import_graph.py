"""The import graph of every diffstudio distribution has no cycle, ``TYPE_CHECKING`` imports included (issue 20.7).

The architecture contracts themselves (core imports no plugin, adapters import no family, ...) are import-linter
contracts in the root ``pyproject.toml``, run by ``make lint``; this test keeps the one rule import-linter cannot say
for a whole package tree: no module reaches itself again through its imports.
"""

from __future__ import annotations

import importlib.util

import pytest

grimp = pytest.importorskip("grimp")

PACKAGES = [
    "diffstudio", "diffstudio_template_sdk", "diffstudio_flux1", "diffstudio_flux2", "diffstudio_controlnet",
    "diffstudio_ipadapter", "diffstudio_eligen", "diffstudio_shapes", "diffstudio_brightness",
    "diffstudio_colour_shift", "diffstudio_medium_kv", "diffstudio_medium_lora", "diffstudio_medium_residual",
]  # fmt: skip


def import_cycles(graph: object) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = 0
    for root in sorted(graph.modules):  # type: ignore[attr-defined]
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]  # type: ignore[attr-defined]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            for succ in successors:
                if succ not in index:
                    index[succ] = low[succ] = counter
                    counter += 1
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(sorted(graph.find_modules_directly_imported_by(succ)))))  # type: ignore[attr-defined]
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        cycles.append(sorted(component))
    return cycles


def test_no_import_cycle_type_checking_imports_included() -> None:
    installed = [name for name in PACKAGES if importlib.util.find_spec(name) is not None]
    assert "diffstudio" in installed
    graph = grimp.build_graph(*installed, cache_dir=None)  # TYPE_CHECKING imports are edges too
    cycles = import_cycles(graph)
    shown = "; ".join(" <-> ".join(cycle) for cycle in cycles)
    assert not cycles, f"import cycles (cut one edge each: name a protocol of diffstudio.types instead): {shown}"


def test_cycle_finder_finds_a_cycle() -> None:
    graph = grimp.ImportGraph()
    for module in ("pkg", "pkg.a", "pkg.b", "pkg.c"):
        graph.add_module(module)
    graph.add_import(importer="pkg.a", imported="pkg.b")
    graph.add_import(importer="pkg.b", imported="pkg.a")
    graph.add_import(importer="pkg.c", imported="pkg.a")
    assert import_cycles(graph) == [["pkg.a", "pkg.b"]]
