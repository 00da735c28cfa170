"""Fuzz job files (issue 21.4): random rows, types, paths and numbers through ``load_jobs`` and output containment.

The oracle is the job validity spec written out independently of ``diffstudio.jobs``: every known field (and short
name) with its type and range, booleans never integers, finite numbers only, outputs relative, without ``..``,
with an image extension and not through a link leading out of the output folder. Invalid files must be refused
with a typed error; valid ones accepted.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from diffstudio.jobs import contained, load_jobs
from diffstudio.testing import import_file
from hypothesis import given
from hypothesis import strategies as st

harness = import_file(Path(__file__).resolve().parent / "harness.py")

WORK = Path(tempfile.mkdtemp(prefix="fuzz-jobs-"))
OUT = WORK / "out"
OUT.mkdir()
(WORK / "outside").mkdir()
os.symlink(WORK / "outside", OUT / "link")

ALIASES = {"steps": "num_inference_steps", "cfg": "cfg_scale", "negative": "negative_prompt", "guidance":
           "embedded_guidance", "image": "input_image", "mask": "inpaint_mask", "strength": "denoising_strength",
           "edit_images": "edit_image", "reference_images": "edit_image", "kontext_images": "edit_image",
           "lora": "loras", "template": "templates"}  # fmt: skip
INTS = {"seed": (0, 2**63 - 1 - 10_000), "num_images": (1, 10_000), "num_inference_steps": (1, 10_000),
        "height": (1, 16_384), "width": (1, 16_384), "max_sequence_length": (1, 4096),
        "t5_sequence_length": (1, 4096)}  # fmt: skip
FLOATS = {"cfg_scale": (0.0, 100.0, False), "embedded_guidance": (0.0, 100.0, False),
          "denoising_strength": (0.0, 1.0, True), "shift": (0.0, 100.0, True)}  # fmt: skip
PATHS = {"input_image", "inpaint_mask", "output"}
PATH_LISTS = {"model", "tokenizer", "templates", "edit_image"}
DTYPES = {"float32", "float16", "bfloat16", "float64", "fp32", "fp16", "bf16", "fp64", "half", "float", "double"}
KNOWN = set(INTS) | set(FLOATS) | PATHS | PATH_LISTS | {
    "prompt", "negative_prompt", "loras", "template_inputs", "negative_template_inputs", "scheduler", "sigmas",
    "dtype", "fp8", "sha256"}  # fmt: skip
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


def is_int(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def is_number(value: Any, low: float, high: float, low_open: bool) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    number = float(value)
    return math.isfinite(number) and low <= number <= high and not (low_open and number == low)


def is_path(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip()) and "\0" not in value and len(value) <= 4096


def is_lora(item: Any) -> bool:
    if isinstance(item, str):
        head, sep, tail = item.rpartition(":")
        if sep and head and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", tail.strip()):
            return is_path(head) and is_number(float(tail), -100.0, 100.0, False)
        return is_path(item)
    if isinstance(item, dict):
        return set(item) <= {"path", "scale", "name"} and "path" in item and is_path(item["path"]) and is_number(
            item.get("scale", 1.0), -100.0, 100.0, False
        )
    return False


def output_ok(value: str) -> bool:
    posix, windows = PurePosixPath(value.replace("\\", "/")), PureWindowsPath(value)
    if posix.is_absolute() or windows.drive or windows.root or ".." in posix.parts or not posix.parts:
        return False
    if any(len(part.encode("utf-8", "surrogatepass")) > 255 for part in posix.parts):
        return False
    if posix.suffix.lower() not in IMAGE_SUFFIXES:
        return False
    real, root = os.path.realpath(OUT / value), os.path.realpath(OUT)
    return os.path.commonpath([root, real]) == root and real != root


def value_ok(name: str, value: Any) -> bool:
    if name in INTS:
        return is_int(value, *INTS[name])
    if name in FLOATS:
        return is_number(value, *FLOATS[name])
    if name == "prompt":
        return isinstance(value, str) and bool(value.strip())
    if name == "negative_prompt":
        return isinstance(value, str)
    if name in PATHS:
        return is_path(value) and (name != "output" or output_ok(value))
    if name in PATH_LISTS:
        items = [value] if isinstance(value, str) else value
        return isinstance(items, list) and 0 < len(items) <= 1000 and all(is_path(i) for i in items)
    if name == "loras":
        items = [value] if isinstance(value, (str, dict)) else value
        return isinstance(items, list) and len(items) <= 1000 and all(is_lora(i) for i in items)
    if name in ("template_inputs", "negative_template_inputs"):
        items = [value] if isinstance(value, dict) else value
        return isinstance(items, list) and len(items) <= 1000 and all(isinstance(i, dict) for i in items)
    if name == "scheduler":
        return isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9_.\-/]{1,100}", value) is not None
    if name == "sigmas":
        return isinstance(value, list) and 0 < len(value) <= 10_000 and all(is_number(v, 0, 1, True) for v in value)
    if name == "dtype":
        return isinstance(value, str) and value.strip().lower().removeprefix("torch.") in DTYPES
    if name == "fp8":
        return isinstance(value, bool)
    if name == "sha256":
        return isinstance(value, dict) and all(
            is_path(k) and isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) for k, v in value.items()
        )
    raise AssertionError(name)


def row_ok(row: Any) -> bool:
    if not isinstance(row, dict):
        return False
    seen: set[str] = set()
    for key, value in row.items():
        name = ALIASES.get(key, key)
        if name not in KNOWN or name in seen or not value_ok(name, value):
            return False
        seen.add(name)
    return "prompt" in seen


# ----------------------------------------------------------------------------------------------------------
# strategies
# ----------------------------------------------------------------------------------------------------------

ANY = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
PATHLIKE = st.sampled_from(
    ["a.png", "sub/b.jpg", "../x.png", "/abs/x.png", "link/x.png", "link/../y.png", "x.txt", "a/../b.png", "",
     "C:\\x.png", "..\\x.png", "ok.webp", "nul\0.png", "  ", "x" * 300 + ".png", "deep/er/c.TIFF", "link"]
) | st.text(max_size=12).map(lambda t: t + ".png")  # fmt: skip
VALID = {
    **{name: st.integers(low, min(high, low + 100)) for name, (low, high) in INTS.items()},
    **{name: st.floats(low, high) for name, (low, high, _) in FLOATS.items()},
    "prompt": st.text(min_size=1, max_size=30),
    "negative_prompt": st.text(max_size=10),
    "loras": st.lists(st.sampled_from(["l.safetensors", "l.safetensors:0.5", {"path": "x", "scale": 2}]), max_size=2),
    "template_inputs": st.lists(st.dictionaries(st.text(max_size=4), st.integers()), max_size=2),
    "scheduler": st.sampled_from(["flux2", "static", "bad name!", ""]),
    "sigmas": st.lists(st.floats(0, 1), max_size=3),
    "dtype": st.sampled_from(["fp16", "bfloat16", "torch.float32", "int8", "Float32 "]),
    "fp8": st.booleans(),
    "sha256": st.dictionaries(st.sampled_from(["a", ""]), st.sampled_from(["0" * 64, "A" * 64, "0" * 63])),
}


@st.composite
def rows(draw: st.DrawFn) -> Any:
    if draw(st.integers(0, 30)) == 0:
        return draw(ANY)
    row: dict[str, Any] = {}
    if draw(st.integers(0, 10)) > 0:
        row["prompt"] = draw(VALID["prompt"])
    names = sorted(KNOWN | set(ALIASES) | {"sampler", "Prompt", "format", "trust_code"})
    for key in draw(st.lists(st.sampled_from(names), max_size=4, unique=True)):
        canonical = ALIASES.get(key, key)
        if canonical in PATHS or canonical in PATH_LISTS:
            strategy = PATHLIKE if canonical in PATHS else PATHLIKE | st.lists(PATHLIKE, max_size=3)
        else:
            strategy = VALID.get(canonical, ANY)
        row[key] = draw(strategy | ANY if draw(st.booleans()) else strategy)
    return row


@given(st.lists(rows(), min_size=0, max_size=4), st.sampled_from(["jsonl", "json", "garbage", "deep"]))
def test_fuzz_job_files(file_rows: list[Any], layout: str) -> None:
    path = WORK / "jobs.jsonl"
    if layout == "json":
        text = json.dumps(file_rows)
    elif layout == "jsonl":
        text = "\n".join(json.dumps(row) for row in file_rows)
    elif layout == "garbage":
        text = "\n".join(json.dumps(row) for row in file_rows) + "\n{not json"
    else:
        text = "[" * 50_000 + "]" * 50_000
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    valid = layout in ("json", "jsonl") and bool(file_rows) and all(row_ok(row) for row in file_rows)
    if layout == "jsonl" and any(not isinstance(r, dict) for r in file_rows):
        valid = False

    def call() -> None:
        for job in load_jobs(path):
            if job.output is not None:
                contained(OUT, job.output)

    harness.check("jobs", call, should_fail=not valid, example=text[:400])
