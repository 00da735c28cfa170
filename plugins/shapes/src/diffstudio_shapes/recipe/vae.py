"""Stage ``vae``: train the shapes autoencoder (a FLUX.2 ``Flux2AutoEncoder``) on rendered shapes.

The autoencoder is trained deterministically on the posterior mean (what ``encode`` returns; the log-variance
channels stay unused), on renders of which half are made darker or brighter: L1 on pixels plus L1 on Sobel
edges (sharp shape outlines are what the analyser, and a viewer, look at) plus a tiny L2 on the latents to keep
their scale bounded. Training uses random 64 x 64 crops of 128 x 128 renders (the network is convolutional;
crops cost a quarter). The decoder sees the latents with a little Gaussian noise, so that imperfect DiT outputs
still decode to clean pictures. Afterwards the latent BatchNorm statistics (per channel of the 2 x 2-patchified
posterior mean) are measured on full-size renders, as FLUX.2's VAE stores them.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffstudio.train.checkpoints import save_weights
from diffstudio_flux2 import AutoEncoderParams, Flux2AutoEncoder
from diffstudio_flux2.math import patchify_latents
from torch import Tensor

from diffstudio_shapes.data import ALL_SHAPES, render, sample_specs
from diffstudio_shapes.recipe.sizes import IMAGE_SIZE, VAE, VaeSizes


@dataclass(frozen=True)
class VaeTraining:
    """Settings of the VAE stage (the defaults are the shipped recipe)."""

    steps: int = 2000
    batch_size: int = 16
    crop: int = 64
    learning_rate: float = 1e-3
    edge_weight: float = 1.0
    latent_weight: float = 1e-4
    latent_noise: float = 0.05
    brightness_jitter: float = 0.5
    jitter_share: float = 0.5
    stat_images: int = 1024
    seed: int = 0


def vae_params(sizes: VaeSizes = VAE) -> AutoEncoderParams:
    """The shapes VAE's sizes (``sizes``: the shipped model's by default)."""
    return AutoEncoderParams(
        ch=sizes.ch,
        ch_mult=sizes.ch_mult,
        num_res_blocks=sizes.num_res_blocks,
        z_channels=sizes.z_channels,
        norm_groups=sizes.norm_groups,
    )


def to_tensor(images: list[object]) -> Tensor:
    """PIL RGB images -> ``(B, 3, H, W)`` float32 in ``[-1, 1]``."""
    arrays = np.stack([np.asarray(image, dtype=np.float32) for image in images])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2) / 127.5 - 1.0


def _batch(step: int, cfg: VaeTraining) -> Tensor:
    """Renders for one step (all five shapes, so the zigzag LoRA's decoder needs are covered too), cropped.

    A share ``jitter_share`` of the images has its pixel values multiplied by a factor drawn uniformly from
    ``1 +- brightness_jitter`` (clipped): with palette colours only, the autoencoder would snap every colour back
    to the palette, and a darker or brighter picture (the brightness template's target) could not be encoded.
    """
    seed = 10_000 + cfg.seed * 100_003 + step
    specs = sample_specs(cfg.batch_size, seed=seed, shapes=ALL_SHAPES, layout="scattered")
    pixels = to_tensor([render(spec, IMAGE_SIZE) for spec in specs])
    rng = random.Random(f"crop/{cfg.seed}/{step}")
    for index in range(len(pixels)):
        if rng.random() < cfg.jitter_share:
            factor = 1.0 + rng.uniform(-cfg.brightness_jitter, cfg.brightness_jitter)
            pixels[index] = ((pixels[index] + 1.0) * factor - 1.0).clamp(-1.0, 1.0)
    crops = []
    for image in pixels:
        top = rng.randrange(0, IMAGE_SIZE - cfg.crop + 1, 8)
        left = rng.randrange(0, IMAGE_SIZE - cfg.crop + 1, 8)
        crops.append(image[:, top : top + cfg.crop, left : left + cfg.crop])
    return torch.stack(crops)


def _sobel(x: Tensor) -> Tensor:
    """Horizontal and vertical Sobel responses of every channel, ``(B, 2C, H, W)``."""
    kx = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
    kernel = torch.stack([kx, kx.T]).unsqueeze(1).repeat(x.shape[1], 1, 1, 1)  # (2C, 1, 3, 3)
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel.to(x), groups=x.shape[1])


def train_vae(cfg: VaeTraining = VaeTraining(), *, log_every: int = 100) -> tuple[Flux2AutoEncoder, dict[str, float]]:
    """Train the VAE from a seeded initialisation; return it (BatchNorm statistics set) and final figures."""
    torch.manual_seed(cfg.seed)
    model = Flux2AutoEncoder(vae_params())
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=0.0)
    warmup = max(1, cfg.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, cfg.steps - warmup))) * 0.95 + 0.05

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    generator = torch.Generator().manual_seed(cfg.seed)
    z = model.params.z_channels
    started = time.monotonic()
    recent: list[float] = []
    for step in range(cfg.steps):
        x = _batch(step, cfg)
        mean = model.encoder(x)[:, :z]  # the posterior mean: what encode() returns at inference
        latent = mean + cfg.latent_noise * mean.detach().std() * torch.randn(mean.shape, generator=generator)
        y = model.decoder(latent)
        l1 = (y - x).abs().mean()
        edges = (_sobel(y) - _sobel(x)).abs().mean()
        loss = l1 + cfg.edge_weight * edges + cfg.latent_weight * mean.pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        recent = (recent + [float(l1.detach())])[-50:]
        if log_every and (step + 1) % log_every == 0:
            elapsed = time.monotonic() - started
            print(f"vae step {step + 1}/{cfg.steps}  l1 {sum(recent) / len(recent):.4f}  {elapsed:.0f}s", flush=True)
    model.eval()
    figures = {"final_l1": sum(recent) / max(1, len(recent)), "seconds": time.monotonic() - started}
    figures.update(measure_statistics(model, cfg))
    return model, figures


@torch.no_grad()
def measure_statistics(model: Flux2AutoEncoder, cfg: VaeTraining) -> dict[str, float]:
    """Set ``model.bn``'s running mean/variance from patchified posterior means of full-size renders."""
    z = model.params.z_channels
    total = torch.zeros(model.params.latent_channels, dtype=torch.float64)
    squares = torch.zeros_like(total)
    count = 0
    for start in range(0, cfg.stat_images, 32):
        chunk = min(32, cfg.stat_images - start)
        specs = sample_specs(chunk, seed=777 + start, shapes=ALL_SHAPES, layout="scattered")
        x = to_tensor([render(spec, IMAGE_SIZE) for spec in specs])
        mean = model.encoder(x)[:, :z]
        patched = patchify_latents(mean, model.params.patch_size).double()  # (B, 4z, h, w)
        total += patched.sum(dim=(0, 2, 3))
        squares += patched.pow(2).sum(dim=(0, 2, 3))
        count += patched.shape[0] * patched.shape[2] * patched.shape[3]
    mu = total / count
    var = (squares / count - mu.pow(2)).clamp_min(1e-8)
    assert model.bn.running_mean is not None and model.bn.running_var is not None
    model.bn.running_mean.copy_(mu.float())
    model.bn.running_var.copy_(var.float())
    specs = sample_specs(64, seed=4242, shapes=ALL_SHAPES, layout="scattered")
    x = to_tensor([render(s, IMAGE_SIZE) for s in specs])
    round_trip = model.decode(model.encode(x))
    return {"round_trip_l1": float((round_trip - x).abs().mean()), "latent_std": float(var.sqrt().mean())}


def save_vae(model: Flux2AutoEncoder, folder: Path, figures: dict[str, float], cfg: VaeTraining) -> Path:
    """Write ``folder/ae.safetensors`` in the BFL layout (BatchNorm buffers included)."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    metadata = {
        "norm_groups": str(model.params.norm_groups),
        "diffstudio.recipe": json.dumps({"stage": "vae", **asdict(cfg), **figures}),
    }
    return save_weights(folder / "ae.safetensors", state, metadata)


def build_vae(folder: Path, cfg: VaeTraining = VaeTraining()) -> Path:
    """Run the stage unless ``folder/ae.safetensors`` exists; return the file."""
    target = folder / "ae.safetensors"
    if target.exists():
        print(f"{target} exists; skipping the vae stage")
        return target
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, figures = train_vae(cfg)
    print(json.dumps({"stage": "vae", **figures}))
    return save_vae(model, folder, figures, cfg)


__all__ = ["VaeTraining", "build_vae", "to_tensor", "train_vae", "vae_params"]
