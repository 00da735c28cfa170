"""Opening a checkpoint for identification: stale shard indexes, and errors that name the file (issue 21)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffstudio import ModelConfig
from diffstudio.errors import StrictLoadError
from diffstudio.identify import naming_source, open_checkpoint
from diffstudio.loading import Checkpoint, DuplicateTensorError, ShardIndexError, load_state_dict_into
from diffstudio.runtime import Runtime
from diffstudio.types import LoadRequest, ModelClaim
from safetensors.torch import save_file
from torch import nn


def folder_with_single_file(tmp_path: Path, index: str | None) -> Path:
    save_file({"w": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    if index is not None:
        (tmp_path / "model.safetensors.index.json").write_text(index)
    return tmp_path


@pytest.mark.parametrize(
    ("index", "words"),
    [
        ("{not json", ("Cannot read the shard index",)),
        (json.dumps({"weight_map": {"w": "model-00001-of-00002.safetensors"}}), ("do not exist",)),
        (json.dumps({"metadata": {}}), ("no weight_map",)),
    ],
    ids=["bad-json", "missing-shard", "no-weight-map"],
)
def test_broken_index_beside_a_complete_single_file_is_refused(tmp_path: Path, index: str, words: tuple[str]) -> None:
    # before: the index was dropped with the other non-weight files and model.safetensors loaded without a word
    folder = folder_with_single_file(tmp_path, index)
    with pytest.raises(ShardIndexError) as info:
        open_checkpoint(Runtime(), ModelConfig(path=str(folder)))
    message = str(info.value)
    assert "model.safetensors.index.json" in message and "delete the stale index" in message
    assert "model.safetensors" in message.split("The folder also holds", 1)[1]
    for word in words:
        assert word in message
    # the file itself still opens
    assert open_checkpoint(Runtime(), ModelConfig(path=str(folder / "model.safetensors"))).keys() == ["w"]


def test_valid_index_is_checked_and_a_second_copy_is_reported(tmp_path: Path) -> None:
    folder = folder_with_single_file(tmp_path, None)
    assert open_checkpoint(Runtime(), ModelConfig(path=str(folder))).keys() == ["w"]
    save_file({"w": torch.ones(2)}, str(folder / "model-00001-of-00001.safetensors"))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "model-00001-of-00001.safetensors"}})
    )
    with pytest.raises(DuplicateTensorError):  # two copies of the same weights: the user must pick one
        open_checkpoint(Runtime(), ModelConfig(path=str(folder)))
    (folder / "model.safetensors").unlink()
    assert open_checkpoint(Runtime(), ModelConfig(path=str(folder))).keys() == ["w"]


def test_strict_load_error_names_the_file_for_every_plugin(tmp_path: Path) -> None:
    path = tmp_path / "linear.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, str(path))  # no bias

    def load(checkpoint: Checkpoint, request: LoadRequest) -> nn.Module:
        model = nn.Linear(2, 2)
        load_state_dict_into(model, checkpoint.state_dict())  # a plugin that does not pass source=
        return model

    claim = naming_source(ModelClaim("test", "linear", "dit", "bfl", load))
    with pytest.raises(StrictLoadError, match="Missing keys") as info:
        claim.load(Checkpoint.open(path), LoadRequest(ModelConfig(path=str(path)), None, "cpu"))
    assert f"from {path}" in str(info.value) and info.value.source == str(path)
