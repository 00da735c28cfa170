"""Image saving: A1111 ``parameters`` and JSON chunks as real PNG tEXt chunks, atomic writes."""

from __future__ import annotations

import hashlib
import json
import re
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from diffstudio.outputs import (
    GenerationRecord,
    ImageSaveError,
    format_a1111_parameters,
    quote_value,
    read_image_metadata,
    record_for,
    record_to_json,
    save_image,
)
from diffstudio.scheduler import FlowMatchScheduler
from PIL import Image

# ---------------------------------------------------------------------------------------------------------
# readers written for the tests (independent of the code under test)
# ---------------------------------------------------------------------------------------------------------


def png_chunks(path: Path) -> list[tuple[bytes, bytes]]:
    """Parse a PNG's chunk stream: [(type, data)], checking the signature and every CRC."""
    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    chunks = []
    offset = 8
    while offset < len(raw):
        (length,) = struct.unpack(">I", raw[offset : offset + 4])
        kind = raw[offset + 4 : offset + 8]
        data = raw[offset + 8 : offset + 8 + length]
        (crc,) = struct.unpack(">I", raw[offset + 8 + length : offset + 12 + length])
        assert crc == zlib.crc32(kind + data) & 0xFFFFFFFF
        chunks.append((kind, data))
        offset += 12 + length
    assert chunks[-1][0] == b"IEND"
    return chunks


def text_chunks(path: Path) -> dict[str, tuple[str, str]]:
    """{keyword: (chunk type, text)} for tEXt / iTXt / zTXt chunks."""
    found = {}
    for kind, data in png_chunks(path):
        if kind == b"tEXt":
            key, _, value = data.partition(b"\0")
            found[key.decode("latin-1")] = ("tEXt", value.decode("latin-1"))
        elif kind == b"iTXt":
            key, _, rest = data.partition(b"\0")
            compressed, _method = rest[0], rest[1]
            _lang, _, rest = rest[2:].partition(b"\0")
            _translated, _, text = rest.partition(b"\0")
            found[key.decode("latin-1")] = ("iTXt", (zlib.decompress(text) if compressed else text).decode())
        elif kind == b"zTXt":
            key, _, rest = data.partition(b"\0")
            found[key.decode("latin-1")] = ("zTXt", zlib.decompress(rest[1:]).decode("latin-1"))
    return found


_PARAM = re.compile(r'\s*([\w][\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def parse_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """Parse A1111 infotext the way image sites do: (prompt, negative prompt, {key: value})."""
    *lines, last = text.split("\n")
    assert len(_PARAM.findall(last)) >= 3, last
    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    in_negative = False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:") :].strip()
        (negative_lines if in_negative else prompt_lines).append(line)
    params = {}
    for key, value in _PARAM.findall(last):
        value = value.strip()
        if value.startswith('"') and value.endswith('"'):
            value = json.loads(value)
        params[key] = value
    return "\n".join(prompt_lines), "\n".join(negative_lines), params


# ---------------------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------------------


def full_record(**changes: Any) -> GenerationRecord:
    values: dict[str, Any] = {
        "prompt": "a cat, sitting: on a mat",
        "negative_prompt": "blurry, lowres",
        "steps": 4,
        "cfg_scale": 3.5,
        "seed": 1234567,
        "width": 64,
        "height": 48,
        "sampler": "Euler",
        "scheduler": "FlowMatch flux2",
        "model": "klein, 4b: distilled",
        "model_hash": "0123456789abcdef",
        "embedded_guidance": 2.5,
        "loras": [("ink, style", "abcdef012345", 0.8), ("plain", "fedcba987654", 1.0)],
        "templates": [("brightness", {"scale": 0.7})],
        "model_files": [("/m/flux.safetensors", "9" * 64)],
        "extra": {"sigmas": torch.linspace(1, 0, 5), "note": "x"},
        "versions": {"diffstudio": "0.1.0", "torch": torch.__version__, "diffstudio-flux2": "0.1.0"},
    }
    values.update(changes)
    return GenerationRecord(**values)


@pytest.fixture
def image() -> Image.Image:
    return Image.new("RGB", (64, 48), (200, 30, 30))


# ---------------------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------------------


def test_png_chunks_are_text_and_parse_back(tmp_path: Path, image: Image.Image) -> None:
    path = save_image(image, tmp_path / "out" / "a.png", full_record())
    chunks = text_chunks(path)
    assert chunks["parameters"][0] == "tEXt" and chunks["diffstudio"][0] == "tEXt"
    assert not any(kind in (b"iTXt", b"zTXt") for kind, _ in png_chunks(path))
    prompt, negative, params = parse_infotext(chunks["parameters"][1])
    assert prompt == "a cat, sitting: on a mat"
    assert negative == "blurry, lowres"
    assert params == {
        "Steps": "4",
        "Sampler": "Euler",
        "Schedule type": "FlowMatch flux2",
        "CFG scale": "3.5",
        "Distilled CFG Scale": "2.5",
        "Seed": "1234567",
        "Size": "64x48",
        "Model hash": "0123456789",
        "Model": "klein, 4b: distilled",
        "Lora hashes": "ink style: abcdef012345, plain: fedcba987654",
        "Templates": "brightness",
        "Version": "diffstudio 0.1.0",
    }
    with Image.open(path) as reread:
        assert reread.size == (64, 48) and reread.getpixel((3, 3)) == (200, 30, 30)


def test_json_record_reproduces_the_call(tmp_path: Path, image: Image.Image) -> None:
    path = save_image(image, tmp_path / "a.png", full_record())
    parameters, record = read_image_metadata(path)
    assert parameters is not None and parameters.startswith("a cat, sitting: on a mat\n")
    assert record is not None
    assert record["seed"] == 1234567 and record["steps"] == 4 and record["scheduler"] == "FlowMatch flux2"
    assert record["model"]["files"] == [{"path": "/m/flux.safetensors", "sha256": "9" * 64}]
    assert record["loras"][0] == {"name": "ink, style", "hash": "abcdef012345", "scale": 0.8}
    assert record["templates"] == [{"name": "brightness", "inputs": {"scale": 0.7}}]
    assert record["extra"]["sigmas"] == {"type": "Tensor", "shape": [5], "dtype": "torch.float32"}
    assert record["versions"]["torch"] == torch.__version__


def test_multiline_prompt_and_no_negative(tmp_path: Path, image: Image.Image) -> None:
    record = full_record(prompt="line one,\nline two: more", negative_prompt="")
    text = format_a1111_parameters(record)
    assert "Negative prompt" not in text
    save_image(image, tmp_path / "m.png", record)
    prompt, negative, params = parse_infotext(text_chunks(tmp_path / "m.png")["parameters"][1])
    assert (prompt, negative) == ("line one,\nline two: more", "")
    assert params["Seed"] == "1234567"


def test_minimal_record_and_default_versions() -> None:
    record = GenerationRecord(prompt="p", seed=1, steps=2, cfg_scale=1.0)
    assert record.versions["diffstudio"] and "python" in record.versions
    assert format_a1111_parameters(record).splitlines()[-1].startswith("Steps: 2, CFG scale: 1, Seed: 1, ")


def test_metadata_false_writes_no_text(tmp_path: Path, image: Image.Image) -> None:
    path = save_image(image, tmp_path / "n.png", full_record(), metadata=False)
    assert text_chunks(path) == {}
    assert read_image_metadata(path) == (None, None)
    assert text_chunks(save_image(image, tmp_path / "r.png", None)) == {}


def test_latin1_stays_text_other_scripts_fall_back_to_itxt(tmp_path: Path, image: Image.Image) -> None:
    latin = save_image(image, tmp_path / "l.png", full_record(prompt="caf\u00e9 cr\u00e8me"))
    assert text_chunks(latin)["parameters"] == (
        "tEXt",
        format_a1111_parameters(full_record(prompt="caf\u00e9 cr\u00e8me")),
    )
    wide = save_image(image, tmp_path / "w.png", full_record(prompt="\u4e00\u53ea\u732b"))
    chunks = text_chunks(wide)
    assert chunks["parameters"][0] == "iTXt" and chunks["parameters"][1].startswith("\u4e00\u53ea\u732b\n")
    assert chunks["diffstudio"][0] == "tEXt" and chunks["diffstudio"][1].isascii()
    parameters, record = read_image_metadata(wide)
    assert record is not None and record["prompt"] == "\u4e00\u53ea\u732b"
    assert parameters is not None and parameters.startswith("\u4e00\u53ea\u732b")


def test_quoting_rules() -> None:
    assert quote_value("Euler") == "Euler"
    assert quote_value("a,b") == '"a,b"'
    assert quote_value("k: v") == '"k: v"'
    assert quote_value('two\nlines "q"') == '"two\\nlines \\"q\\""'


def test_json_is_ascii_and_carries_no_tensor_data() -> None:
    record = full_record(
        prompt="\u732b",
        extra={
            "image": Image.new("L", (3, 2)),
            "path": Path("/x"),
            "nan": float("nan"),
            "big": torch.zeros(1000, 1000),
        },
    )
    text = record_to_json(record)
    assert text.isascii() and len(text) < 4000
    extra = json.loads(text)["extra"]
    assert extra["image"] == {"type": "PIL.Image", "size": [3, 2], "mode": "L"}
    assert extra["path"] == "/x" and extra["nan"] == "nan" and extra["big"]["shape"] == [1000, 1000]


def test_failed_save_leaves_nothing_behind(
    tmp_path: Path, image: Image.Image, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "img.png"
    target.write_bytes(b"the previous image")
    original = Image.Image.save

    def save_then_fail(self: Image.Image, fp: Any, *args: Any, **kwargs: Any) -> None:
        original(self, fp, *args, **kwargs)  # the whole PNG is written to the temporary file...
        fp.flush()
        raise OSError("disk full")  # ...and then the writer fails

    monkeypatch.setattr(Image.Image, "save", save_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_image(image, target, full_record())
    with pytest.raises(OSError, match="disk full"):
        save_image(image, tmp_path / "new.png", full_record())
    assert [p.name for p in tmp_path.iterdir()] == ["img.png"]
    assert target.read_bytes() == b"the previous image"


def test_other_formats_have_no_chunks(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (16, 16), (0, 0, 255, 128))
    path = save_image(rgba, tmp_path / "a.jpg", full_record())
    with Image.open(path) as reread:
        assert reread.format == "JPEG"
    assert read_image_metadata(path) == (None, None)
    with pytest.raises(ImageSaveError, match=r"\.png"):
        save_image(rgba, tmp_path / "a.unknownext", None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jpg"]


@dataclass
class _Claim:
    model_type: str


@dataclass
class _Component:
    files: tuple[str, ...]
    claim: _Claim | None = None


@dataclass
class _Pipe:
    """The attributes record_for reads from a pipeline (BasePipeline has them)."""

    loaded: dict[str, _Component]
    scheduler: Any = field(default_factory=FlowMatchScheduler)
    pipeline_name: str = "flux2"
    device: str = "cpu"
    torch_dtype: Any = torch.float32
    runtime: Any = None


def test_record_for_a_pipeline_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, image: Image.Image
) -> None:
    monkeypatch.setenv("DIFFSTUDIO_CACHE", str(tmp_path / "cache"))
    dit = tmp_path / "klein-4b.safetensors"
    dit.write_bytes(b"dit weights")
    vae = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    vae.parent.mkdir()
    vae.write_bytes(b"vae weights")
    pipe = _Pipe(
        {
            "dit": _Component((str(dit),), _Claim("flux2-dit/klein-4b")),
            "vae": _Component((str(vae),), _Claim("flux2-vae")),
        }
    )
    arguments = {
        "num_inference_steps": 4,
        "cfg_scale": 1.0,
        "negative_prompt": None,
        "embedded_guidance": 4,
        "denoising_strength": 0.6,
        "sigmas": [1.0, 0.5],
        "progress_bar_cmd": print,
    }
    record = record_for(pipe, prompt="p", seed=7, image=image, arguments=arguments)
    dit_sha = hashlib.sha256(b"dit weights").hexdigest()
    assert (record.model, record.model_hash) == ("klein-4b", dit_sha[:10])
    assert record.model_files == [(str(dit), dit_sha), (str(vae), hashlib.sha256(b"vae weights").hexdigest())]
    assert (record.width, record.height, record.seed, record.steps) == (64, 48, 7, 4)
    assert record.scheduler == "FlowMatch flux2" and record.sampler == "Euler"
    assert record.denoising_strength is None  # no input image: text-to-image
    assert record.embedded_guidance == 4.0 and record.negative_prompt == ""
    assert record.extra["arguments"] == {"sigmas": [1.0, 0.5]}
    assert record.extra["components"] == {"dit": "flux2-dit/klein-4b", "vae": "flux2-vae"}
    _, _, params = parse_infotext(format_a1111_parameters(record))
    assert params["Model hash"] == dit_sha[:10] and params["Distilled CFG Scale"] == "4"
    img2img = record_for(
        pipe, prompt="p", seed=7, image=image, hash_files=False, arguments={**arguments, "input_image": image}
    )
    assert img2img.denoising_strength == 0.6 and img2img.model_hash is None
    assert json.loads(record_to_json(img2img))["extra"]["arguments"]["input_image"]["type"] == "PIL.Image"
