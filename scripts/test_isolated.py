"""Each distribution tests alone: one venv per plugin (and the SDK) with only it and what it declares, then its tests.

What it proves: a plugin's tests pass with nothing importable but the plugin, the diffstudio distributions its
``pyproject.toml`` declares (``dependencies`` and its ``test`` extra, transitively), the third-party packages those
require (transitively, at the versions of ``.venv``) and torch, numpy, pytest and setuptools. A test that imports
an undeclared plugin, a benchmark, or a reference library (diffusers, peft...) its distribution does not declare
fails here, while the main suite, which installs everything, would not see it. Before the tests run, each venv is
checked: every workspace package outside the plugin's closure and every undeclared reference library must *not*
be importable, and the ``diffstudio`` entry points must be exactly the closure's.

How it stays cheap (about 5-8 s per venv, no download, no torch install):

- third-party packages are not installed but linked: each top-level entry (package, module, ``.dist-info``) of
  the distributions the closure needs is a symlink into the running interpreter's site-packages (run it with
  ``.venv/bin/python``, which ``scripts/bootstrap.sh`` fills). The set is resolved from the declared requirements
  and the installed metadata, as pip would; ``pip check`` in the venv confirms that nothing required is missing.
- venvs are made without pip; the running pip installs the closure's members into them (``pip --python``),
  editable, ``--no-deps``, without build isolation and without an index.
- a venv whose inputs (specs, linked versions, the closure's pyproject files) are unchanged is reused.
- tests marked ``slow`` are left out unless ``--full``.

The tests run from the repository root, so its ``pyproject.toml`` settings and root ``conftest.py`` apply (that is
where the FLUX.1 adapters' tests get the FLUX.1 test kit of ``plugins/flux1/tests``: a repository checkout is
assumed, as for every test here).

Usage (``scripts/test-isolated.sh`` runs this with ``.venv/bin/python``, after bootstrapping it)::

    scripts/test-isolated.sh                          # every plugin and template_sdk (core's tests use the SDK)
    scripts/test-isolated.sh controlnet               # one plugin
    scripts/test-isolated.sh --full flux2 -- -k vram  # slow tests too; pytest arguments after --
    scripts/test-isolated.sh --list                   # print each plugin's closure and stop
    scripts/test-isolated.sh --fresh medium-kv        # rebuild its venv even if unchanged

Exit status: 0 when every selected plugin's isolation check and tests pass, 1 otherwise. The last lines are a
table of seconds per plugin (venv, tests) and the total.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as metadata
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import venv
from dataclasses import dataclass, field
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "build" / "isolated"
BASE_DISTS = ("torch", "numpy", "pytest", "setuptools")  # in every venv (setuptools builds the editable installs)
REFERENCE_LIBS = {"diffusers": "diffusers", "peft": "peft", "hypothesis": "hypothesis"}  # module -> distribution
SKIP = {"_template"}  # plugins/_template is copied, not installed


@dataclass
class Member:
    """One distribution of the workspace (core, the template SDK, a plugin)."""

    name: str  # canonical distribution name
    folder: Path
    modules: list[str]  # top-level import packages under src/
    requires: list[Requirement]
    extras: dict[str, list[Requirement]] = field(default_factory=dict)


def workspace() -> dict[str, Member]:
    """Every distribution of the repository, by canonical name."""
    folders = [ROOT / "core", ROOT / "template_sdk"]
    folders += [p for p in sorted((ROOT / "plugins").iterdir()) if (p / "pyproject.toml").is_file()]
    members = {}
    for folder in folders:
        if folder.name in SKIP:
            continue
        with open(folder / "pyproject.toml", "rb") as handle:
            project = tomllib.load(handle)["project"]
        modules = sorted(p.parent.name for p in (folder / "src").glob("*/__init__.py"))
        extras = {k: [Requirement(r) for r in v] for k, v in project.get("optional-dependencies", {}).items()}
        name = canonicalize_name(project["name"])
        members[name] = Member(name, folder, modules, [Requirement(r) for r in project.get("dependencies", [])], extras)
    return members


def testable(members: dict[str, Member]) -> list[str]:
    """The distributions whose tests run alone: every plugin and the template SDK.

    Not core: its tests use the template SDK (which depends on core, not the other way round).
    """
    return [n for n, m in members.items() if m.folder.parent.name == "plugins" or m.folder.name == "template_sdk"]


def closure(members: dict[str, Member], root: Member) -> dict[str, set[str]]:
    """The workspace members a venv for ``root`` holds, each with the extras to install (``root`` gets ``test``)."""
    chosen: dict[str, set[str]] = {}
    todo = [(root.name, {"test"} & root.extras.keys())]
    while todo:
        name, extras = todo.pop()
        if name in chosen and extras <= chosen[name]:
            continue
        chosen.setdefault(name, set()).update(extras)
        member = members[name]
        for req in member.requires + [r for e in extras for r in member.extras.get(e, [])]:
            local = canonicalize_name(req.name)
            if local in members:
                todo.append((local, set(req.extras)))
    return chosen


def declared_third_party(members: dict[str, Member], chosen: dict[str, set[str]]) -> set[str]:
    """Canonical names of the third-party distributions the closure's members declare (extras included)."""
    found = set()
    for name, extras in chosen.items():
        member = members[name]
        for req in member.requires + [r for e in extras for r in member.extras.get(e, [])]:
            if canonicalize_name(req.name) not in members:
                found.add(canonicalize_name(req.name))
    return found


def _wanted(req: Requirement, extras: set[str]) -> bool:
    """Whether ``req`` (a line of some distribution's metadata) applies with those extras requested."""
    return req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras | {""})


def third_party(members: dict[str, Member], chosen: dict[str, set[str]]) -> dict[str, metadata.Distribution]:
    """The running environment's distributions a venv of ``chosen`` gets: what they declare, transitively.

    The closure's members' requirements (their requested extras included) and :data:`BASE_DISTS`, then every
    requirement of those, resolved against the installed distributions. An installed version that does not
    satisfy a declared specifier is an error (re-run ``scripts/bootstrap.sh``).
    """
    todo: list[tuple[Requirement, set[str], str]] = [(Requirement(n), set(), "the test runner") for n in BASE_DISTS]
    for name, extras in chosen.items():
        member = members[name]
        for req in member.requires + [r for e in extras for r in member.extras.get(e, [])]:
            if canonicalize_name(req.name) not in members:
                todo.append((req, set(req.extras), name))
    found: dict[str, metadata.Distribution] = {}
    done: set[tuple[str, frozenset[str]]] = set()
    while todo:
        req, extras, wanted_by = todo.pop()
        name = canonicalize_name(req.name)
        if (name, frozenset(extras)) in done:
            continue
        done.add((name, frozenset(extras)))
        try:
            dist = found.get(name) or metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"test-isolated: {wanted_by} requires {req}, which {sys.prefix} lacks; "
                             "run scripts/bootstrap.sh") from None  # fmt: skip
        if not req.specifier.contains(dist.version, prereleases=True):
            raise SystemExit(f"test-isolated: {wanted_by} requires {req}, but {sys.prefix} has {dist.version}")
        found[name] = dist
        for text in dist.requires or []:
            sub = Requirement(text)
            if _wanted(sub, extras):
                todo.append((sub, set(sub.extras), name))
    return found


def _top_entries(dist: metadata.Distribution, site: Path) -> set[str]:
    """The top-level names ``dist`` installed in ``site`` (packages, modules, its .dist-info, .pth files)."""
    tops = {f.parts[0] for f in dist.files or []}
    return {t for t in tops if t not in ("..", "__pycache__") and (site / t).exists()}


def install_order(members: dict[str, Member], chosen: dict[str, set[str]]) -> list[str]:
    """The closure's members, each after the members it requires.

    pip 23.2 resolves ``diffstudio-flux1[test]`` (a plugin's test extra) to the editable ``-e plugins/flux1[test]``
    only when that one comes first on the command line; otherwise it looks for it on the index.
    """
    order: list[str] = []

    def visit(name: str) -> None:
        if name in order:
            return
        member = members[name]
        for req in member.requires + [r for e in sorted(chosen[name]) for r in member.extras.get(e, [])]:
            local = canonicalize_name(req.name)
            if local in chosen and local != name:
                visit(local)
        order.append(name)

    for name in sorted(chosen):
        visit(name)
    return order


def _spec(members: dict[str, Member], name: str, extras: set[str]) -> str:
    folder = str(members[name].folder.relative_to(ROOT))
    return f"{folder}[{','.join(sorted(extras))}]" if extras else folder


def _describe(members: dict[str, Member], chosen: dict[str, set[str]]) -> str:
    return " ".join(_spec(members, n, chosen[n]) for n in install_order(members, chosen))


def make_venv(members: dict[str, Member], plugin: Member, chosen: dict[str, set[str]], fresh: bool) -> Path:
    """Create (or reuse) ``build/isolated/venvs/<plugin>``; return its python.

    Third-party packages are symlinks into the running interpreter's site-packages (:func:`third_party`; nothing is
    downloaded or unpacked), the closure's members are installed editable without dependencies, and ``pip check``
    confirms that every installed distribution finds what it requires.
    """
    target = WORK / "venvs" / plugin.folder.name
    python = target / "bin" / "python"
    site = Path(sysconfig.get_paths()["purelib"])
    dists = third_party(members, chosen)
    entries = sorted({e for d in dists.values() for e in _top_entries(d, site)})
    specs = [_spec(members, n, chosen[n]) for n in install_order(members, chosen)]
    key = [sys.prefix, *specs, *entries, *(f"{n}=={d.version}" for n, d in sorted(dists.items()))]
    key += [(members[n].folder / "pyproject.toml").read_text() for n in sorted(chosen)]
    digest = hashlib.sha256("\n".join(key).encode()).hexdigest()[:16]
    stamp = target / ".diffstudio-isolated"
    if not fresh and python.is_file() and stamp.is_file() and stamp.read_text() == digest:
        return python
    shutil.rmtree(target, ignore_errors=True)
    venv.EnvBuilder(with_pip=False, clear=True, symlinks=True).create(target)
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    for entry in entries:
        Path(purelib, entry).symlink_to(site / entry)
    pip = [sys.executable, "-m", "pip", "--python", str(python)]
    cmd = [*pip, "install", "-q", "--no-deps", "--no-build-isolation", "--no-index", "--disable-pip-version-check"]
    for spec in specs:
        cmd += ["-e", spec]
    for step in (cmd, [*pip, "check", "--disable-pip-version-check"]):
        done = subprocess.run(step, cwd=ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(step[4:6])} failed for {' '.join(specs)}:\n{done.stdout}{done.stderr}")
    stamp.write_text(digest)
    return python


CHECK = """
import importlib.metadata, importlib.util, json, sys
want = json.loads(sys.argv[1])
present = [m for m in want["present"] if importlib.util.find_spec(m) is None]
leaked = [m for m in want["absent"] if importlib.util.find_spec(m) is not None]
points = sorted({e.name for e in importlib.metadata.entry_points(group="diffstudio")})
print(json.dumps({"missing": present, "leaked": leaked, "entry_points": points}))
"""


def check_isolation(members: dict[str, Member], chosen: dict[str, set[str]], python: Path) -> list[str]:
    """Problems with the venv's contents: closure packages missing, anything else importable, stray entry points."""
    inside = {m for n in chosen for m in members[n].modules}
    outside = {m for n, member in members.items() if n not in chosen for m in member.modules} - inside
    declared = declared_third_party(members, chosen)
    outside |= {m for m, dist in REFERENCE_LIBS.items() if dist not in declared} | {"benchmarks"}
    want = {"present": sorted(inside), "absent": sorted(outside)}
    check = [str(python), "-P", "-c", CHECK, json.dumps(want)]  # from the root, as the tests run
    done = subprocess.run(check, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        return [f"the isolation check did not run: {done.stderr.strip()[-500:]}"]
    found = json.loads(done.stdout)
    problems = [f"declared but not importable: {m}" for m in found["missing"]]
    problems += [f"importable but not declared: {m}" for m in found["leaked"]]
    expected = set()
    for name in chosen:
        with open(members[name].folder / "pyproject.toml", "rb") as handle:
            expected |= set(tomllib.load(handle)["project"].get("entry-points", {}).get("diffstudio", {}))
    if set(found["entry_points"]) != expected:
        problems.append(f"diffstudio entry points {found['entry_points']}, expected {sorted(expected)}")
    return problems


def run_tests(plugin: Member, python: Path, full: bool, extra: list[str]) -> int:
    """Run the plugin's tests with the venv's python from the repository root (root conftest and settings apply)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = f"{python.parent}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(python.parent.parent)
    # -P: the repository root (the working folder) is not on sys.path, or `import benchmarks` would work here
    cmd = [str(python), "-P", "-m", "pytest", str((plugin.folder / "tests").relative_to(ROOT)), "-q"]
    if not full:
        cmd += ["-m", "not slow"]
    return subprocess.run(cmd + extra, cwd=ROOT, env=env).returncode


def main(argv: list[str] | None = None) -> int:
    """Command line: see the module docstring."""
    args_in = list(sys.argv[1:] if argv is None else argv)
    extra = args_in[args_in.index("--") + 1 :] if "--" in args_in else []
    args_in = args_in[: args_in.index("--")] if "--" in args_in else args_in
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("plugins", nargs="*", help="plugin folder names under plugins/, or template_sdk (default: all)")
    parser.add_argument("--full", action="store_true", help="also run tests marked slow")
    parser.add_argument("--fresh", action="store_true", help="rebuild the venvs even when their inputs are unchanged")
    parser.add_argument("--list", action="store_true", help="print each plugin's closure and stop")
    args = parser.parse_args(args_in)
    members = workspace()
    plugins = {m.folder.name: m for m in members.values() if m.name in testable(members)}
    unknown = [p for p in args.plugins if p not in plugins]
    if unknown:
        parser.error(f"unknown plugin(s) {unknown}; known: {', '.join(sorted(plugins))}")
    selected = [plugins[p] for p in (args.plugins or sorted(plugins))]
    if args.list:
        for plugin in selected:
            print(f"{plugin.folder.name}: {_describe(members, closure(members, plugin))}")
        return 0
    start = time.perf_counter()
    rows, failed = [], []
    for plugin in selected:
        name = plugin.folder.name
        chosen = closure(members, plugin)
        print(f"\n=== {name}: {_describe(members, chosen)}", flush=True)
        t0 = time.perf_counter()
        try:
            python = make_venv(members, plugin, chosen, args.fresh)
        except RuntimeError as error:
            print(f"test-isolated: {name}: {error}", flush=True)
            rows.append((name, time.perf_counter() - t0, 0.0, "install failed"))
            failed.append(name)
            continue
        problems = check_isolation(members, chosen, python)
        t1 = time.perf_counter()
        for problem in problems:
            print(f"test-isolated: {name}: {problem}", flush=True)
        status = run_tests(plugin, python, args.full, extra) if not problems else -1
        t2 = time.perf_counter()
        verdict = {0: "passed", 5: "no tests", -1: "not isolated"}.get(status, f"failed (pytest exit {status})")
        rows.append((name, t1 - t0, t2 - t1, verdict))
        if verdict not in ("passed", "no tests"):
            failed.append(name)
    print("\nplugin            venv s   tests s   result")
    for name, setup, tests, verdict in rows:
        print(f"{name:<16} {setup:7.1f} {tests:9.1f}   {verdict}")
    print(f"total {time.perf_counter() - start:.1f} s; {'failed: ' + ', '.join(failed) if failed else 'all passed'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
