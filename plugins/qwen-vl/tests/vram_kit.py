"""Low-memory check of the Qwen2.5-VL slot: a tiny bf16 model held by a minimal pipeline, one measured run.

The method of the FLUX.2 low-memory benchmark (``plugins/flux2/tests/vram_kit.py``): every configuration runs in
a fresh process, which records ``RssAnon`` after imports (the baseline), after loading, and its peak during two
encoder calls (sampled after every module's forward); the figures above the baseline are compared with the
all-resident float32 run. Run as a script it measures one configuration and prints one JSON line::

    python plugins/qwen-vl/tests/vram_kit.py --child disk --repo DIR
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import sys
from pathlib import Path
from typing import Any

HIDDEN, LAYERS = 384, 12


def rss_anon_mib() -> float:
    """This process's anonymous resident memory (``RssAnon`` of ``/proc/self/status``), in MiB."""
    with open("/proc/self/status", encoding="ascii") as handle:
        found = re.search(r"RssAnon:\s+(\d+) kB", handle.read())
    return int(found.group(1)) / 1024 if found else float("nan")


def build_repo(out: Path) -> Path:
    """Write ``processor/`` and ``model/`` (bf16, legacy layout) under ``out`` once."""
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    import fixtures_qwen_vl as fx

    marker = out / "spec.json"
    spec = {"hidden": HIDDEN, "layers": LAYERS}
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return out
    tokens = fx.build_processor(out / "processor")
    fx.build_model(out / "model", tokens, "legacy", dtype=torch.bfloat16, hidden=HIDDEN, layers=LAYERS)
    marker.write_text(json.dumps(spec))
    return out


def memory_fields(name: str) -> dict[str, Any]:
    """The ModelConfig memory fields of a configuration (computation float32 on CPU)."""
    import torch

    compute = {"computation_device": "cpu", "computation_dtype": torch.float32}
    if name == "resident":
        return {}
    if name == "disk":
        return {"offload_device": "disk", "offload_dtype": "disk", "onload_device": "disk", "onload_dtype": "disk",
                "preparing_device": "cpu", "preparing_dtype": torch.bfloat16, **compute}  # fmt: skip
    if name == "fp8":
        fp8 = torch.float8_e4m3fn
        return {"offload_device": "cpu", "offload_dtype": fp8, "onload_device": "cpu", "onload_dtype": fp8,
                "preparing_device": "cpu", "preparing_dtype": fp8, **compute}  # fmt: skip
    raise ValueError(f"unknown configuration {name!r}")


def holder_class() -> type[Any]:
    """A minimal pipeline with only the ``qwen_vl`` slot (what Step1X / Nexus-Gen pipelines declare)."""
    from diffstudio.pipeline.base import BasePipeline
    from diffstudio_qwen_vl.slot import FAMILY, SLOT

    class QwenVLHolder(BasePipeline):
        family = "qwen-vl-test"
        pipeline_name = "qwen-vl-test"
        slots = {SLOT: "Qwen2.5-VL"}
        shared_families = (FAMILY,)

    return QwenVLHolder


def child(args: argparse.Namespace) -> dict[str, Any]:
    """Measure one configuration in this process; return its figures (and save the hidden states)."""
    import diffstudio_qwen_vl.weights  # noqa: F401  (imports transformers: part of the baseline)
    import torch
    from diffstudio import ModelConfig
    from diffstudio_qwen_vl import last_hidden_state, load_processor
    from PIL import Image
    from transformers import Qwen2_5_VLModel  # noqa: F401

    root = Path(args.repo)
    processor = load_processor(root / "processor", min_pixels=16 * 28 * 28, max_pixels=16 * 28 * 28)
    image = Image.new("RGB", (112, 112), (30, 160, 90))
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "make the sky blue"}]}],
        tokenize=False, add_generation_prompt=True, add_vision_id=True,
    )  # fmt: skip
    batch = processor(text=[text], images=[image], padding=True, return_tensors="pt")
    gc.collect()
    base = rss_anon_mib()
    holder = holder_class().from_pretrained(
        torch_dtype=torch.float32, device="cpu", model_configs=[ModelConfig(path=str(root / "model"),
                                                                            **memory_fields(args.child))]
    )  # fmt: skip
    gc.collect()
    after_load = rss_anon_mib()
    peak = [after_load]

    def sample(*_: Any) -> None:
        peak[0] = max(peak[0], rss_anon_mib())

    model = holder.loaded["qwen_vl"].module
    for module in model.modules():
        module.register_forward_hook(sample)
    peaks, hidden = [], None
    for _ in range(2):
        peak[0] = rss_anon_mib()
        holder.activate(["qwen_vl"])
        hidden = last_hidden_state(model, batch)
        sample()
        peaks.append(peak[0])
    if args.save:
        torch.save(hidden, args.save)
    return {
        "config": args.child,
        "rss_anon_base_mib": round(base, 1),
        "rss_anon_after_load_mib": round(after_load, 1),
        "rss_anon_peak_mib": round(peaks[0], 1),
        "rss_anon_peak_second_call_mib": round(peaks[1], 1),
        "strategy": holder.vram_report()["qwen_vl"].get("strategy"),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Measure one memory configuration of the tiny Qwen2.5-VL slot.")
    parser.add_argument("--child", required=True, help="resident, disk or fp8")
    parser.add_argument("--repo", required=True)
    parser.add_argument("--save")
    print(json.dumps(child(parser.parse_args())))
