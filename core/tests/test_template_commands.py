"""``diffstudio templates`` / ``diffstudio template list`` (issue 22.6): registered ids and target models, no torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from diffstudio.cli import main

ROOT = Path(__file__).resolve().parents[2]
TINT_SRC = ROOT / "examples" / "template-tint" / "src"


@pytest.fixture
def with_tint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(TINT_SRC))
    monkeypatch.setenv(
        "DIFFSTUDIO_PLUGINS", "diffstudio_tint.plugin,diffstudio_template_sdk.testing.toy_templates_plugin"
    )
    for name in ("DIFFSTUDIO_LOAD_PLUGINS", "DIFFSTUDIO_DISABLED_PLUGINS"):
        monkeypatch.delenv(name, raising=False)


def test_templates_command_lists_ids_and_target_models(with_tint: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["templates", "--json"]) == 0
    rows = {row["id"]: row for row in json.loads(capsys.readouterr().out)}
    tint = rows["example/tint"]
    assert tint["plugin"] in ("tint", "diffstudio_tint.plugin") and tint["target_model"] == "diffstudio/shapes"
    assert tint["dit_geometry"] == {"double_blocks": 2, "single_blocks": 4, "heads": 2, "head_dim": 64}
    assert tint["base_pipeline"] == "flux2" and "tint strength" in tint["description"]
    assert rows["toy/scale"]["target_model"] is None and rows["toy/scale"]["dit_geometry"] is None
    assert main(["templates"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["ID", "TARGET", "DESCRIPTION"]
    line = next(row for row in table if row.startswith("example/tint "))
    assert "diffstudio/shapes (2+4 blocks, 2x64)" in line
    assert any(row.startswith("toy/scale ") and "any toy model" in row for row in table)
    assert main(["template", "list", "--json"]) == 0
    assert {row["id"] for row in json.loads(capsys.readouterr().out)} == set(rows)


def _python(code: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIFFSTUDIO_")}
    env["PYTHONPATH"] = str(TINT_SRC)
    env["DIFFSTUDIO_PLUGINS"] = "diffstudio_tint.plugin"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)


def test_templates_command_and_help_import_no_torch() -> None:
    code = (
        "import sys\nfrom diffstudio.cli import main\n"
        "assert main(['templates', '--json']) == 0\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n"
    )
    result = _python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("NO-TORCH") and '"example/tint"' in result.stdout
    assert "templates" in result.stdout  # listed in --help


def test_templates_command_survives_a_closed_pipe() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIFFSTUDIO_")}
    env["PYTHONPATH"] = str(TINT_SRC)
    env["DIFFSTUDIO_PLUGINS"] = "diffstudio_tint.plugin"
    process = subprocess.Popen([sys.executable, "-m", "diffstudio", "templates", "--json"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=env)  # fmt: skip
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()  # before it writes: every write meets a closed pipe
    _, err = process.communicate(timeout=60)
    assert process.returncode in (0, 141) and b"Traceback" not in err, err.decode()  # 141: the CLI's closed-pipe exit
