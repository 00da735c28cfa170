"""``DIFFSTUDIO_TRACE_HOOKS=1 diffstudio run ...`` traces every hook it calls, through pluggy (issue 20.5)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
DIFFSTUDIO = str(Path(sys.executable).with_name("diffstudio"))


def test_trace_hooks_prints_load_model_and_pipeline_unit_from_the_cli(tmp_path: Path) -> None:
    pytest.importorskip("diffstudio_shapes")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIFFSTUDIO_")}
    env.update(DIFFSTUDIO_TRACE_HOOKS="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    arguments = ["run", "a red circle", "--steps", "1", "--width", "32", "--height", "32", "--out", str(tmp_path)]
    result = subprocess.run([DIFFSTUDIO, *arguments], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    traced = {line.split("[", 1)[0].removeprefix("diffstudio trace: ") for line in result.stderr.splitlines()
              if line.startswith("diffstudio trace: ")}  # fmt: skip
    assert {"load_model", "pipeline_unit", "vram_policy", "register_pipelines", "register_commands"} <= traced, traced
    calls = [line for line in result.stderr.splitlines() if line.startswith("diffstudio trace: load_model[")]
    assert any("flux2" in line for line in calls), calls  # names the plugins whose implementations ran
    assert list(tmp_path.glob("*.png"))
