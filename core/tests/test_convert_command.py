"""``diffstudio convert``: a nested pickle becomes a flat safetensors file; the pickle policy names the command."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffstudio.builtin.convert_command import convert_pickle
from diffstudio.cli import main
from diffstudio.errors import CheckpointError, PickleRefusedError
from diffstudio.loading import Checkpoint
from safetensors.torch import load_file


def test_convert_flattens_nested_pickles_and_keeps_one_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "image_proj_model.bin"
    nested = {"image_proj": {"latents": torch.randn(1, 2, 3), "proj_in.weight": torch.randn(3, 4)},
              "other": {"w": torch.ones(2)}}  # fmt: skip
    torch.save(nested, source)
    with pytest.raises(PickleRefusedError, match="diffstudio convert"):
        Checkpoint.open(source)
    assert sorted(Checkpoint.open(source, allow_pickle=True).keys()) == [
        "image_proj.latents", "image_proj.proj_in.weight", "other.w"
    ]
    assert main(["convert", str(source), str(tmp_path / "all.safetensors")]) == 0
    assert "3 tensors" in capsys.readouterr().out
    assert sorted(load_file(str(tmp_path / "all.safetensors"))) == ["image_proj.latents", "image_proj.proj_in.weight",
                                                                    "other.w"]  # fmt: skip
    done = convert_pickle(source, tmp_path / "proj.safetensors", key="image_proj")
    flat = load_file(done["target"])
    assert sorted(flat) == ["latents", "proj_in.weight"]
    assert torch.equal(flat["latents"], nested["image_proj"]["latents"])
    with pytest.raises(CheckpointError, match="no tensors under 'nothing'"):
        convert_pickle(source, tmp_path / "x.safetensors", key="nothing")
    with pytest.raises(CheckpointError, match=".safetensors"):
        convert_pickle(source, tmp_path / "x.bin")
