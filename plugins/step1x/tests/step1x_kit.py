"""Step1X test kit: a tiny combined file (FLUX.1 DiT without guidance_in + connector.*), FLUX.1's VAE, Qwen2.5-VL."""

from __future__ import annotations

from typing import Any

import torch

HIDDEN, HEADS, CONTEXT, POOLED, LLM = 64, 2, 64, 20, 32  # DiT width, heads; connector width = DiT context


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if p.ndim == 1 and ("norm" in name or name.endswith("scale")):
            p.copy_(1.0 + 0.3 * noise)
        else:
            p.copy_(noise / (p[0].numel() if p.ndim > 1 else 16) ** 0.5)


def build_dit(seed: int = 0) -> Any:
    from diffstudio_flux1.params import FluxParams
    from diffstudio_step1x.connector import ConnectorParams
    from diffstudio_step1x.model import Step1XDiT

    params = FluxParams(in_channels=64, out_channels=64, vec_in_dim=POOLED, context_in_dim=CONTEXT,
                        hidden_size=HIDDEN, mlp_ratio=4.0, num_heads=HEADS, depth=2, depth_single_blocks=2,
                        axes_dim=(8, 12, 12), theta=10000, qkv_bias=True, guidance_embed=False)  # fmt: skip
    connector = ConnectorParams(in_channels=LLM, hidden_size=CONTEXT, num_heads=2, depth=2, pooled_dim=POOLED)
    model = Step1XDiT(params, connector)
    perturb(model, seed)
    return model.eval()


CONFIG = {"axes_dims_rope": [8, 12, 12], "connector_num_heads": 2}


def load_pipeline(repo: dict[str, Any], runtime: Any = None) -> Any:
    """``Step1XEditPipeline`` over the kit's repository (float32, CPU, no progress bar)."""
    from diffstudio import ModelConfig
    from diffstudio_step1x import Step1XEditPipeline

    root = repo["root"]
    pipe = Step1XEditPipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu", runtime=runtime,
        model_configs=[ModelConfig(path=str(root / "step1x-edit-i1258.safetensors"), config=CONFIG),
                       ModelConfig(path=str(root / "ae.safetensors")), ModelConfig(path=str(root / "qwen"))],
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe
