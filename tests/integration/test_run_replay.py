"""``diffstudio run --from IMAGE.png`` replays recorded jobs bit for bit; new run flags are recorded (22.3-22.5)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffstudio.outputs import read_image_metadata
from diffstudio_shapes import model as shapes
from PIL import Image
from safetensors.torch import save_file

pytestmark = pytest.mark.slow

DIFFSTUDIO = str(Path(sys.executable).with_name("diffstudio"))
SMALL = {"steps": 2, "height": 32, "width": 32}


def cli(*arguments: str) -> subprocess.CompletedProcess[str]:
    """Run the installed ``diffstudio`` entry point."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIFFSTUDIO_")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([DIFFSTUDIO, *arguments], capture_output=True, text=True, timeout=600, env=env)


def rows(result: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def pixels(path: str | Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def shapes_lora(path: Path) -> Path:
    """A rank-2 BFL-named LoRA on the embedded DiT's first attention block (ComfyUI / ai-toolkit layout)."""
    generator = torch.Generator().manual_seed(0)
    save_file({
        "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": torch.randn(2, 128, generator=generator),
        "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": torch.randn(384, 2, generator=generator) * 0.5,
    }, str(path))  # fmt: skip
    return path


def test_run_from_png_replays_jobs_bit_for_bit(tmp_path: Path) -> None:
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    Image.fromarray(np.tile(np.arange(32, dtype=np.uint8)[None] * 8, (32, 1))).save(tmp_path / "mask.png")
    shapes_lora(tmp_path / "style.safetensors")
    jobs = [
        {"prompt": "a red circle on a blue background", "seed": 3, **SMALL},
        {"prompt": "a red circle on a blue background", "seed": 3, "lora": "style.safetensors:0.7",
         "templates": ["diffstudio/brightness"], "template_inputs": [{"scale": 0.8}], **SMALL},
        {"prompt": "a green square", "seed": 4, "image": "in.png", "mask": "mask.png", "strength": 0.6, **SMALL},
        {"prompt": "a green square", "seed": 5, "edit_image": ["in.png"], "scheduler": "static", "shift": 2.0, **SMALL},
    ]  # fmt: skip
    (tmp_path / "jobs.jsonl").write_text("\n".join(json.dumps(job) for job in jobs))
    first = rows(cli("run", "--jobs", str(tmp_path / "jobs.jsonl"), "--out", str(tmp_path / "a"), "--format", "json"))
    assert len(first) == 4 and not any(r["skipped"] for r in first)
    plain, styled = pixels(first[0]["path"]), pixels(first[1]["path"])
    assert np.abs(plain.astype(int) - styled.astype(int)).max() > 0  # the LoRA and the template did something
    _, record = read_image_metadata(first[1]["path"])
    assert record is not None and record["job"]["loras"] == [
        {"path": str(tmp_path / "style.safetensors"), "scale": 0.7}
    ]
    assert record["loras"][0]["hash"] and record["templates"][0]["name"] == "diffstudio/brightness"
    _, edited = read_image_metadata(first[3]["path"])
    assert edited is not None and edited["job"]["edit_image"] == [str(tmp_path / "in.png")]
    assert edited["scheduler"] == "FlowMatch static" and edited["job"]["shift"] == 2.0

    replay = cli("run", *[f"--from={r['path']}" for r in first], "--out", str(tmp_path / "b"), "--format", "json")
    again = rows(replay)
    assert "warning" not in replay.stderr
    for original, replayed in zip(first, again):
        assert replayed["hash"] == original["hash"] and replayed["seed"] == original["seed"]
        assert np.array_equal(pixels(original["path"]), pixels(replayed["path"])), original["path"]

    shapes_lora(tmp_path / "style.safetensors").write_bytes(
        (tmp_path / "style.safetensors").read_bytes()[:-4] + b"    "
    )
    changed = cli("run", "--from", first[1]["path"], "--out", str(tmp_path / "c"), "--format", "json")
    assert "style.safetensors has SHA-256" in changed.stderr and "the record says" in changed.stderr


def test_model_dir_reads_a_diffusers_repository_folder(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    for folder, source in (("transformer", shapes.DIT_FILE), ("vae", shapes.VAE_FILE), ("text_encoder", "text_encoder"),
                           ("tokenizer", "tokenizer")):  # fmt: skip
        (repo / folder).parent.mkdir(parents=True, exist_ok=True)
        target = shapes.WEIGHTS / source
        if target.is_dir():
            os.symlink(target, repo / folder)
        else:
            (repo / folder).mkdir()
            os.symlink(target, repo / folder / target.name)
    index = {"_class_name": "Flux2KleinPipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "text_encoder": ["transformers", "Qwen3ForCausalLM"], "tokenizer": ["transformers", "Qwen2TokenizerFast"],
             "transformer": ["diffusers", "Flux2Transformer2DModel"],
             "vae": ["diffusers", "AutoencoderKLFlux2"]}  # fmt: skip
    (repo / "model_index.json").write_text(json.dumps(index))
    defaults = {k: v for k, v in shapes.DEFAULTS.items() if k not in ("height", "width", "num_inference_steps")}
    jobs = [{"prompt": "a yellow star", "seed": 2, **SMALL},  # the embedded model applies its defaults
            {"prompt": "a yellow star", "seed": 2, "model": str(repo), **defaults, **SMALL}]  # fmt: skip
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    embedded, from_repo = rows(cli("run", "--jobs", str(tmp_path / "jobs.json"), "--out", str(tmp_path / "o"),
                                   "--format", "json"))  # fmt: skip
    assert np.array_equal(pixels(embedded["path"]), pixels(from_repo["path"]))
    _, record = read_image_metadata(from_repo["path"])
    assert record is not None and record["job"]["model"] == [str(repo.resolve())]
