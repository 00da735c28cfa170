"""The template-recipe helpers: ``diffstudio train`` arguments that parse, and the weights install."""

from __future__ import annotations

from pathlib import Path

import pytest
from diffstudio.train.config import config_from_args
from diffstudio_template_sdk.recipe import TRAIN_TASKS, install_weights, train_argv


def test_train_argv_parses_into_a_template_training_config(tmp_path: Path) -> None:
    for task in TRAIN_TASKS:
        argv = train_argv(tmp_path / "data", tmp_path / "out", ["dit.safetensors"], tmp_path / "tokenizer",
                          template="example/tint", trainable="template_model.up", task=task, steps=7)  # fmt: skip
        cfg = config_from_args(argv)
        assert (cfg.task, cfg.max_steps, cfg.save_steps) == (task, 7, 7)
        assert cfg.trainable_models == ["template_model.up"] and cfg.template_model_id_or_path == "example/tint"
        assert cfg.remove_prefix_in_ckpt == "pipe.template_model." and cfg.extra_inputs == ["template_inputs"]
        assert cfg.dataset_metadata_path == str(tmp_path / "data" / "metadata.jsonl")


def test_install_weights_copies_the_data_only_file_and_names_a_wrong_folder(tmp_path: Path) -> None:
    trained = tmp_path / "step-3"
    trained.mkdir()
    (trained / "model.safetensors").write_bytes(b"weights")
    target = install_weights(trained, tmp_path / "weights" / "t.safetensors")
    assert target.read_bytes() == b"weights"
    with pytest.raises(FileNotFoundError, match=r"step-N"):
        install_weights(tmp_path, tmp_path / "weights" / "t.safetensors")
