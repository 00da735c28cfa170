"""ModelConfig: validation, memory settings, and a torch-free import."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffstudio import ModelConfig as LazyModelConfig
from diffstudio.config import ModelConfig
from diffstudio.errors import ConfigError

STATES = ("offload", "onload", "preparing", "computation")


def test_lazy_export_is_the_class() -> None:
    assert LazyModelConfig is ModelConfig


def test_seed_style_configs() -> None:
    config = ModelConfig(
        model_id="black-forest-labs/FLUX.2-klein-4B", origin_file_pattern="transformer/*.safetensors"
    )
    assert config.path is None and config.skip_download is False and config.revision is None
    assert ModelConfig(path="/x/model.safetensors").model_id is None
    assert (
        ModelConfig(path=[Path("a.safetensors"), "b.safetensors"]).describe()
        == "a.safetensors, b.safetensors"
    )
    assert ModelConfig(model_id="gpt2").model_id == "gpt2"
    assert ModelConfig(model_id="o/n", download_source="ModelScope").download_source == "modelscope"


def test_needs_path_or_model_id() -> None:
    with pytest.raises(ConfigError, match="path=.*model_id="):
        ModelConfig()
    with pytest.raises(ConfigError, match=r"path=\[\]"):
        ModelConfig(path=[])


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"model_id": "../etc"}, ["model_id='../etc'", "org/name"]),
        ({"model_id": "a b/c"}, ["model_id='a b/c'"]),
        ({"model_id": "a/b/c"}, ["model_id='a/b/c'"]),
        (
            {"model_id": "o/n", "download_source": "civitai"},
            ["download_source='civitai'", "'huggingface'", "'modelscope'"],
        ),
        (
            {"model_id": "o/n", "origin_file_pattern": "../x/*.safetensors"},
            ["'../x/*.safetensors'", "relative"],
        ),
        ({"model_id": "o/n", "origin_file_pattern": "/abs/*.safetensors"}, ["'/abs/*.safetensors'"]),
        ({"model_id": "o/n", "origin_file_pattern": []}, ["origin_file_pattern=[]"]),
        ({"model_id": "o/n", "revision": ""}, ["revision=''"]),
        ({"model_id": "o/n", "skip_download": "yes"}, ["skip_download='yes'"]),
        ({"path": 3}, ["path entry 3"]),
    ],
)
def test_bad_fields(kwargs: dict[str, object], words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        ModelConfig(**kwargs)  # type: ignore[arg-type]
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("state", STATES)
def test_unknown_device_names_field_value_and_choices(state: str) -> None:
    with pytest.raises(ConfigError) as info:
        ModelConfig(model_id="o/n", **{f"{state}_device": "gpu"})  # type: ignore[arg-type]
    message = str(info.value)
    assert f"{state}_device='gpu'" in message and "'cuda'" in message and "'cpu'" in message
    assert ("'disk'" in message) == (state in ("offload", "onload"))


@pytest.mark.parametrize("state", STATES)
def test_disk_only_where_weights_rest(state: str) -> None:
    kwargs = {f"{state}_device": "disk"}
    if state in ("offload", "onload"):
        assert ModelConfig(model_id="o/n", **kwargs).memory_config()[f"{state}_device"] == "disk"  # type: ignore[arg-type]
    else:
        with pytest.raises(ConfigError, match=f"{state}_device='disk' is not allowed"):
            ModelConfig(model_id="o/n", **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:1", "mps", "meta", torch.device("cuda", 0)])
def test_devices_torch_parses_are_accepted_without_a_gpu(device: object) -> None:
    config = ModelConfig(model_id="o/n", computation_device=device)  # type: ignore[arg-type]
    assert config.memory_config()["computation_device"] == str(torch.device(device))  # type: ignore[call-overload]


@pytest.mark.parametrize("bad", ["bfloat17", "int8", "float4_e2m1fn_x2", torch.int64, 16])
def test_unknown_dtype(bad: object) -> None:
    with pytest.raises(ConfigError) as info:
        ModelConfig(model_id="o/n", onload_dtype=bad)  # type: ignore[arg-type]
    message = str(info.value)
    assert "onload_dtype=" in message and "bfloat16" in message and "float8_e4m3fn" in message


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("bfloat16", torch.bfloat16),
        ("torch.float16", torch.float16),
        ("bf16", torch.bfloat16),
        ("float8_e4m3fn", torch.float8_e4m3fn),
        (torch.float32, torch.float32),
    ],
)
def test_dtype_spellings(given: object, expected: torch.dtype) -> None:
    memory = ModelConfig(model_id="o/n", preparing_dtype=given).memory_config()  # type: ignore[arg-type]
    assert memory["preparing_dtype"] is expected


def test_fp8_on_a_torch_build_without_float8(monkeypatch: pytest.MonkeyPatch) -> None:
    """Older torch builds lack the float8 attributes; the error must say that, not "unknown dtype"."""
    monkeypatch.delattr(torch, "float8_e4m3fn")
    with pytest.raises(ConfigError) as info:
        ModelConfig(model_id="o/n", offload_dtype="float8_e4m3fn")
    message = str(info.value)
    assert "offload_dtype='float8_e4m3fn'" in message and "has no float8_e4m3fn" in message
    assert "upgrade torch" in message.lower() and "bfloat16" in message


def test_memory_config_follows_computation() -> None:
    assert set(ModelConfig(model_id="o/n").memory_config().values()) == {None}
    config = ModelConfig(model_id="o/n", computation_device="cuda", computation_dtype="bfloat16")
    memory = config.memory_config()
    assert [memory[f"{s}_device"] for s in STATES] == ["cuda"] * 4
    assert [memory[f"{s}_dtype"] for s in STATES] == [torch.bfloat16] * 4
    assert not config.has_memory_fields
    offload = ModelConfig(
        model_id="o/n",
        offload_device="cpu",
        offload_dtype="float8_e4m3fn",
        onload_device="disk",
        computation_device=torch.device("cuda"),
        computation_dtype=torch.bfloat16,
    )
    assert offload.has_memory_fields
    assert offload.vram_config() == {
        "offload_device": "cpu",
        "offload_dtype": torch.float8_e4m3fn,
        "onload_device": "disk",
        "onload_dtype": torch.bfloat16,
        "preparing_device": "cuda",
        "preparing_dtype": torch.bfloat16,
        "computation_device": "cuda",
        "computation_dtype": torch.bfloat16,
    }
    assert ModelConfig(model_id="o/n", preparing_dtype="bf16").has_memory_fields


def test_import_and_plain_config_do_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from diffstudio import ModelConfig\n"
        "ModelConfig(model_id='o/n', origin_file_pattern='tokenizer/')\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
