"""Job rows and job files (``diffstudio.jobs``): every field typed and ranged, outputs contained, records replayable."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from diffstudio.errors import DiffstudioError
from diffstudio.jobs import (
    FIELDS,
    JobFieldError,
    JobFileError,
    OutputPathError,
    contained,
    load_jobs,
    parse_lora,
    row_from_record,
    validate_row,
)
from diffstudio.outputs import GenerationRecord, record_to_dict


def _write(tmp_path: Path, rows: list[Any]) -> Path:
    path = tmp_path / "jobs.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return path


@pytest.mark.parametrize("output", ["../x.png", "/tmp/x.png", "a/../../x.png", "C:\\x.png", "sub\\..\\..\\x.png"])
def test_job_output_outside_out_is_refused(tmp_path: Path, output: str) -> None:
    path = _write(tmp_path, [{"prompt": "a", "output": output}])
    with pytest.raises(JobFieldError, match=r"jobs.jsonl:1: job 0: output") as caught:
        load_jobs(path)
    assert caught.value.field == "output" and caught.value.line == 1


def test_job_output_through_a_symlink_outside_out_is_refused(tmp_path: Path) -> None:
    out, outside = tmp_path / "out", tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    os.symlink(outside, out / "link")
    with pytest.raises(OutputPathError, match="outside the output folder"):
        contained(out, "link/x.png")
    assert contained(out, "sub/x.png") == out / "sub" / "x.png"
    with pytest.raises(OutputPathError, match="not an image file name"):
        contained(out, "x.sh")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("num_images", 1e9, "must be an integer"),
        ("num_images", "abc", "must be an integer"),
        ("num_images", -1, "must be from 1"),
        ("num_images", 0, "must be from 1"),
        ("num_images", True, "must be an integer"),
        ("seed", True, "must be an integer"),
        ("seed", 1.5, "must be an integer"),
        ("seed", -1, "must be from 0"),
        ("seed", 2**70, "must be from 0"),
        ("steps", 0, "must be from 1"),
        ("cfg_scale", float("nan"), "finite"),
        ("cfg_scale", "3", "must be a number"),
        ("height", 10**9, "must be from 1"),
        ("denoising_strength", 0, r"must be in \(0"),
        ("prompt", None, "must be a string"),
        ("prompt", "   ", "non-empty"),
        ("loras", [{"path": "x", "scale": float("inf")}], "finite"),
        ("fp8", "yes", "true or false"),
        ("template_inputs", ["scale"], "object"),
        ("model", [], "non-empty list"),
        ("sha256", {"x": "abc"}, "SHA-256"),
    ],
)
def test_job_fields_are_typed_and_ranged(field: str, value: Any, message: str) -> None:
    row = {"prompt": "a cat", field: value}
    with pytest.raises(JobFieldError, match=message) as caught:
        validate_row(row, 3, source="jobs.jsonl", line=4)
    assert caught.value.field == field and f"jobs.jsonl:4: job 3: {field!r}" in str(caught.value)


def test_unknown_job_field_lists_known_fields() -> None:
    with pytest.raises(JobFieldError, match="unknown field 'sampler'") as caught:
        validate_row({"prompt": "a", "sampler": "Euler"}, 0)
    assert all(name in str(caught.value) for name in ("num_inference_steps", "loras", "steps=num_inference_steps"))
    with pytest.raises(JobFieldError, match="name the same field"):
        validate_row({"prompt": "a", "steps": 2, "num_inference_steps": 3}, 0)
    with pytest.raises(JobFieldError, match='has no "prompt"'):
        validate_row({"seed": 1}, 0)
    with pytest.raises(JobFieldError, match="is a JSON list"):
        validate_row([1], 0)


def test_job_file_errors_are_typed(tmp_path: Path) -> None:
    cases = {"deep.json": "[" * 100_000 + "]" * 100_000, "bad.jsonl": "{nope", "empty.jsonl": "\n\n",
             "digits.jsonl": '{"prompt": "a", "seed": ' + "9" * 5000 + "}", "latin.jsonl": b"\xff\xfe"}  # fmt: skip
    for name, text in cases.items():
        path = tmp_path / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(JobFileError):
            load_jobs(path)
    with pytest.raises(JobFileError, match="cannot read"):
        load_jobs(tmp_path / "missing.jsonl")


def test_job_paths_are_relative_to_the_job_file(tmp_path: Path) -> None:
    (tmp_path / "lora.safetensors").write_bytes(b"")
    path = _write(tmp_path, [{"prompt": "a", "lora": ["lora.safetensors:0.5"], "image": "absent.png", "steps": 2}])
    (job,) = load_jobs(path)
    assert job.fields["loras"] == [{"path": str(tmp_path / "lora.safetensors"), "scale": 0.5}]
    assert job.fields["input_image"] == "absent.png" and job.fields["num_inference_steps"] == 2
    assert job.seed == 0 and job.seeds == [0]


def test_lora_flag_parses_file_and_scale() -> None:
    assert parse_lora("x.safetensors") == ("x.safetensors", 1.0)
    assert parse_lora("x.safetensors:0.8") == ("x.safetensors", 0.8)
    assert parse_lora("C:\\l\\x.safetensors:-1e-1") == ("C:\\l\\x.safetensors", -0.1)
    assert parse_lora("C:\\x.safetensors") == ("C:\\x.safetensors", 1.0)


def test_png_record_is_a_valid_job_line() -> None:
    job = {"prompt": "a red circle", "seed": 7, "num_images": 1, "num_inference_steps": 2,
           "model": ["diffstudio/shapes"], "loras": [{"path": "/x/l.safetensors", "scale": 0.5}],
           "dtype": "float32"}  # fmt: skip
    record = record_to_dict(GenerationRecord(prompt="a red circle", seed=7, steps=2, job=job, job_hash="0123456789"))
    line = json.loads(json.dumps(record))
    replayed = validate_row(line, 0)
    assert replayed.prompt == "a red circle" and replayed.seed == 7 and replayed.fields["num_inference_steps"] == 2
    old = {k: v for k, v in line.items() if k not in ("job", "job_hash")}  # a record written before "job" existed
    old["model"] = {"name": "m", "hash": None, "files": [{"path": "/m.safetensors", "sha256": "a" * 64}]}
    rebuilt = row_from_record(old)
    assert rebuilt["model"] == ["/m.safetensors"] and rebuilt["sha256"] == {"/m.safetensors": "a" * 64}
    assert validate_row(old, 0).fields["num_inference_steps"] == 2


def test_every_field_has_a_description_and_errors_are_diffstudio_errors() -> None:
    assert all(description for _, description in FIELDS.values())
    assert issubclass(JobFieldError, DiffstudioError) and issubclass(OutputPathError, DiffstudioError)


def test_seed_with_jobs_is_refused_not_ignored(tmp_path: Path) -> None:
    from diffstudio import run
    from diffstudio.errors import PipelineInputError

    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"prompt": "a red circle"}) + "\n")
    with pytest.raises(PipelineInputError, match="--seed 7 does not apply to --jobs"):
        run(jobs=jobs, seed=7, out=tmp_path / "out", dry_run=True, progress=False)
    planned = run(jobs=jobs, out=tmp_path / "out", dry_run=True, progress=False)
    assert [row["seed"] for row in planned] == [0]


def test_seed_beside_from_overrides_the_recorded_seed(tmp_path: Path) -> None:
    from diffstudio import run
    from diffstudio.outputs import save_image
    from PIL import Image

    job = {"prompt": "a red circle", "seed": 3, "num_images": 1, "num_inference_steps": 2}
    record = GenerationRecord(prompt="a red circle", seed=3, steps=2, job=job, job_hash="0123456789")
    png = tmp_path / "recorded.png"
    save_image(Image.new("RGB", (16, 16)), png, record)
    assert [row["seed"] for row in run(from_images=[png], out=tmp_path / "out", dry_run=True, progress=False)] == [3]
    replanned = run(from_images=[png], seed=11, out=tmp_path / "out", dry_run=True, progress=False)
    assert [row["seed"] for row in replanned] == [11]
