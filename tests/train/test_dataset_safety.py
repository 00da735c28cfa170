"""Training data from elsewhere: decompression bombs, paths leaving the data set folder, broken metadata."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest
from diffstudio.train.config import config_from_args
from diffstudio.train.data import DatasetError, TrainingDataset, load_image
from PIL import Image


def png(path: Path, width: int = 32, height: int = 32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), (200, 30, 30)).save(path)
    return path


def bomb(path: Path, width: int, height: int) -> Path:
    """A small PNG whose header claims ``width x height`` (the IHDR chunk rewritten, CRC fixed)."""
    data = bytearray(png(path, 1, 1).read_bytes())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def dataset(base: Path, rows: list[dict[str, object]], **options: object) -> TrainingDataset:
    metadata = base / "metadata.json"
    metadata.write_text(json.dumps(rows))
    return TrainingDataset(base, metadata, height=32, width=32, **options)  # type: ignore[arg-type]


@pytest.mark.parametrize(("width", "height"), [(20000, 20000), (10000, 9000)])
def test_decompression_bomb_png_is_a_typed_error_naming_the_file(tmp_path, width, height):
    """21.9: over 2x PIL's limit PIL raises DecompressionBombError, over 1x it warns: both are DatasetErrors."""
    bomb(tmp_path / "bomb.png", width, height)
    with pytest.raises(DatasetError, match=r"row 0: image file .*bomb\.png .*(too large|decompression-bomb limit)"):
        dataset(tmp_path, [{"image": "bomb.png", "prompt": "a"}])
    with pytest.raises(DatasetError, match=r"bomb\.png"):
        load_image(tmp_path / "bomb.png", (32, 32))


def test_dataset_paths_outside_the_folder_are_refused_unless_allowed(tmp_path):
    """21.9: '..', absolute paths and symbolic links leaving --dataset_base_path need --allow_outside_dataset."""
    base, outside = tmp_path / "data", png(tmp_path / "secret.png")
    png(base / "images" / "ok.png")
    (base / "images" / "link.png").symlink_to(outside)
    (base / "inner.png").symlink_to(base / "images" / "ok.png")  # a link that stays inside is fine
    assert len(dataset(base, [{"image": "images/ok.png", "prompt": "a"}, {"image": "inner.png", "prompt": "b"}])) == 2
    for value in ["../secret.png", str(outside), "images/link.png", "images/../../secret.png"]:
        rows = [{"image": "images/ok.png", "prompt": "a"}, {"image": value, "prompt": "b"}]
        with pytest.raises(
            DatasetError, match=r"row 1: image: .* outside --dataset_base_path .*--allow_outside_dataset"
        ):
            dataset(base, rows)
        assert dataset(base, rows, allow_outside=True).rows[1].files["image"].resolve() == outside.resolve()


@pytest.mark.parametrize(
    ("value", "message"),
    [(3, "a file path must be text"), ("a\x00b.png", "NUL character"), ("x" * 5000, "cannot be resolved|outside"),
     ({"path": "x.png"}, "a file path must be text")],
)  # fmt: skip
def test_odd_metadata_paths_are_typed_errors(tmp_path, value, message):
    png(tmp_path / "ok.png")
    with pytest.raises(DatasetError, match=message):
        dataset(tmp_path, [{"image": value, "prompt": "a"}])
    with pytest.raises(DatasetError, match=message):
        dataset(tmp_path, [{"image": value, "prompt": "a"}], allow_outside=True)


def test_csv_rows_with_more_cells_than_columns_and_deep_json_are_typed_errors(tmp_path):
    png(tmp_path / "ok.png")
    (tmp_path / "m.csv").write_text("image,prompt\nok.png,a,extra\n")
    with pytest.raises(DatasetError, match="more cells than the header"):
        TrainingDataset(tmp_path, tmp_path / "m.csv", height=32, width=32)
    (tmp_path / "m.json").write_text("[" * 100000)
    with pytest.raises(DatasetError, match="cannot be parsed"):
        TrainingDataset(tmp_path, tmp_path / "m.json", height=32, width=32)


def test_allow_outside_dataset_flag_in_both_spellings():
    base = ["--dataset_base_path", "d", "--dataset_metadata_path", "m.csv", "--model_paths", '["x"]',
            "--trainable_models", "dit"]  # fmt: skip
    assert not config_from_args(base).allow_outside_dataset
    assert config_from_args([*base, "--allow_outside_dataset"]).allow_outside_dataset
    assert config_from_args([*base, "--allow-outside-dataset"]).allow_outside_dataset
