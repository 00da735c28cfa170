"""The lazy Checkpoint view: sources, shards and indexes, memory-mapped tensors, pickle policy."""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffstudio.errors import CheckpointError, PickleRefusedError, SafetensorsFormatError
from diffstudio.loading import (
    Checkpoint,
    CheckpointChangedError,
    CheckpointFileNotFoundError,
    DuplicateTensorError,
    NoWeightFilesError,
    PickleContentError,
    ShardIndexError,
    TensorNotFoundError,
    UnsupportedDtypeError,
    UnsupportedFileError,
)
from diffstudio.loading.pickle_policy import torch_supports_safe_pickle
from diffstudio.loading.safetensors_header import IncompleteBufferError
from safetensors.torch import save_file


def mapped_file(address: int) -> str | None:
    """The file backing ``address`` in this process's memory map (Linux), or None when anonymous."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        low, high = (int(x, 16) for x in fields[0].split("-"))
        if low <= address < high:
            return fields[5] if len(fields) == 6 else None
    return None


needs_proc_maps = pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")


def sample_tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "double_blocks.0.img_attn.qkv.weight": torch.randn(12, 4),
        "double_blocks.1.img_attn.qkv.weight": torch.randn(12, 4),
        "double_blocks.0.img_attn.norm.scale": torch.randn(4),
        "img_in.weight": torch.randn(4, 6),
        "bf16": torch.randn(5).to(torch.bfloat16),
        "e4m3": torch.randn(7).to(torch.float8_e4m3fn),
        "e5m2": torch.randn(3).to(torch.float8_e5m2),
        "flags": torch.tensor([True, False, True]),
        "ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
    }


def write_shards(
    folder: Path, tensors: dict[str, torch.Tensor], parts: int, *, index: bool = True
) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    shards: list[Path] = []
    weight_map: dict[str, str] = {}
    for i in range(parts):
        chunk = names[i::parts]
        shard = folder / f"model-{i + 1:05d}-of-{parts:05d}.safetensors"
        save_file({n: tensors[n] for n in chunk}, str(shard), metadata={"format": "pt", f"shard{i}": str(i)})
        shards.append(shard)
        weight_map.update({n: shard.name for n in chunk})
    if index:
        data = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(data))
    return shards


@pytest.fixture
def single(tmp_path: Path) -> Path:
    path = tmp_path / "model.safetensors"
    save_file(sample_tensors(), str(path), metadata={"format": "pt", "modelspec.title": "tiny"})
    return path


def test_single_file_header_information(single: Path) -> None:
    expected = sample_tensors()
    checkpoint = Checkpoint.open(single)
    assert checkpoint.source == str(single)
    assert checkpoint.files == (single.resolve(),)
    assert checkpoint.keys() == sorted(expected)
    assert list(checkpoint) == sorted(expected) and len(checkpoint) == len(expected)
    assert "img_in.weight" in checkpoint and "nope" not in checkpoint
    assert checkpoint.shape("img_in.weight") == (4, 6) and checkpoint.shape("scalar") == ()
    assert checkpoint.dtype_name("bf16") == "BF16" and checkpoint.dtype_name("e4m3") == "F8_E4M3"
    assert (
        checkpoint.torch_dtype("e5m2") == torch.float8_e5m2 and checkpoint.torch_dtype("flags") == torch.bool
    )
    assert checkpoint.nbytes == sum(t.numel() * t.element_size() for t in expected.values())
    assert checkpoint.metadata == {"format": "pt", "modelspec.title": "tiny"}
    assert checkpoint.file_of("ids") == single.resolve()
    assert checkpoint.has_prefix("double_blocks.") and checkpoint.has_prefix("img_in.weight")
    assert not checkpoint.has_prefix("double_blocks.2") and not checkpoint.has_prefix("zzz")
    assert checkpoint.keys_matching(r"^double_blocks\.\d+\.img_attn\.qkv\.weight$") == [
        "double_blocks.0.img_attn.qkv.weight",
        "double_blocks.1.img_attn.qkv.weight",
    ]


def test_tensors_equal_what_was_saved(single: Path) -> None:
    expected = sample_tensors()
    state = Checkpoint.open(single).state_dict()
    assert list(state) == sorted(expected)
    for name, tensor in expected.items():
        loaded = state[name]
        assert loaded.dtype == tensor.dtype and loaded.shape == tensor.shape and loaded.device.type == "cpu"
        assert torch.equal(loaded.reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8))
    subset = Checkpoint.open(single).state_dict(["ids", "empty"])
    assert list(subset) == ["ids", "empty"] and subset["empty"].shape == (0, 3)


@needs_proc_maps
def test_tensors_are_zero_copy_views_of_the_file(single: Path) -> None:
    checkpoint = Checkpoint.open(single)
    a = checkpoint.tensor("img_in.weight")
    b = checkpoint.tensor("double_blocks.0.img_attn.qkv.weight")
    assert mapped_file(a.data_ptr()) == str(single.resolve())
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()  # one map per file
    assert a.untyped_storage().nbytes() == single.stat().st_size
    # copy-on-write: writing to the tensor never changes the file
    before = single.read_bytes()
    a.add_(1.0)
    assert single.read_bytes() == before
    assert torch.equal(Checkpoint.open(single).tensor("img_in.weight") + 1.0, a)


def test_misaligned_tensor_is_read_correctly(tmp_path: Path) -> None:
    values = torch.arange(4, dtype=torch.float32)
    header = json.dumps({"p": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
                         "w": {"dtype": "F32", "shape": [4], "data_offsets": [1, 17]}}).encode()  # fmt: skip
    header += b" " * ((-len(header)) % 8)
    path = tmp_path / "odd.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\x07" + values.numpy().tobytes())
    checkpoint = Checkpoint.open(path)
    assert torch.equal(checkpoint.tensor("w"), values)
    assert checkpoint.tensor("p").item() == 7


def test_telling_keys(single: Path) -> None:
    lines = Checkpoint.open(single).telling_keys()
    assert "double_blocks.0.img_attn.qkv.weight [12, 4] (3 tensors)" in lines
    assert "img_in.weight [4, 6]" in lines
    assert len(lines) <= 8
    assert len(Checkpoint.open(single).telling_keys(limit=2)) == 2


def test_telling_keys_skip_a_shared_prefix(tmp_path: Path) -> None:
    path = tmp_path / "ldm.safetensors"
    tensors = {f"model.diffusion_model.{n}": t for n, t in sample_tensors().items()}
    save_file(tensors, str(path))
    lines = Checkpoint.open(path).telling_keys()
    assert "model.diffusion_model.double_blocks.0.img_attn.qkv.weight [12, 4] (3 tensors)" in lines
    assert len(lines) > 3


def test_unknown_tensor_name_suggests_close_ones(single: Path) -> None:
    checkpoint = Checkpoint.open(single)
    with pytest.raises(TensorNotFoundError) as info:
        checkpoint.shape("img_in.weigth")
    assert isinstance(info.value, KeyError)
    assert "has no tensor 'img_in.weigth'" in str(info.value) and "img_in.weight" in str(info.value)


def test_opening_reads_headers_without_importing_torch(single: Path) -> None:
    code = (
        "import sys\n"
        "from diffstudio.loading import Checkpoint\n"
        f"c = Checkpoint.open({str(single)!r})\n"
        "c.keys(); c.shape('ids'); c.telling_keys(); c.metadata; c.nbytes\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "c.tensor('ids')\n"
        "assert 'torch' in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_sharded_folder_with_index(tmp_path: Path) -> None:
    tensors = sample_tensors()
    folder = tmp_path / "transformer"
    shards = write_shards(folder, tensors, 3)
    save_file({"stray": torch.zeros(1)}, str(folder / "unrelated.safetensors"))  # not in the index: ignored
    checkpoint = Checkpoint.open(folder)
    assert checkpoint.source == str(folder)
    assert checkpoint.files == tuple(s.resolve() for s in shards)
    assert checkpoint.keys() == sorted(tensors)
    assert checkpoint.file_of(sorted(tensors)[1]) == shards[1].resolve()
    assert checkpoint.metadata == {"format": "pt", "shard0": "0", "shard1": "1", "shard2": "2"}
    assert torch.equal(checkpoint.tensor("ids"), tensors["ids"])
    via_index = Checkpoint.open(folder / "model.safetensors.index.json")
    assert via_index.keys() == checkpoint.keys()


def test_folder_without_index_takes_every_safetensors_file_non_recursively(tmp_path: Path) -> None:
    tensors = sample_tensors()
    write_shards(tmp_path / "m", tensors, 2, index=False)
    write_shards(tmp_path / "m" / "nested", {"other": torch.zeros(2)}, 1, index=False)
    checkpoint = Checkpoint.open(tmp_path / "m")
    assert checkpoint.keys() == sorted(tensors) and len(checkpoint.files) == 2


def test_list_and_glob_sources(tmp_path: Path) -> None:
    tensors = sample_tensors()
    shards = write_shards(tmp_path / "m", tensors, 3, index=False)
    as_list = Checkpoint.open([str(s) for s in shards])
    assert as_list.keys() == sorted(tensors)
    assert as_list.files == tuple(s.resolve() for s in shards)
    pattern = str(tmp_path / "m" / "model-*-of-00003.safetensors")
    as_glob = Checkpoint.open(pattern)
    assert as_glob.source == pattern and as_glob.keys() == sorted(tensors)
    assert Checkpoint.open(tuple(shards[:1])).keys() == sorted(tensors)[0::3]


def test_glob_matching_no_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(NoWeightFilesError, match=r"matches no weight files.*config\.json"):
        Checkpoint.open(str(tmp_path / "*.json"))
    with pytest.raises(NoWeightFilesError, match="matches nothing"):
        Checkpoint.open(str(tmp_path / "*.safetensors"))


def test_duplicate_tensor_across_shards(tmp_path: Path) -> None:
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({"w": torch.zeros(2), "x": torch.zeros(1)}, str(a))
    save_file({"w": torch.ones(2)}, str(b))
    with pytest.raises(DuplicateTensorError) as info:
        Checkpoint.open([a, b])
    message = str(info.value)
    assert "'w'" in message and str(a.resolve()) in message and str(b.resolve()) in message
    assert "more than one file" in message and "'x'" not in message


def test_index_naming_a_missing_shard(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    shards = write_shards(folder, sample_tensors(), 3)
    shards[2].unlink()
    with pytest.raises(ShardIndexError) as info:
        Checkpoint.open(folder)
    assert shards[2].name in str(info.value) and "do not exist" in str(info.value)
    assert "download" in str(info.value)


def test_index_disagreeing_with_shards(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    shards = write_shards(folder, sample_tensors(), 2)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["ids"] = (
        shards[0].name if index["weight_map"]["ids"] == shards[1].name else shards[1].name
    )
    index["weight_map"]["ghost"] = shards[0].name
    del index["weight_map"]["flags"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(ShardIndexError) as info:
        Checkpoint.open(folder)
    message = str(info.value)
    assert "'ids' is listed in" in message and "but is in" in message
    assert "'ghost'" in message and "no shard holds it" in message
    assert "'flags'" in message and "not listed in the index" in message


@pytest.mark.parametrize(
    ("content", "words"),
    [("{not json", "Cannot read the shard index"), ('{"weight_map": [1]}', "no weight_map")],
)
def test_broken_index_file(tmp_path: Path, content: str, words: str) -> None:
    write_shards(tmp_path, sample_tensors(), 1, index=False)
    (tmp_path / "model.safetensors.index.json").write_text(content)
    with pytest.raises(ShardIndexError, match=words):
        Checkpoint.open(tmp_path)


def test_index_pointing_outside_its_folder(tmp_path: Path) -> None:
    save_file({"w": torch.zeros(1)}, str(tmp_path / "outside.safetensors"))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "x.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "../outside.safetensors"}})
    )
    with pytest.raises(ShardIndexError, match="not a file in"):
        Checkpoint.open(tmp_path / "m")


def test_folder_without_weights_lists_its_content(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer").mkdir()
    with pytest.raises(NoWeightFilesError) as info:
        Checkpoint.open(tmp_path)
    assert "config.json" in str(info.value) and "tokenizer/" in str(info.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NoWeightFilesError, match="it is empty"):
        Checkpoint.open(empty)


def test_missing_path_and_unsupported_suffix(tmp_path: Path) -> None:
    with pytest.raises(CheckpointFileNotFoundError, match="does not exist"):
        Checkpoint.open(tmp_path / "nope.safetensors")
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"\0" * 16)
    with pytest.raises(UnsupportedFileError, match=r"\.onnx") as info:
        Checkpoint.open(onnx)
    assert ".safetensors" in str(info.value)


def test_corrupt_shard_is_a_format_error(tmp_path: Path) -> None:
    shards = write_shards(tmp_path / "m", sample_tensors(), 2)
    shards[1].write_bytes(shards[1].read_bytes()[:-3])
    with pytest.raises(IncompleteBufferError) as info:
        Checkpoint.open(tmp_path / "m")
    assert isinstance(info.value, SafetensorsFormatError) and str(shards[1]) in str(info.value)


def test_file_changed_after_open(single: Path) -> None:
    checkpoint = Checkpoint.open(single)
    with open(single, "ab") as handle:
        handle.write(b"\0" * 8)
    with pytest.raises(CheckpointChangedError, match="changed size"):
        checkpoint.tensor("ids")


def test_truncated_after_mapping_is_refused_before_the_next_tensor(tmp_path: Path) -> None:
    # finding 21.10: touching a mapped page past the end of a truncated file is SIGBUS; the map of a file is made
    # once, so the size is checked again before every tensor is handed out (and before moving/deleting)
    path = tmp_path / "two.safetensors"
    save_file({"a": torch.arange(4.0), "b": torch.arange(4096.0)}, str(path))
    checkpoint = Checkpoint.open(path)
    first = checkpoint.tensor("a").clone()  # the file is now mapped
    os.truncate(path, 64)
    with pytest.raises(CheckpointChangedError, match="changed size from"):
        checkpoint.tensor("b")
    with pytest.raises(CheckpointChangedError):
        checkpoint.state_dict()
    path.unlink()
    with pytest.raises(CheckpointChangedError, match="moved or deleted"):
        checkpoint.tensor("a")
    assert first.tolist() == [0.0, 1.0, 2.0, 3.0]


def test_dtype_without_torch_equivalent(tmp_path: Path) -> None:
    header = json.dumps({"w": {"dtype": "F4", "shape": [4], "data_offsets": [0, 2]}}).encode()
    path = tmp_path / "f4.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0\0")
    checkpoint = Checkpoint.open(path)
    assert checkpoint.dtype_name("w") == "F4" and checkpoint.nbytes == 2
    with pytest.raises(UnsupportedDtypeError, match="F4"):
        checkpoint.tensor("w")


# -- pickle policy -----------------------------------------------------------------------------------------


def test_pickle_refused_by_default(tmp_path: Path) -> None:
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.randn(2, 2)}, path)
    for source in (path, tmp_path):
        with pytest.raises(PickleRefusedError) as info:
            Checkpoint.open(source)
        message = str(info.value)
        assert str(path.resolve()) in message
        assert "arbitrary code" in message and "allow_pickle=True" in message and "safetensors" in message


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".ckpt", ".BIN"])
def test_every_pickle_suffix_is_refused(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"weights{suffix}"
    path.write_bytes(b"never read")
    with pytest.raises(PickleRefusedError):
        Checkpoint.open(path)


def test_pickle_allowed_loads_with_weights_only(tmp_path: Path) -> None:
    tensors = {"w": torch.randn(3, 2), "b": torch.randn(3).to(torch.bfloat16)}
    path = tmp_path / "model.pt"
    torch.save(tensors, path)
    checkpoint = Checkpoint.open(path, allow_pickle=True)
    assert checkpoint.keys() == ["b", "w"] and checkpoint.shape("w") == (3, 2)
    assert checkpoint.dtype_name("b") == "BF16" and checkpoint.torch_dtype("b") == torch.bfloat16
    assert checkpoint.nbytes == 3 * 2 * 4 + 3 * 2
    state = checkpoint.state_dict()
    assert torch.equal(state["w"], tensors["w"]) and torch.equal(state["b"], tensors["b"])


def test_pickle_lightning_wrapper_is_unwrapped(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": 3}, path)
    assert Checkpoint.open(path, allow_pickle=True).keys() == ["w"]


class Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, ...]]:
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_blocked_even_when_allowed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    torch.save({"w": torch.zeros(1), "x": Payload(str(marker))}, path)
    with pytest.raises(PickleContentError, match="weights_only=True"):
        Checkpoint.open(path, allow_pickle=True)
    assert not marker.exists()
    raw = tmp_path / "raw.pth"
    raw.write_bytes(pickle.dumps({"x": Payload(str(marker))}))
    with pytest.raises(PickleContentError):
        Checkpoint.open(raw, allow_pickle=True)
    assert not marker.exists()


def test_pickle_with_non_tensor_values(tmp_path: Path) -> None:
    path = tmp_path / "mixed.pt"
    torch.save({"w": torch.zeros(1), "step": 5}, path)
    with pytest.raises(PickleContentError, match="not a flat state dict.*'step'"):
        Checkpoint.open(path, allow_pickle=True)


def test_torch_version_gate_for_pickle() -> None:
    assert not torch_supports_safe_pickle("2.5.1")
    assert not torch_supports_safe_pickle("1.13.0")
    assert torch_supports_safe_pickle("2.6.0+cpu") and torch_supports_safe_pickle("2.10.1")
    assert torch_supports_safe_pickle("3.0.0") and not torch_supports_safe_pickle("nightly")


def test_errors_are_checkpoint_errors(tmp_path: Path) -> None:
    for error in (
        DuplicateTensorError,
        ShardIndexError,
        NoWeightFilesError,
        UnsupportedFileError,
        PickleContentError,
    ):
        assert issubclass(error, CheckpointError)


@pytest.mark.parametrize("flag", ["no", "yes", 1, None])
def test_allow_pickle_must_be_a_real_boolean(tmp_path: Path, flag: object) -> None:
    path = tmp_path / "model.bin"
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(PickleRefusedError, match="not a boolean"):
        Checkpoint.open(path, allow_pickle=flag)  # type: ignore[arg-type]
