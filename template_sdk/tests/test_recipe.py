"""The template-recipe helpers: ``diffstudio train`` arguments that parse, and the weights install."""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO

import pytest
from diffstudio.train.config import config_from_args
from diffstudio_template_sdk.recipe import TRAIN_TASKS, DataRow, install_weights, train_argv, write_rows


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


def _bytes(data: bytes) -> DataRow:
    def draw(out: IO[bytes]) -> None:
        out.write(data)

    return DataRow(f"images/{data.decode()}.png", f"prompt {data.decode()}", {"scale": 0.5}, draw)


def test_write_rows_writes_missing_images_and_the_metadata(tmp_path: Path) -> None:
    metadata = write_rows(tmp_path, [_bytes(b"a"), _bytes(b"b")])
    rows = [json.loads(line) for line in metadata.read_text().splitlines()]
    assert rows == [{"image": "images/a.png", "prompt": "prompt a", "template_inputs": {"scale": 0.5}},
                    {"image": "images/b.png", "prompt": "prompt b", "template_inputs": {"scale": 0.5}}]  # fmt: skip
    assert (tmp_path / "images" / "b.png").read_bytes() == b"b"
    (tmp_path / "images" / "a.png").write_bytes(b"kept")  # an existing image is not drawn again
    write_rows(tmp_path, [_bytes(b"a")])
    assert (tmp_path / "images" / "a.png").read_bytes() == b"kept"
    assert len(metadata.read_text().splitlines()) == 1


def test_write_rows_leaves_nothing_partial_when_drawing_fails(tmp_path: Path) -> None:
    def broken(out: IO[bytes]) -> None:
        out.write(b"half")
        raise RuntimeError("renderer failed")

    write_rows(tmp_path, [_bytes(b"a")])
    before = (tmp_path / "metadata.jsonl").read_bytes()
    with pytest.raises(RuntimeError, match="renderer failed"):
        write_rows(tmp_path, [_bytes(b"a"), DataRow("images/c.png", "c", {}, broken)])
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["a.png"]  # no c.png, no temporary file
    assert (tmp_path / "metadata.jsonl").read_bytes() == before


@pytest.mark.parametrize("image", ["/tmp/x.png", "../x.png", "images/../../x.png"])
def test_write_rows_refuses_an_image_path_outside_the_folder(tmp_path: Path, image: str) -> None:
    with pytest.raises(ValueError, match="must be relative and stay inside"):
        write_rows(tmp_path / "data", [DataRow(image, "p", {}, lambda out: None)])
    assert not (tmp_path / "x.png").exists()
