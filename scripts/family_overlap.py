"""Count the code the two FLUX families (and the template SDK's toy family) still share.

A line counts when it lies in a run of at least ``--min-run`` consecutive identical lines (blank lines, comments,
import statements (multi-line ones too), ``__all__`` lists, lone punctuation and white space ignored, as the
``duplicates`` tool does) that also stands in a file of another family. Each copy is counted once, on one side:
FLUX.1's lines that stand in FLUX.2, then the toy's lines that stand in either family (a line is counted once,
however many partners it has). Prints one JSON object: the total and the count per file.

    python scripts/family_overlap.py [--rev GIT_REV] [--min-run 4]

With ``--rev`` the files are read from that commit (``git show``), so a before/after figure needs no checkout.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GROUPS = {
    "flux1": "plugins/flux1/src/diffstudio_flux1",
    "flux2": "plugins/flux2/src/diffstudio_flux2",
    "toy": "template_sdk/src/diffstudio_template_sdk/testing/toy.py",
}


def _files(rev: str | None) -> dict[str, dict[str, str]]:
    groups: dict[str, dict[str, str]] = {}
    for group, prefix in GROUPS.items():
        if rev is None:
            base = ROOT / prefix
            paths = [base] if base.is_file() else sorted(base.rglob("*.py"))
            groups[group] = {str(p.relative_to(ROOT)): p.read_text() for p in paths}
        else:
            names = subprocess.run(["git", "ls-tree", "-r", "--name-only", rev, prefix], cwd=ROOT, check=True,
                                   capture_output=True, text=True).stdout.split()  # fmt: skip
            groups[group] = {
                n: subprocess.run(["git", "show", f"{rev}:{n}"], cwd=ROOT, check=True, capture_output=True,
                                  text=True).stdout  # fmt: skip
                for n in names
                if n.endswith(".py")
            }
    return groups


def _skipped(text: str) -> set[int]:
    """1-based numbers of the lines of import statements and of ``__all__`` assignments."""
    skipped: set[int] = set()
    for node in ast.walk(ast.parse(text)):
        is_import = isinstance(node, (ast.Import, ast.ImportFrom))
        is_all = isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        )
        if is_import or is_all:
            skipped.update(range(node.lineno, (node.end_lineno or node.lineno) + 1))
    return skipped


def _lines(text: str) -> list[str]:
    skipped = _skipped(text)
    out = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = " ".join(raw.split())
        if number in skipped or not line or line.startswith("#") or not line.strip("()[]{},:;"):
            continue
        out.append(line)
    return out


def main() -> None:
    """Parse the arguments, compare the families, print the JSON figure."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", default=None)
    parser.add_argument("--min-run", type=int, default=4)
    args = parser.parse_args()
    groups = {g: {name: _lines(text) for name, text in files.items()} for g, files in _files(args.rev).items()}
    shared: dict[str, set[int]] = {}
    for group, partners in (("flux1", ("flux2",)), ("toy", ("flux1", "flux2"))):
        for name, lines in groups[group].items():
            marked = shared.setdefault(name, set())
            for other_lines in (lines_b for other in partners for lines_b in groups[other].values()):
                matcher = difflib.SequenceMatcher(None, lines, other_lines, autojunk=False)
                for block in matcher.get_matching_blocks():
                    if block.size >= args.min_run:
                        marked.update(range(block.a, block.a + block.size))
    per_file = {name: len(lines) for name, lines in sorted(shared.items()) if lines}
    print(json.dumps({"rev": args.rev or "worktree", "min_run": args.min_run, "shared_lines": sum(per_file.values()),
                      "per_file": per_file}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
