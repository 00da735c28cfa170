"""FLUX.1 adapter benchmark: one denoising step with each adapter, ours vs diffusers in the same run.

Usage::

    .venv/bin/python benchmarks/adapters.py [--quick] [--threads 2] [--repeat 5]

The medium configuration is the FLUX.1 benchmark's (``benchmarks/flux1.py``): a DiT of hidden 1024 (8 heads of
128), 3 double + 11 single blocks, T5 width 4096, CLIP width 768, 1024 image + 512 text tokens, fp32; the
ControlNet has 2 double + 4 single blocks, the XLabs IP-Adapter 4 image tokens from a 768-wide embedding, EliGen
2 entities of 512 tokens. ``--quick`` shrinks everything (256 + 128 tokens, 2 heads). Random weights; both sides
share them. One JSON line per figure, the median of ``--repeat`` alternating runs after a warm-up:

* ``controlnet_step_ratio`` (target <= 1.0): our step (ControlNet hook + DiT with the block residual) vs
  diffusers' ``FluxControlNetModel`` + ``FluxTransformer2DModel(controlnet_block_samples=...)``.
* ``xlabs_ipadapter_step_ratio`` (target <= 1.0): our DiT with the IP-Adapter processor and residual vs diffusers'
  transformer with ``FluxIPAdapterAttnProcessor`` (``_load_ip_adapter_weights``) and the image embeds.
* ``instantx_ipadapter_step_s``: our step with InstantX (57-block style, every block; diffusers has no peer).
Each ratio line also carries ``best_of_ratio`` (fastest run over fastest run), steadier on a shared machine.

* ``eligen_overhead_ratio``: our step with EliGen's masked attention over a plain step with the same (longer)
  text stream, i.e. the cost of the mask alone.
* ``infiniteyou_step_ratio`` (target <= 1.0) and ``infiniteyou_over_plain_step``: InfiniteYou's InfuseNet (its
  own text stream: 8 identity tokens, zero ids, guidance 1.0) vs diffusers, and over a plain step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

BENCH = "adapters"
SIZES = {
    "medium": {"heads": 8, "depth": 3, "single": 11, "img": 1024, "txt": 512, "context": 4096, "pooled": 768},
    "quick": {"heads": 2, "depth": 1, "single": 2, "img": 256, "txt": 128, "context": 512, "pooled": 768},
}


def emit(figure: str, value: float, unit: str, **extra: Any) -> None:
    print(json.dumps({"benchmark": BENCH, "figure": figure, "value": round(value, 4), "unit": unit, **extra}))
    sys.stdout.flush()


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        fn()
    return time.perf_counter() - start


BEST: dict[str, float] = {}


def compare(ours: Callable[[], Any], theirs: Callable[[], Any], repeat: int) -> tuple[float, float]:
    """Median seconds of alternating runs after one warm-up each (the best-of ratio lands in ``BEST``)."""
    timed(ours), timed(theirs)
    a, b = [], []
    for _ in range(repeat):
        a.append(timed(ours))
        b.append(timed(theirs))
    BEST["ratio"] = min(a) / min(b)
    return statistics.median(a), statistics.median(b)


def build(size: dict[str, int]) -> tuple[Any, Any, dict[str, Any]]:
    """diffusers transformer, our Flux on the same weights, and the step inputs."""
    from diffstudio_flux1.convert import convert_diffusers_to_bfl_dit
    from diffstudio_flux1.math import image_ids, text_ids
    from diffstudio_flux1.model import Flux
    from diffstudio_flux1.params import FluxParams
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    ref = FluxTransformer2DModel(
        in_channels=64, num_layers=size["depth"], num_single_layers=size["single"], attention_head_dim=128,
        num_attention_heads=size["heads"], joint_attention_dim=size["context"], pooled_projection_dim=size["pooled"],
        guidance_embeds=True,
    ).eval()  # fmt: skip
    state = convert_diffusers_to_bfl_dit(ref.state_dict())
    ours = Flux(FluxParams.from_state_dict_shapes({k: tuple(v.shape) for k, v in state.items()}))
    ours.load_state_dict(state)
    side = int(size["img"] ** 0.5)
    inputs = {
        "img": torch.randn(1, size["img"], 64), "img_ids": image_ids(1, side, side),
        "txt": torch.randn(1, size["txt"], size["context"]), "txt_ids": text_ids(1, size["txt"]),
        "timesteps": torch.tensor([0.7]), "y": torch.randn(1, size["pooled"]), "guidance": torch.tensor([3.5]),
    }  # fmt: skip
    return ref, ours.eval(), inputs


def reference_call(ref: Any, inp: dict[str, Any], **extra: Any) -> Any:
    return ref(hidden_states=inp["img"], encoder_hidden_states=inp["txt"], pooled_projections=inp["y"],
               timestep=inp["timesteps"], img_ids=inp["img_ids"][0], txt_ids=inp["txt_ids"][0],
               guidance=inp["guidance"], return_dict=False, **extra)[0]  # fmt: skip


def bench_controlnet(ref: Any, ours: Any, inp: dict[str, Any], size: dict[str, int], repeat: int) -> None:
    from diffstudio_controlnet.loaders import to_canonical
    from diffstudio_controlnet.model import ControlNetParams, FluxControlNet
    from diffstudio_controlnet.units import Condition, ControlNetHook
    from diffstudio_flux1.extensions import DitCall
    from diffusers import FluxControlNetModel

    net = FluxControlNetModel(
        in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=128, num_attention_heads=size["heads"],
        joint_attention_dim=size["context"], pooled_projection_dim=size["pooled"], guidance_embeds=True,
    ).eval()  # fmt: skip
    with torch.no_grad():  # diffusers zero-initialises the ControlNet projections; make the residuals real
        for p in [*net.controlnet_blocks.parameters(), *net.controlnet_single_blocks.parameters(),
                  *net.controlnet_x_embedder.parameters()]:  # fmt: skip
            p.normal_(0, 0.02)
    state = to_canonical(net.state_dict())
    mine = FluxControlNet(ControlNetParams.from_state_dict_shapes({k: tuple(v.shape) for k, v in state.items()}))
    mine.load_state_dict(state)
    mine.eval()
    cond = torch.randn(1, size["img"], 64)
    hook = ControlNetHook([mine], [Condition(0, cond, None, 1.0, 1.0, 0.0)], 1, (size["depth"], size["single"]))

    def run_ours() -> Any:
        call = DitCall(inp["img"], inp["img_ids"], inp["txt"], inp["txt_ids"], inp["timesteps"], inp["y"],
                       inp["guidance"], 0)  # fmt: skip
        return ours(**inp, **hook(call))

    def run_theirs() -> Any:
        double, single = net(hidden_states=inp["img"], controlnet_cond=cond, encoder_hidden_states=inp["txt"],
                             pooled_projections=inp["y"], timestep=inp["timesteps"], img_ids=inp["img_ids"][0],
                             txt_ids=inp["txt_ids"][0], guidance=inp["guidance"], return_dict=False)  # fmt: skip
        return reference_call(ref, inp, controlnet_block_samples=double, controlnet_single_block_samples=single)

    with torch.no_grad():
        got = run_ours()
        diff = (got - run_theirs()).abs().max().item()
        effect = (got - ours(**inp)).abs().max().item()
    a, b = compare(run_ours, run_theirs, repeat)
    emit("controlnet_step_ratio", a / b, "x", ours_s=round(a, 4), diffusers_s=round(b, 4), target="<= 1.0",
         best_of_ratio=round(BEST["ratio"], 4), max_abs_diff=diff, controlnet_effect=effect)  # fmt: skip


def bench_ipadapter(ref: Any, ours: Any, inp: dict[str, Any], size: dict[str, int], repeat: int) -> None:
    from diffstudio_flux1.layers import DEFAULT_PROCESSOR
    from diffstudio_ipadapter.model import FluxIPAdapter
    from diffstudio_ipadapter.units import PROCESSOR, IPState, XLabsResidual, _inverse

    hidden = size["heads"] * 128
    adapter = FluxIPAdapter("xlabs", 768, size["context"], hidden, 4, size["depth"]).eval()
    embeds = torch.randn(1, 768)
    sd = adapter.state_dict()
    image_proj = {k.split(".", 1)[1]: v for k, v in sd.items() if k.startswith("ip_adapter_proj_model.")}
    ip = {}
    for k, v in sd.items():
        if k.startswith("double_blocks."):
            _, i, _, name, param = k.split(".")
            ip[f"{i}.{'to_k_ip' if '_k_' in name else 'to_v_ip'}.{param}"] = v
    ref._load_ip_adapter_weights([{"image_proj": image_proj, "ip_adapter": ip}])

    def state(kind: str, model: Any, emb: torch.Tensor) -> IPState:
        with torch.no_grad():
            kv = model.block_kv(model.image_tokens(emb), size["heads"])
        names = [("double", i) for i in range(size["depth"])] + [("single", i) for i in range(size["single"])]
        return IPState(kind, {n: (k, v, 1.0) for n, (k, v) in zip(names, kv)},
                       _inverse(ours, {"image_ids": inp["img_ids"], "kontext_image_ids": None}))  # fmt: skip

    xlabs = state("xlabs", adapter, embeds)
    ours.set_attn_processor(PROCESSOR)

    def run_ours() -> Any:
        return ours(**inp, attention_kwargs={"ipadapter": xlabs}, block_residual=XLabsResidual(xlabs))

    def run_theirs() -> Any:
        return reference_call(ref, inp, joint_attention_kwargs={"ip_adapter_image_embeds": [embeds[:, None]]})

    with torch.no_grad():
        diff = (run_ours() - run_theirs()).abs().max().item()
    a, b = compare(run_ours, run_theirs, repeat)
    emit("xlabs_ipadapter_step_ratio", a / b, "x", ours_s=round(a, 4), diffusers_s=round(b, 4), target="<= 1.0",
         best_of_ratio=round(BEST["ratio"], 4), max_abs_diff=diff)  # fmt: skip
    instantx = FluxIPAdapter("instantx", 1152, size["context"], hidden, 128, size["depth"] + size["single"]).eval()
    state_x = state("instantx", instantx, torch.randn(1, 1152))
    a = statistics.median([timed(lambda: ours(**inp, attention_kwargs={"ipadapter": state_x})) for _ in range(repeat)])
    ours.set_attn_processor(DEFAULT_PROCESSOR)
    emit("instantx_ipadapter_step_s", a, "s", note="diffusers has no InstantX FLUX IP-Adapter")


def bench_eligen(ours: Any, inp: dict[str, Any], size: dict[str, int], repeat: int) -> None:
    from diffstudio_eligen.mask import MASK_KEY, RegionalAttentionProcessor, regional_mask
    from diffstudio_flux1.layers import DEFAULT_PROCESSOR

    entities = torch.randn(1, 2 * size["txt"], size["context"])
    regions = torch.zeros(1, 2, size["img"], dtype=torch.bool)
    regions[:, 0, : size["img"] // 2] = True
    regions[:, 1, size["img"] // 2 :] = True
    mask = regional_mask(size["txt"], [size["txt"]] * 2, regions)

    def masked() -> Any:
        ours.set_attn_processor(RegionalAttentionProcessor())
        return ours(**inp, extra_txt=entities, attention_kwargs={MASK_KEY: mask})

    def plain() -> Any:
        ours.set_attn_processor(DEFAULT_PROCESSOR)
        return ours(**inp, extra_txt=entities)

    a, b = compare(masked, plain, repeat)
    ours.set_attn_processor(DEFAULT_PROCESSOR)
    emit("eligen_overhead_ratio", a / b, "x", masked_s=round(a, 4), plain_s=round(b, 4),
         best_of_ratio=round(BEST["ratio"], 4), note="same text (global + 2 entities); the mask alone")  # fmt: skip


def bench_infiniteyou(ref: Any, ours: Any, inp: dict[str, Any], size: dict[str, int], repeat: int) -> None:
    """InfiniteYou: the InfuseNet (2 double + 4 single) on 8 identity tokens, zero ids, guidance 1.0, per step.

    Figures: ``infiniteyou_step_ratio`` (target <= 1.0) our step (InfuseNet hook + DiT with the block residual)
    over diffusers' ``FluxControlNetModel`` (fed the same tokens) + ``FluxTransformer2DModel(controlnet_*)``, and
    ``infiniteyou_over_plain_step`` our step over our plain DiT step. The projector runs once per call, not timed.
    """
    from diffstudio.dit.extensions import DitCall
    from diffstudio_controlnet import ControlNetInput
    from diffstudio_controlnet.loaders import to_canonical
    from diffstudio_controlnet.model import ControlNetParams, FluxControlNet
    from diffstudio_infiniteyou.resampler import Resampler, ResamplerParams
    from diffstudio_infiniteyou.units import InfuseNetHook
    from diffusers import FluxControlNetModel

    net = FluxControlNetModel(
        in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=128, num_attention_heads=size["heads"],
        joint_attention_dim=size["context"], pooled_projection_dim=size["pooled"], guidance_embeds=True,
    ).eval()  # fmt: skip
    with torch.no_grad():  # zero-initialised projections in diffusers; make the residuals real
        for p in [*net.controlnet_blocks.parameters(), *net.controlnet_single_blocks.parameters(),
                  *net.controlnet_x_embedder.parameters()]:  # fmt: skip
            p.normal_(0, 0.02)
    state = to_canonical(net.state_dict())
    mine = FluxControlNet(ControlNetParams.from_state_dict_shapes({k: tuple(v.shape) for k, v in state.items()}))
    mine.load_state_dict(state)
    mine.eval()
    projector = Resampler(ResamplerParams(dim=256, depth=2, heads=4, output_dim=size["context"])).eval()
    embedding, cond = torch.randn(1, 1, 512), torch.randn(1, size["img"], 64)
    depth = (size["depth"], size["single"])
    hook = InfuseNetHook(mine, projector, embedding, cond, 1.0, ControlNetInput(None), 1, depth)
    with torch.no_grad():
        tokens = projector(embedding)

    def run_ours() -> Any:
        call = DitCall(inp["img"], inp["img_ids"], inp["txt"], inp["txt_ids"], inp["timesteps"], inp["y"],
                       inp["guidance"], 0)  # fmt: skip
        return ours(**inp, **hook(call))

    def run_theirs() -> Any:
        double, single = net(hidden_states=inp["img"], controlnet_cond=cond, encoder_hidden_states=tokens,
                             pooled_projections=inp["y"], timestep=inp["timesteps"], img_ids=inp["img_ids"][0],
                             txt_ids=torch.zeros(tokens.shape[1], 3), guidance=torch.tensor([1.0]),
                             return_dict=False)  # fmt: skip
        return reference_call(ref, inp, controlnet_block_samples=double, controlnet_single_block_samples=single)

    with torch.no_grad():
        got = run_ours()
        diff = (got - run_theirs()).abs().max().item()
    a, b = compare(run_ours, run_theirs, repeat)
    emit("infiniteyou_step_ratio", a / b, "x", ours_s=round(a, 4), diffusers_s=round(b, 4), target="<= 1.0",
         best_of_ratio=round(BEST["ratio"], 4), max_abs_diff=diff)  # fmt: skip
    a, b = compare(run_ours, lambda: ours(**inp), repeat)
    emit("infiniteyou_over_plain_step", a / b, "x", infiniteyou_s=round(a, 4), plain_s=round(b, 4),
         best_of_ratio=round(BEST["ratio"], 4), note="InfuseNet 2 double + 4 single blocks beside the DiT")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small model and token counts")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    size = SIZES["quick" if args.quick else "medium"]
    ref, ours, inp = build(size)
    emit("config", 0, "-", size="quick" if args.quick else "medium", threads=args.threads, **size)
    bench_controlnet(ref, ours, inp, size, args.repeat)
    bench_ipadapter(ref, ours, inp, size, args.repeat)
    bench_eligen(ours, inp, size, args.repeat)
    bench_infiniteyou(ref, ours, inp, size, args.repeat)


if __name__ == "__main__":
    main()
