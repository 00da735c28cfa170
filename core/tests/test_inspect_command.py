"""``diffstudio inspect FILE`` (issue 22.6): the claim, sizes and format of a checkpoint from its headers only."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffstudio.cli import main
from safetensors.torch import save_file

SHAPES = pytest.importorskip("diffstudio_shapes")
WEIGHTS = Path(SHAPES.__file__).resolve().parent / "weights"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["inspect", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_names_the_claim_sizes_and_format(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("diffstudio_flux2")
    code, out, _ = run(capsys, str(WEIGHTS / "flux2-shapes.safetensors"))
    assert code == 0
    assert "identified:  flux2-dit/" in out and "format:      safetensors" in out and "tensors:     49" in out
    code, out, _ = run(capsys, str(WEIGHTS / "ae.safetensors"), "--json")
    data = json.loads(out)
    assert code == 0 and data["claims"][0]["model_type"] == "flux2-vae" and data["files"][0]["header_bytes"] > 0
    assert data["tensors"] == sum(data["dtypes"].values()) and data["metadata"]["norm_groups"] == "8"


def test_inspect_recognises_a_lora(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("diffstudio_flux2")
    path = tmp_path / "style.safetensors"
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(2, 8),
               "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(24, 2)}, str(path))  # fmt: skip
    code, out, _ = run(capsys, str(path), "--json")
    assert code == 0 and "flux2/kohya" in json.loads(out)["lora_formats"]


def test_inspect_reads_only_headers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # a 64 GiB tensor in a sparse file: reading or mapping its data would take minutes or fail
    header = json.dumps({"w": {"dtype": "U8", "shape": [2**36], "data_offsets": [0, 2**36]}}).encode()
    path = tmp_path / "huge.safetensors"
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(header)) + header)
        handle.truncate(8 + len(header) + 2**36)
    code, out, _ = run(capsys, str(path), "--json")
    data = json.loads(out)
    assert code == 0 and data["data_bytes"] == 2**36 and data["claims"] == []


@pytest.mark.parametrize("kind", ["nested", "truncated", "pickle"])
def test_inspect_bad_file_is_a_one_line_typed_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    if kind == "nested":
        raw = b'{"a":' + b"[" * 10_000 + b"]" * 10_000 + b"}"
        path = tmp_path / "bad.safetensors"
        path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    elif kind == "truncated":
        path = tmp_path / "bad.safetensors"
        shutil.copy(WEIGHTS / "ae.safetensors", path)
        os.truncate(path, path.stat().st_size - 10)
    else:
        path = tmp_path / "model.bin"
        torch.save({"w": torch.zeros(2)}, path)
    code, out, err = run(capsys, str(path))
    assert code != 0 and out == ""
    assert err.count("\n") == 1 and err.startswith("diffstudio: error: ") and str(path) in err, err


def test_inspect_through_the_entry_point(tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("diffstudio")
    result = subprocess.run(
        [str(exe), "inspect", str(WEIGHTS / "flux2-shapes.safetensors"), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["tensors"] == 49
