"""``diffstudio run`` errors speak of files and flags, name all that is missing at once, in one line (22.9, 21.4)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from diffstudio_shapes import model as shapes

pytestmark = pytest.mark.slow

DIFFSTUDIO = str(Path(sys.executable).with_name("diffstudio"))


def cli(*arguments: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIFFSTUDIO_")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([DIFFSTUDIO, *arguments], capture_output=True, text=True, timeout=600, env=env)


def error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    return result.stderr


def test_run_help_lists_every_flag_without_torch() -> None:
    result = cli("run", "--help")
    assert result.returncode == 0
    for flag in ("--from", "--lora", "--image", "--mask", "--denoising-strength", "--edit-image", "--scheduler",
                 "--shift", "--tokenizer", "--vram-limit", "--offload", "--fp8", "--guidance", "--overwrite",
                 "--dry-run"):  # fmt: skip
        assert flag in result.stdout, flag


def test_missing_model_file_names_the_file_not_repository_ids(tmp_path: Path) -> None:
    message = error(cli("run", "a cat", "--model", str(tmp_path / "absent.safetensors"), "--out", str(tmp_path)))
    assert "absent.safetensors: no such file or folder" in message and "Use path=" not in message


def test_missing_components_are_named_at_once_with_the_flag(tmp_path: Path) -> None:
    message = error(cli("run", "a cat", "--model", str(shapes.WEIGHTS / shapes.DIT_FILE), "--out", str(tmp_path)))
    assert "text_encoder" in message and "vae" in message and "--model" in message
    assert "unit '" not in message and "edit" not in message


def test_missing_tokenizer_points_to_the_tokenizer_flag(tmp_path: Path) -> None:
    shutil.copytree(shapes.WEIGHTS / "text_encoder", tmp_path / "te" / "text_encoder")  # no tokenizer/ beside it
    models = [
        str(shapes.WEIGHTS / shapes.DIT_FILE),
        str(shapes.WEIGHTS / shapes.VAE_FILE),
        str(tmp_path / "te" / "text_encoder"),
    ]
    arguments = [a for m in models for a in ("--model", m)]
    message = error(cli("run", "a cat", *arguments, "--out", str(tmp_path / "o"), "--steps", "1", "--width", "32"))
    assert "--tokenizer DIR" in message and "tokenizer_config=" not in message.split("Details:")[0]


def test_device_and_dtype_errors_are_one_line(tmp_path: Path) -> None:
    if not __import__("torch").cuda.is_available():
        assert "--device cuda: not available on this machine" in error(cli("run", "a", "--device", "cuda"))
    assert "--dtype (dtype=): must be one of" in error(cli("run", "a", "--dtype", "int8"))
    assert "--steps (num_inference_steps=): must be from 1" in error(cli("run", "a", "--steps", "0"))


def test_job_file_output_outside_out_is_a_one_line_error(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps({"prompt": "b", "output": "../x.png"}) + "\n")
    message = error(cli("run", "--jobs", str(jobs), "--out", str(tmp_path / "out")))
    assert "jobs.jsonl:2: job 1: output '../x.png' contains '..'" in message
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "out").exists()
    jobs.write_text(json.dumps({"prompt": "a", "num_images": 1e9}))
    assert "'num_images' must be an integer" in error(cli("run", "--jobs", str(jobs), "--out", str(tmp_path / "out")))
