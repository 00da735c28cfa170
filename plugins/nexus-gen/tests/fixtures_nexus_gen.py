"""Nexus-Gen test helpers (loaded by ``conftest.py`` with ``import_file``): a tiny AR model folder (Qwen2.5-VL
+ vision head + prefill embeddings + processor) and
tiny decoder files (a perturbed FLUX.1 DiT in DiffSynth's legacy names beside an adapter or a merger).

The Qwen2.5-VL miniature comes from the shared slot's kit (``plugins/qwen-vl/tests/fixtures_qwen_vl.py``: a trained
BPE tokenizer, the chat template, 2 heads of 16); the FLUX.1 one from the family's kit (root ``conftest.py``: 2 heads
of 32, T5 width 24, CLIP width 20). The processor's pixel bounds are widened so that the 252 x 252 placeholder keeps
its 18 x 18 grid, as with Nexus-Gen's own ``processor/``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from safetensors.torch import save_file

VL_HIDDEN = 32
REF_SIZE = (112, 84)  # width, height of the test reference image: a 6 x 8 patch grid, 12 merged tokens


@dataclass
class ArFiles:
    """A tiny Nexus-Gen AR model on disk and its reference modules."""

    folder: Path
    reference: Any  # transformers Qwen2_5_VLForConditionalGeneration with the same weights
    vision_head: torch.Tensor
    prefill: torch.Tensor


def widen_bounds(folder: Path, max_pixels: int = 512 * 28 * 28) -> None:
    """Let the processor keep the 252 x 252 placeholder (Nexus-Gen's processor bounds are just as wide)."""
    path = folder / "preprocessor_config.json"
    data = json.loads(path.read_text())
    data["max_pixels"] = max_pixels
    if isinstance(data.get("size"), dict):
        data["size"]["longest_edge"] = max_pixels
    path.write_text(json.dumps(data, indent=2))


def make_ar(root: Path, qv: ModuleType, layout: str = "legacy", seed: int = 0) -> ArFiles:
    """``root/model.safetensors`` (+ ``config.json``, ``processor/``) of a tiny Nexus-Gen AR model."""
    from safetensors.torch import load_file

    tokens = qv.build_processor(root / "processor")
    widen_bounds(root / "processor")
    reference = qv.build_model(root, tokens, layout=layout, seed=seed, hidden=VL_HIDDEN)
    gen = torch.Generator().manual_seed(seed + 1)
    head = torch.randn(VL_HIDDEN, VL_HIDDEN, generator=gen) / VL_HIDDEN**0.5
    prefill = torch.randn(81, VL_HIDDEN, generator=gen)
    state = load_file(str(root / "model.safetensors"))
    state.update({"vision_head.weight": head, "image_prefill_embeds.weight": prefill})
    save_file(state, str(root / "model.safetensors"))
    return ArFiles(root, reference, head, prefill)


def reference_image() -> Any:
    """A smooth random RGB image of :data:`REF_SIZE`."""
    from PIL import Image

    gen = torch.Generator().manual_seed(7)
    small = torch.rand(3, 4, 4, generator=gen)
    big = torch.nn.functional.interpolate(small[None], size=REF_SIZE[::-1], mode="bilinear")[0]
    return Image.fromarray((big.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))


def perturbed_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Seeded random weights; norm gains away from 1 so a swapped tensor shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim == 1 and name.endswith("weight"):
                p.copy_(1.0 + 0.3 * noise)
            else:
                p.copy_(noise / (p.shape[-1] if p.ndim > 1 else 16) ** 0.5)
    return module


def adapter_state(seed: int, in_dim: int = VL_HIDDEN, out_dim: int = 24) -> dict[str, torch.Tensor]:
    """A perturbed generation adapter (``adapter.*``), 32 -> 24 (the tiny T5 width)."""
    from diffstudio_nexus_gen.heads import GenerationHead

    return dict(perturbed_(GenerationHead(in_dim, out_dim), seed).state_dict())


def merger_params() -> Any:
    """A tiny merger: 2 heads of 16 (1 KV head), mrope (2, 3, 3), projector 32 -> 96 -> 24."""
    from diffstudio_nexus_gen.heads import MergerParams

    return MergerParams(hidden=VL_HIDDEN, intermediate=48, heads=2, kv_heads=1, layers=1, expand=96, out=24,
                        rope_theta=10000.0, mrope_section=(2, 3, 3))  # fmt: skip


MERGER_CONFIG = {"heads": 2, "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
"""What ``ModelConfig(config=)`` passes for the tiny merger (the rest comes from its shapes)."""


def merger_state(seed: int) -> dict[str, torch.Tensor]:
    """A perturbed editing merger (``embedding_merger.*``)."""
    from diffstudio_nexus_gen.heads import EditingHead

    return dict(perturbed_(EditingHead(merger_params()), seed).state_dict())


def write_decoder(path: Path, bfl_dit: dict[str, torch.Tensor], head: dict[str, torch.Tensor]) -> Path:
    """A decoder file as Nexus-Gen ships it: ``pipe.dit.*`` legacy names + head, as a pickle or safetensors."""
    from diffstudio_nexus_gen.convert import convert_bfl_to_legacy_dit

    state = {f"pipe.dit.{k}": v.contiguous() for k, v in convert_bfl_to_legacy_dit(bfl_dit).items()}
    state.update({k: v.contiguous() for k, v in head.items()})
    if path.suffix == ".bin":
        torch.save(state, path)
    else:
        save_file(state, str(path))
    return path
