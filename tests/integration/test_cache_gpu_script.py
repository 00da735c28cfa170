"""``benchmarks/gpu/cache.sh`` (FLUX.1-dev, 1024^2, 28 steps, TeaCache 0.25/0.4/0.6 on a GPU) runs end to end on CPU
with a tiny FLUX.1 diffusers repository, coefficients fitted for it beside its transformer, and a small size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from diffstudio.cache.coefficients import FLUX1_DEV, Coefficients, DitShape, save_coefficients

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu" / "cache.sh"
INDEX = {
    "_class_name": "FluxPipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
}  # fmt: skip


@pytest.mark.skipif(not SCRIPT.is_file(), reason="needs the repository's benchmarks/ folder")
def test_gpu_cache_script_runs_on_cpu_with_a_tiny_model(tmp_path: Path, helpers: ModuleType, fp: ModuleType) -> None:
    root = fp.build_repo(tmp_path / "repo", helpers).root
    (root / "model_index.json").write_text(json.dumps(INDEX))
    shape = DitShape("flux1", 2, 2, 64)  # the tiny DiT of conftest: TeaCache finds these beside its weights
    save_coefficients(Coefficients(FLUX1_DEV.polynomial, shape, "test"), root / "transformer" / "teacache.json")
    out = tmp_path / "cache.jsonl"
    env = {**os.environ, "MODEL": str(root), "SIZE": "32", "STEPS": "4", "PROMPTS": "1", "DEVICE": "cpu",
           "DTYPE": "float32", "PYTHON": sys.executable, "OUT": str(out),
           "SETTINGS": "teacache:0.25,teacache:1000,fbcache:0.1"}  # fmt: skip
    done = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["setting"] for r in rows] == ["off", "teacache:0.25", "teacache:1000", "fbcache:0.1"]
    assert all(r["height"] == 32 and r["steps"] == 4 and r["s_per_image"] > 0 for r in rows)
    assert rows[0]["psnr_db"] is None and rows[2]["computed_steps"] == 2  # first and last step only
    assert all(r["psnr_db"] is not None for r in rows[1:])
