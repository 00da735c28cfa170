"""IP-Adapters under the layer-wise memory policy: the adapter and its image encoder stream like any component."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from diffstudio import ModelConfig
from diffstudio.runtime import Runtime
from diffstudio.vram import LayerwiseStrategy
from diffstudio_flux1.pipeline import FluxImagePipeline
from diffstudio_ipadapter.model import FluxIPAdapter
from safetensors.torch import save_file

F32, FP8 = torch.float32, torch.float8_e4m3fn
ADAPTER = ("ipadapter", "ipadapter_image_encoder")
KINDS = {"xlabs": ("clip", 16, 2, 4), "instantx": ("siglip", 32, 4, 3)}  # encoder, embed width, blocks, tokens


def adapter_file(kind: str, helpers: Any, folder: Path) -> Path:
    _, embed, blocks, tokens = KINDS[kind]
    model = FluxIPAdapter(kind, embed, 24, 64, tokens, blocks)  # type: ignore[arg-type]
    helpers.perturb(model, 11)
    path = folder / f"{kind}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def pipeline(repo: Any, adapter: Path, encoder: Path, store: torch.dtype | None, limit: float | None) -> Any:
    fields: dict[str, Any] = {} if store is None else {
        "offload_device": "cpu", "offload_dtype": store, "onload_device": "cpu", "onload_dtype": store,
        "preparing_device": "cpu", "preparing_dtype": store, "computation_device": "cpu", "computation_dtype": F32,
    }  # fmt: skip
    base = [repo.root / n for n in ("transformer", "text_encoder", "text_encoder_2", "vae")]
    pipe = FluxImagePipeline.from_pretrained(
        torch_dtype=F32, device="cpu", runtime=Runtime(), vram_limit=limit,
        model_configs=[*(ModelConfig(path=str(p)) for p in base), *(ModelConfig(path=str(p), **fields)
                                                                     for p in (adapter, encoder))],
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_memory_managed_ip_adapter_gives_the_same_image(
    repo: Any, encoders: Any, helpers: Any, fp: Any, tmp_path: Path, kind: str
) -> None:
    adapter, encoder = adapter_file(kind, helpers, tmp_path), encoders[KINDS[kind][0]][1]
    args: dict[str, Any] = {"ipadapter_images": fp.image(40, 40, seed=21), "ipadapter_scale": 0.8, "seed": 3,
                            "height": 32, "width": 48, "num_inference_steps": 2, "t5_sequence_length": 16,
                            "output_type": "latent"}  # fmt: skip
    expected = pipeline(repo, adapter, encoder, None, None)("a red circle", **args)
    plain = pipeline(repo, adapter, encoder, None, None)("a red circle", **{**args, "ipadapter_images": None})
    assert (plain - expected).abs().max() > 1e-3  # the adapter matters: the comparisons below can fail
    streamed = pipeline(repo, adapter, encoder, F32, 0.0)
    assert all(isinstance(streamed.loaded[s].strategy, LayerwiseStrategy) for s in ADAPTER)
    assert torch.equal(streamed("a red circle", **args), expected)
    reports = streamed.vram_report()
    assert all(reports[s]["resident_units"] == 0 < reports[s]["streamed_units"] for s in ADAPTER)
    assert all(not reports[s]["onloaded"] for s in ADAPTER) and streamed.vram_ledger("cpu").resident_bytes == 0
    fp8 = pipeline(repo, adapter, encoder, FP8, None)
    got = fp8("a red circle", **args)
    assert "float8" in json.dumps(fp8.vram_report()["ipadapter"]) and not torch.equal(got, expected)
    cosine = torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0)
    assert cosine >= 0.99
