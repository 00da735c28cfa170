"""``diffstudio run`` output names: a hash of the whole job, real seeds, resume skips only identical jobs (22.1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from diffstudio import Runtime, run
from diffstudio_shapes import model as shapes

DIFFSTUDIO = str(Path(sys.executable).with_name("diffstudio"))
SMALL = {"height": 32, "width": 32, "num_inference_steps": 1}
PROMPT = "a red circle on a blue background, drawn large in the middle of the picture, " + "x" * 20


def _env() -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DIFFSTUDIO_")}
    return {**clean, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def cli(*arguments: str) -> subprocess.CompletedProcess[str]:
    """Run the installed ``diffstudio`` entry point."""
    return subprocess.run([DIFFSTUDIO, *arguments], capture_output=True, text=True, timeout=600, env=_env())


def rows(result: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def runtime() -> Runtime:
    return Runtime()


def _name(runtime: Runtime, out: Path, prompt: str = PROMPT, **changes: Any) -> str:
    arguments = {**SMALL, **changes}
    (row,) = run(prompt, out=out, runtime=runtime, device="cpu", dry_run=True, **arguments)
    return Path(row["path"]).name


def test_changing_any_option_changes_the_output_name(runtime: Runtime, tmp_path: Path) -> None:
    base = _name(runtime, tmp_path)
    assert base.startswith("00000-a-red-circle-on-a-blue-background-drawn-s0-") and base.endswith(".png")
    files = [str(shapes.WEIGHTS / f) for f in (shapes.DIT_FILE, shapes.VAE_FILE, shapes.TEXT_ENCODER_FILE)]
    changed = {
        "steps": _name(runtime, tmp_path, num_inference_steps=2),
        "cfg": _name(runtime, tmp_path, cfg_scale=2.0),
        "size": _name(runtime, tmp_path, height=48),
        "prompt tail": _name(runtime, tmp_path, prompt=PROMPT + "y"),
        "model": _name(runtime, tmp_path, model=files),
        "template": _name(runtime, tmp_path, templates=["diffstudio/brightness"]),
        "template inputs": _name(
            runtime, tmp_path, templates=["diffstudio/brightness"], template_inputs=[{"scale": 0.7}]
        ),  # fmt: skip
        "dtype": _name(runtime, tmp_path, torch_dtype="bfloat16"),
        "negative": _name(runtime, tmp_path, negative_prompt="green"),
    }
    assert base not in changed.values() and len(set(changed.values())) == len(changed), changed
    assert _name(runtime, tmp_path) == base  # the same job: the same name
    assert _name(runtime, tmp_path, vram_limit=4.0) == base  # memory placement does not change pixels


def test_lora_file_change_changes_the_output_name(runtime: Runtime, tmp_path: Path) -> None:
    lora = tmp_path / "style.safetensors"
    lora.write_bytes(b"one")
    first = _name(runtime, tmp_path, loras=[str(lora)])
    assert first != _name(runtime, tmp_path, loras=[f"{lora}:0.5"])
    lora.write_bytes(b"other content")
    assert first != _name(runtime, tmp_path, loras=[str(lora)])


def test_resume_skips_only_identical_jobs_and_names_real_seeds(tmp_path: Path) -> None:
    out = tmp_path / "out"
    common = ["run", PROMPT, "--steps", "1", "--height", "32", "--width", "32", "--out", str(out), "--format", "json"]
    first = rows(cli(*common, "--num-images", "3", "--seed", "5"))
    assert [r["seed"] for r in first] == [5, 6, 7] and not any(r["skipped"] for r in first)
    names = [Path(r["path"]).name for r in first]
    assert [n.split("-s")[-1].split("-")[0] for n in names] == ["5", "6", "7"]
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = rows(cli(*common, "--num-images", "3", "--seed", "5", "--dry-run"))
    assert all(r["skipped"] for r in again) and [r["path"] for r in again] == [r["path"] for r in first]
    more_steps = rows(cli(*common, "--num-images", "1", "--seed", "5", "--cfg-scale", "2"))
    assert not more_steps[0]["skipped"] and Path(more_steps[0]["path"]).name not in names
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name in mtimes} == mtimes
    overwrite = rows(cli(*common, "--seed", "5", "--dry-run", "--overwrite"))
    assert overwrite[0]["path"] == first[0]["path"] and not overwrite[0]["skipped"]


def test_explicit_output_is_regenerated_when_its_job_changed(runtime: Runtime, tmp_path: Path) -> None:
    job = {"prompt": "a blue square", "output": "mine.png", "seed": 1, **SMALL}
    common = {"out": tmp_path, "runtime": runtime, "device": "cpu", "progress": False}
    (first,) = run(jobs=[job], **common)
    assert Path(first["path"]) == tmp_path / "mine.png" and not first["skipped"]
    assert run(jobs=[job], dry_run=True, **common)[0]["skipped"]
    assert not run(jobs=[{**job, "num_inference_steps": 2}], dry_run=True, **common)[0]["skipped"]
    names = [Path(r["path"]).name for r in run(jobs=[{**job, "num_images": 2}], dry_run=True, **common)]
    assert names == ["mine-s1.png", "mine-s2.png"]


def test_memory_flags_keep_pixels_and_fp8_is_part_of_the_job(runtime: Runtime, tmp_path: Path) -> None:
    import numpy as np
    from diffstudio.outputs import read_image_metadata
    from PIL import Image

    common = {"runtime": runtime, "device": "cpu", "progress": False, "seed": 4, **SMALL}
    (plain,) = run("a blue square", out=tmp_path / "plain", **common)
    (low,) = run("a blue square", out=tmp_path / "low", offload="disk", vram_limit=0.0001, **common)
    (fp8,) = run("a blue square", out=tmp_path / "fp8", fp8=True, **common)
    assert Path(low["path"]).name == Path(plain["path"]).name != Path(fp8["path"]).name
    images = [np.asarray(Image.open(r["path"]).convert("RGB"), dtype=np.int16) for r in (plain, low, fp8)]
    assert np.array_equal(images[0], images[1]) and np.abs(images[0] - images[2]).max() <= 64
    _, record = read_image_metadata(low["path"])
    assert record is not None and record["extra"]["memory"]["offload_device"] == "disk"
    _, record = read_image_metadata(fp8["path"])
    assert record is not None and record["job"]["fp8"] is True
