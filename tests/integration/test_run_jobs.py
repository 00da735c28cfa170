"""``diffstudio run`` over a job file: data parallel under ``accelerate launch``, idempotent re-runs, metadata."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from diffstudio_template_sdk.testing import toy

pytestmark = pytest.mark.slow

TOY_ENV = {"DIFFSTUDIO_PLUGINS": "diffstudio_template_sdk.testing.toy_plugin", "HF_HUB_OFFLINE": "1"}


def _env() -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DIFFSTUDIO_")}
    return {**clean, **TOY_ENV, "OMP_NUM_THREADS": "1"}


def _json_rows(stdout: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


@pytest.fixture
def job_setup(tmp_path: Path) -> tuple[Path, Path, Path]:
    model = toy.write_toy_checkpoint(tmp_path / "toy.safetensors")
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("\n".join(json.dumps({"prompt": f"prompt number {i}", "steps": 2}) for i in range(8)) + "\n")
    return model, jobs, tmp_path / "out"


def test_accelerate_two_processes_write_each_image_once(job_setup: tuple[Path, Path, Path]) -> None:
    model, jobs, out = job_setup
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    command = [
        accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--main_process_port", "0",
        "--mixed_precision", "no",
        "--dynamo_backend", "no", "-m", "diffstudio", "run", "--jobs", str(jobs), "--model", str(model),
        "--out", str(out), "--format", "json",
    ]
    first = subprocess.run(command, capture_output=True, text=True, timeout=600, env=_env())
    assert first.returncode == 0, first.stderr[-3000:]
    rows = _json_rows(first.stdout)
    written = [row["path"] for row in rows if not row["skipped"]]
    assert len(written) == 8 and len(set(written)) == 8, rows
    assert sorted(p.name for p in out.iterdir()) == sorted(Path(str(p)).name for p in written)

    mtimes = {p: p.stat().st_mtime_ns for p in out.iterdir()}
    second = subprocess.run(command, capture_output=True, text=True, timeout=600, env=_env())
    assert second.returncode == 0, second.stderr[-3000:]
    rows = _json_rows(second.stdout)
    assert len(rows) == 8 and all(row["skipped"] for row in rows)
    assert {p: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes


def test_single_process_run_writes_parameters(job_setup: tuple[Path, Path, Path]) -> None:
    from diffstudio.outputs import read_image_metadata

    model, _, out = job_setup
    command = [sys.executable, "-m", "diffstudio", "run", "a blue square", "--model", str(model), "--out", str(out),
               "--seed", "42", "--steps", "3", "--format", "json"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=_env())
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = _json_rows(result.stdout)
    parameters, spec = read_image_metadata(str(row["path"]))
    assert parameters is not None and parameters.startswith("a blue square\n")
    assert "Seed: 42" in parameters and "Steps: 3" in parameters
    assert spec is not None and spec["seed"] == 42


def test_no_model_and_no_embedded_default_gives_clear_message(tmp_path: Path) -> None:
    env = _env()
    env["DIFFSTUDIO_DISABLED_PLUGINS"] = "shapes"
    result = subprocess.run([sys.executable, "-m", "diffstudio", "run", "a cat", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 1
    assert "embedded default model 'diffstudio/shapes' is not installed" in result.stderr
    assert "Traceback" not in result.stderr
