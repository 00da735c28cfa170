"""Discovery from real wheels in a fresh virtual environment.

Builds wheels of diffstudio-core, of the plugin skeleton (as ``diffstudio-example``) and of a deliberately
broken plugin, installs them into a new venv and checks what ``diffstudio plugins --json`` reports, including
strict mode. Torch is not installed there: listing plugins must not need it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def _run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kwargs)  # type: ignore[call-overload]


def _write_plugin(folder: Path, name: str, core_requirement: str, plugin_source: str) -> Path:
    """Write a one-module plugin distribution ``diffstudio-<name>`` whose entry module is ``plugin_source``."""
    package = folder / "src" / f"diffstudio_{name}"
    package.mkdir(parents=True)
    (folder / "pyproject.toml").write_text(textwrap.dedent(f"""
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "diffstudio-{name}"
        version = "0.0.1"
        dependencies = ["{core_requirement}"]
        [project.entry-points.diffstudio]
        {name} = "diffstudio_{name}.plugin"
        [tool.setuptools.packages.find]
        where = ["src"]
    """))
    (package / "__init__.py").write_text("")
    (package / "plugin.py").write_text(plugin_source)
    return folder


#: Plugins that fail in ways that used to take the whole command line down (issue 21, finding 8).
ISOLATION_PLUGINS = {
    "exits": "raise SystemExit(3)\n",
    "typo": "from diffstudio import hookimpl\n\n@hookimpl\ndef register_comands(register):\n    pass\n",
    "garbage": "from diffstudio import hookimpl\n\n@hookimpl\ndef register_commands(register):\n    register('nope')\n",
}
FAILING = ("broken", "future", *ISOLATION_PLUGINS)


@pytest.fixture(scope="module")
def fresh_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("discovery")
    wheels = work / "wheels"
    sources = [
        ROOT / "core",
        ROOT / "plugins" / "_template",
        _write_plugin(work / "broken", "broken", "diffstudio-core ~= 0.1.0",
                      "raise ImportError('this plugin is broken on purpose')\n"),
        _write_plugin(work / "future", "future", "diffstudio-core >= 99", "raise SystemExit('must not be imported')\n"),
        *(_write_plugin(work / n, n, "diffstudio-core ~= 0.1.0", code) for n, code in ISOLATION_PLUGINS.items()),
    ]
    for source in sources:
        result = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                       "-w", str(wheels), str(source)])
        assert result.returncode == 0, result.stderr
    env_dir = work / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    # Core's runtime dependencies for listing plugins (torch is deliberately absent), then our wheels.
    deps = _run([str(python), "-m", "pip", "install", "-q", "pluggy>=1.5", "packaging>=23"])
    assert deps.returncode == 0, deps.stderr
    install = _run([str(python), "-m", "pip", "install", "-q", "--no-deps", *map(str, wheels.glob("*.whl"))])
    assert install.returncode == 0, install.stderr
    return env_dir


def _plugins(env_dir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DIFFSTUDIO_") and k != "PYTHONPATH"}
    return _run([str(env_dir / "bin" / "diffstudio"), "plugins", "--json"], env={**clean, **env})


def test_installed_plugins_listed_and_broken_one_failed(fresh_env: Path) -> None:
    result = _plugins(fresh_env)
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["example"]["status"] == "loaded"
    assert rows["example"]["distribution"] == "diffstudio-example"
    assert rows["example"]["hooks"] == ["pipeline_unit"]
    assert rows["broken"]["status"] == "failed"
    assert "broken on purpose" in rows["broken"]["error"]
    assert rows["future"]["status"] == "failed"
    assert "diffstudio-core" in rows["future"]["error"]
    assert rows["builtin.fallbacks"]["status"] == "builtin"
    assert {row["name"] for row in rows.values() if row["status"] == "failed"} == set(FAILING)
    assert len(result.stderr.strip().splitlines()) == len(FAILING)
    assert all(f"'{name}'" in result.stderr for name in FAILING)


def test_systemexit_misspelt_hook_and_garbage_registration_fail_only_their_plugin(fresh_env: Path) -> None:
    result = _plugins(fresh_env)
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert "SystemExit(3)" in rows["exits"]["error"]
    assert "'register_comands'" in rows["typo"]["error"] and "did you mean 'register_commands'" in rows["typo"]["error"]
    assert "register_commands" in rows["garbage"]["error"] and "expected a CommandSpec" in rows["garbage"]["error"]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DIFFSTUDIO_") and k != "PYTHONPATH"}
    helped = _run([str(fresh_env / "bin" / "diffstudio"), "--help"], env=clean)
    assert helped.returncode == 0 and "plugins" in helped.stdout and "Traceback" not in helped.stderr


def test_strict_mode_exits_non_zero_naming_the_plugin(fresh_env: Path) -> None:
    result = _plugins(fresh_env, DIFFSTUDIO_STRICT_PLUGINS="1")
    assert result.returncode != 0
    assert "broken" in result.stderr and "DIFFSTUDIO_STRICT_PLUGINS" in result.stderr


def test_block_and_allow_lists(fresh_env: Path) -> None:
    blocked = _plugins(fresh_env, DIFFSTUDIO_DISABLED_PLUGINS=",".join(FAILING))
    assert blocked.returncode == 0
    rows = {row["name"]: row for row in json.loads(blocked.stdout)}
    assert all(rows[name]["status"] == "blocked" for name in FAILING)
    assert blocked.stderr == ""
    allowed = _plugins(fresh_env, DIFFSTUDIO_LOAD_PLUGINS="example")
    rows = {row["name"]: row for row in json.loads(allowed.stdout)}
    assert rows["example"]["status"] == "loaded"
    assert rows["broken"]["status"] == "not allowed"
