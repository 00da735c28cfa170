"""IP-Adapters: XLabs equals diffusers' load_ip_adapter; InstantX equals a processor written from its math."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from diffstudio import ModelConfig
from diffstudio.errors import MissingPluginError, PipelineInputError
from diffstudio.runtime import Runtime
from diffstudio_flux1.pipeline import FluxImagePipeline
from diffstudio_ipadapter.model import FluxIPAdapter
from safetensors.torch import save_file

H, W, SEQ = 32, 48, 16
PROMPT = "a red circle on a blue background"


def adapter_file(kind: str, helpers: Any, folder: Path, embed: int, blocks: int, tokens: int) -> Path:
    model = FluxIPAdapter(kind, embed, 24, 64, tokens, blocks)  # type: ignore[arg-type]
    helpers.perturb(model, 11)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{kind}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def ours(repo: Any, *extra: Path, runtime: Runtime | None = None) -> FluxImagePipeline:
    parts = [repo.root / n for n in ("transformer", "text_encoder", "text_encoder_2", "vae")] + list(extra)
    pipe = FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", runtime=runtime or Runtime(),
                                             model_configs=[ModelConfig(path=str(p)) for p in parts])  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


ARGS: dict[str, Any] = {"height": H, "width": W, "num_inference_steps": 3, "output_type": "pt",
                        "t5_sequence_length": SEQ, "embedded_guidance": 2.0}  # fmt: skip


def test_xlabs_matches_diffusers_load_ip_adapter(repo: Any, encoders: Any, helpers: Any, fp: Any, tmp_path: Path):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    clip, clip_folder = encoders["clip"]
    path = adapter_file("xlabs", helpers, tmp_path, 16, 2, 4)
    config = fp.SCHEDULER_CONFIG
    reference = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**config), image_encoder=clip,
                             feature_extractor=None, **repo.components)  # fmt: skip
    reference.set_progress_bar_config(disable=True)
    reference.load_ip_adapter(str(tmp_path), weight_name=path.name, image_encoder_folder=None)
    reference.set_ip_adapter_scale([0.6, 0.9])
    picture, noise = fp.image(40, 40, seed=21), fp.packed_noise(1, H, W, seed=6)
    try:
        with torch.no_grad():
            expected = reference(PROMPT, ip_adapter_image=picture, height=H, width=W, num_inference_steps=3,
                                 latents=noise, guidance_scale=2.0, max_sequence_length=SEQ,
                                 output_type="pt").images  # fmt: skip
    finally:
        reference.unload_ip_adapter()
    pipe = ours(repo, path, clip_folder)
    assert pipe.loaded["ipadapter"].claim.model_type == "flux1-ipadapter/xlabs"
    got = pipe(PROMPT, ipadapter_images=[picture], ipadapter_scale=[0.6, 0.9], latents=noise, **ARGS)
    diff = (got - expected).abs().max().item()
    print(f"XLabs IP-Adapter vs diffusers load_ip_adapter: final image max diff {diff:.2e}")
    assert diff <= 2e-4
    plain = pipe(PROMPT, latents=noise, **ARGS)
    assert (plain - got).abs().max() > 1e-3
    cfg = pipe(PROMPT, ipadapter_images=picture, latents=noise, cfg_scale=2.0, **ARGS)  # zero embedding on negative
    assert cfg.shape == got.shape


class InstantXReference:
    """A diffusers attention processor written from InstantX's published math (independent of diffstudio)."""

    def __init__(self, tokens: torch.Tensor, layers: list[Any], scale: float) -> None:
        self.tokens, self.layers, self.scale, self.index = tokens, layers, scale, 0

    def __call__(self, attn: Any, hidden_states: Any, encoder_hidden_states: Any = None, attention_mask: Any = None,
                 image_rotary_emb: Any = None) -> Any:  # fmt: skip
        from diffusers.models.embeddings import apply_rotary_emb

        heads = attn.heads

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.unflatten(-1, (heads, -1))

        q, k, v = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states)), split(attn.to_v(hidden_states))
        q, k = attn.norm_q(q), attn.norm_k(k)
        ip_query = q  # pre-RoPE: the image stream (double) or the whole joint sequence (single)
        layer = self.layers[self.index % len(self.layers)]
        self.index += 1
        ip_k, ip_v = split(layer.to_k_ip(self.tokens)), split(layer.to_v_ip(self.tokens))
        ip_k = ip_k * torch.rsqrt(ip_k.pow(2).mean(-1, keepdim=True) + 1e-5)
        ip = (
            torch.nn.functional.scaled_dot_product_attention(
                ip_query.transpose(1, 2), ip_k.transpose(1, 2), ip_v.transpose(1, 2)
            )
            .transpose(1, 2)
            .flatten(2)
        )
        if encoder_hidden_states is not None:
            eq, ek, ev = (split(p(encoder_hidden_states)) for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            q, k, v = (
                torch.cat([attn.norm_added_q(eq), q], 1),
                torch.cat([attn.norm_added_k(ek), k], 1),
                torch.cat([ev, v], 1),
            )
        q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
        k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out = out.transpose(1, 2).flatten(2)
        if encoder_hidden_states is None:
            return out + self.scale * ip
        txt, img = out[:, : encoder_hidden_states.shape[1]], out[:, encoder_hidden_states.shape[1] :]
        img = attn.to_out[1](attn.to_out[0](img + self.scale * ip))
        return img, attn.to_add_out(txt)


def test_instantx_matches_a_reference_from_the_published_math(repo: Any, encoders: Any, helpers: Any, fp: Any,
                                                              tmp_path: Path) -> None:  # fmt: skip
    from diffstudio_ipadapter.encoders import encode_images

    siglip, siglip_folder = encoders["siglip"]
    path = adapter_file("instantx", helpers, tmp_path, 32, 4, 3)
    pipe = ours(repo, path, siglip_folder)
    assert pipe.loaded["ipadapter"].claim.model_type == "flux1-ipadapter/instantx"
    picture, noise = fp.image(40, 40, seed=22), fp.packed_noise(1, H, W, seed=7)
    one_step = {**ARGS, "num_inference_steps": 1, "output_type": "latent"}
    got = pipe(PROMPT, ipadapter_images=picture, ipadapter_scale=0.8, latents=noise, **one_step)
    adapter = pipe.ipadapter
    with torch.no_grad():
        tokens = adapter.image_tokens(encode_images(siglip, picture, "x"))
    transformer = repo.components["transformer"]
    transformer.set_attn_processor(InstantXReference(tokens, list(adapter.ip_adapter), 0.8))
    try:
        captured: dict[str, torch.Tensor] = {}
        reference = repo.pipeline()
        with torch.no_grad():
            reference(PROMPT, height=H, width=W, num_inference_steps=1, latents=noise, guidance_scale=2.0,
                      max_sequence_length=SEQ, output_type="latent",
                      callback_on_step_end=lambda p, i, t, kw: captured.update(kw) or {})  # fmt: skip
    finally:
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

        transformer.set_attn_processor(FluxAttnProcessor())
    diff = (got - captured["latents"]).abs().max().item()
    print(f"InstantX IP-Adapter vs published-math reference: max diff {diff:.2e}")
    assert diff <= 1e-5
    assert (pipe(PROMPT, latents=noise, **one_step) - got).abs().max() > 1e-3


def test_bad_inputs_and_missing_plugin(repo: Any, encoders: Any, helpers: Any, fp: Any, tmp_path: Path) -> None:
    path = adapter_file("instantx", helpers, tmp_path, 32, 4, 3)
    no_encoder = ours(repo, path)
    picture = fp.image(40, 40, seed=1)
    args = {**ARGS, "num_inference_steps": 1, "output_type": "latent"}
    with pytest.raises(PipelineInputError, match="image encoder"):
        no_encoder(PROMPT, ipadapter_images=picture, **args)
    pipe = ours(repo, path, encoders["siglip"][1])
    with pytest.raises(PipelineInputError, match="ipadapter_scale"):
        pipe(PROMPT, ipadapter_images=picture, ipadapter_scale=[1.0, 2.0], **args)
    with pytest.raises(PipelineInputError, match=r"ipadapter_images\[0\]"):
        pipe(PROMPT, ipadapter_images=["picture.png"], **args)
    per_block = pipe(PROMPT, ipadapter_images=picture, ipadapter_scale=[0.0] * 4, seed=0, **args)
    plain = pipe(PROMPT, seed=0, **args)
    assert (per_block - plain).abs().max() <= 1e-6
    blocked = ours(repo, runtime=Runtime(env={"DIFFSTUDIO_DISABLED_PLUGINS": "ipadapter"}))
    with pytest.raises(MissingPluginError, match="diffstudio-ipadapter"):
        blocked(PROMPT, ipadapter_images=picture, **args)
