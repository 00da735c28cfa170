"""EliGen: the regional mask element by element, masked attention against a naive reference, the pipeline."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from diffstudio import ModelConfig
from diffstudio.errors import MissingPluginError, PipelineInputError
from diffstudio.runtime import Runtime
from diffstudio_eligen.mask import MASK_KEY, RegionalAttentionProcessor, regional_mask
from diffstudio_flux1.pipeline import FluxImagePipeline
from PIL import Image

H, W, SEQ = 32, 48, 16
PROMPT = "a red circle on a blue background"


def naive_mask(global_len: int, entity_lens: list[int], inside: list[list[bool]], ref_len: int) -> torch.Tensor:
    """The mask from the rules, one element at a time (the issue's semantics)."""
    owner: list[Any] = ["global"] * global_len
    for i, n in enumerate(entity_lens):
        owner += [("entity", i)] * n
    img_start = len(owner)
    owner += [("image", p) for p in range(len(inside[0]))] + ["ref"] * ref_len
    size = len(owner)
    mask = torch.zeros(1, 1, size, size)
    for r in range(size):
        for c in range(size):
            a, b = owner[r], owner[c]
            ok = True
            if a == "global" or b == "global":
                ok = True
            elif isinstance(a, tuple) and a[0] == "entity":
                if isinstance(b, tuple) and b[0] == "entity":
                    ok = a[1] == b[1]
                elif isinstance(b, tuple) and b[0] == "image":
                    ok = inside[a[1]][b[1]]
                else:
                    ok = False
            elif isinstance(b, tuple) and b[0] == "entity":
                ok = isinstance(a, tuple) and a[0] == "image" and inside[b[1]][a[1]]
            if not ok:
                mask[0, 0, r, c] = float("-inf")
    assert img_start == global_len + sum(entity_lens)
    return mask


def test_the_mask_equals_the_rules_element_by_element() -> None:
    inside = [[True, True, False, False, False, True], [False, False, True, True, False, False]]
    got = regional_mask(3, [2, 3], torch.tensor([inside]), ref_len=2)
    expected = naive_mask(3, [2, 3], inside, 2)
    assert got.shape == expected.shape == (1, 1, 16, 16)
    assert torch.equal(torch.isinf(got), torch.isinf(expected)) and torch.equal(got.nan_to_num(), expected.nan_to_num())


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v over the concatenated sequence, written out; (B, L, H, D) layout."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / q.shape[-1] ** 0.5 + mask.double()
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(dim=-1), v.double()).to(q.dtype)


def test_masked_attention_in_every_block_equals_a_naive_reference(helpers: Any, fx: Any, tmp_path: Any) -> None:
    from diffstudio_flux1.convert import convert_diffusers_to_bfl_dit
    from safetensors.torch import save_file

    ref = helpers.diffusers_dit(True, seed=7, context=fx.T5_HIDDEN, pooled=fx.CLIP_HIDDEN)
    ref.save_pretrained(tmp_path / "t")
    save_file({k: v.contiguous() for k, v in convert_diffusers_to_bfl_dit(helpers.read_folder(tmp_path / "t")).items()},
              str(tmp_path / "dit.safetensors"))  # fmt: skip
    dit, _ = helpers.load(tmp_path / "dit.safetensors")
    inp = helpers.dit_inputs(batch=2, height=2, width=3, txt=4)
    inp["txt"] = torch.randn(2, 4, fx.T5_HIDDEN)
    inp["y"] = torch.randn(2, fx.CLIP_HIDDEN)
    entities = torch.randn(1, 5, fx.T5_HIDDEN)  # two entities of 2 and 3 tokens
    inside = [[True, False, False, True, True, False], [False, True, True, False, False, True]]
    mask = naive_mask(4, [2, 3], inside, 0)
    seen: list[str] = []

    def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context: Any) -> torch.Tensor:
        seen.append(f"{context.kind}_{context.index}")
        return naive_attention(q, k, v, context.extras["naive"])

    with torch.no_grad():
        dit.set_attn_processor(RegionalAttentionProcessor())
        ours = dit(
            **inp, extra_txt=entities, attention_kwargs={MASK_KEY: regional_mask(4, [2, 3], torch.tensor([inside]))}
        )
        dit.set_attn_processor(reference)
        expected = dit(**inp, extra_txt=entities, attention_kwargs={"naive": mask})
        dit.reset_attn_processors()
        plain = dit(**inp, extra_txt=entities)
    diff = (ours - expected).abs().max().item()
    print(f"EliGen masked attention vs naive reference: max diff {diff:.2e}")
    assert seen == dit.block_names and diff <= 1e-5 and (ours - plain).abs().max() > 1e-3


def ours(repo: Any, runtime: Runtime | None = None) -> FluxImagePipeline:
    configs = [ModelConfig(path=str(repo.root / n)) for n in ("transformer", "text_encoder", "text_encoder_2", "vae")]
    pipe = FluxImagePipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu", runtime=runtime or Runtime(), model_configs=configs
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def masks() -> list[Image.Image]:
    left, right = Image.new("L", (W, H), 0), Image.new("L", (W, H), 0)
    left.paste(255, (0, 0, W // 2, H))
    right.paste(255, (W // 2, 8, W, H))
    return [left, right]


ARGS: dict[str, Any] = {"height": H, "width": W, "num_inference_steps": 2, "seed": 0, "output_type": "latent",
                        "t5_sequence_length": SEQ}  # fmt: skip


def test_pipeline_builds_the_mask_over_the_real_sequence(repo: Any) -> None:
    pipe = ours(repo)
    entity = {"eligen_entity_prompts": ["a red circle", "a green star"], "eligen_entity_masks": masks()}
    state = pipe.prepare(pipe.call_inputs(PROMPT, **{**ARGS, **entity}), cfg=False)
    view = state.view("positive")
    grid_h, grid_w = H // pipe.spatial_factor, W // pipe.spatial_factor
    inside = [[c < grid_w // 2 for r in range(grid_h) for c in range(grid_w)],
              [c >= grid_w // 2 and r >= 2 for r in range(grid_h) for c in range(grid_w)]]  # fmt: skip
    assert torch.equal(view["attention_kwargs"][MASK_KEY], naive_mask(SEQ, [SEQ, SEQ], inside, 0))
    assert view["extra_txt"].shape == (1, 2 * SEQ, 24)
    base = pipe(PROMPT, **ARGS)
    regional = pipe(PROMPT, **ARGS, **entity)
    assert (regional - base).abs().max() > 1e-3
    cfg = {"cfg_scale": 2.0, "negative_prompt": "blurry"}
    off = pipe(PROMPT, **ARGS, **entity, **cfg)
    on = pipe(PROMPT, **ARGS, **entity, **cfg, eligen_enable_on_negative=True)
    assert (on - off).abs().max() > 1e-4


def test_eligen_inpaint_repaints_only_the_entities(repo: Any, fp: Any) -> None:
    pipe = ours(repo)
    source = fp.image(W, H, seed=3)
    only_left = [masks()[0]]
    out = pipe(PROMPT, **ARGS, input_image=source, eligen_entity_prompts=["a cat"], eligen_entity_masks=only_left,
               eligen_enable_inpaint=True)  # fmt: skip
    from diffstudio.pipeline.images import pil_to_tensor
    from diffstudio_flux1.math import pack_latents

    with torch.no_grad():
        clean = pack_latents(pipe.encode_image(pil_to_tensor(source)))
    grid_w = W // pipe.spatial_factor
    right = torch.arange(out.shape[1]) % grid_w >= grid_w // 2
    assert (out[:, right] - clean[:, right]).abs().max() < 1e-4 and (
        out[:, ~right] - clean[:, ~right]
    ).abs().max() > 1e-2


def test_bad_inputs_are_typed_errors_naming_the_argument(repo: Any) -> None:
    pipe = ours(repo)
    with pytest.raises(PipelineInputError, match="2 masks for 1 eligen_entity_prompts"):
        pipe(PROMPT, **ARGS, eligen_entity_prompts=["a cat"], eligen_entity_masks=masks())
    with pytest.raises(PipelineInputError, match=r"eligen_entity_masks\[0\] has mode 'RGB'"):
        pipe(PROMPT, **ARGS, eligen_entity_prompts=["a cat"], eligen_entity_masks=[masks()[0].convert("RGB")])
    with pytest.raises(PipelineInputError, match="without eligen_entity_prompts"):
        pipe(PROMPT, **ARGS, eligen_entity_masks=masks())
    with pytest.raises(PipelineInputError, match="need eligen_entity_masks"):
        pipe(PROMPT, **ARGS, eligen_entity_prompts=["a cat"])
    with pytest.raises(PipelineInputError, match="needs input_image"):
        pipe(PROMPT, **ARGS, eligen_entity_prompts=["a"], eligen_entity_masks=masks()[:1], eligen_enable_inpaint=True)
    blocked = ours(repo, Runtime(env={"DIFFSTUDIO_DISABLED_PLUGINS": "eligen"}))
    with pytest.raises(MissingPluginError, match="diffstudio-eligen"):
        blocked(PROMPT, **ARGS, eligen_entity_prompts=["a cat"], eligen_entity_masks=masks()[:1])


def test_the_eligen_lora_loads_through_the_family_loader(repo: Any, tmp_path: Any) -> None:
    """EliGen's published LoRA uses DiffSynth's DiT names (``blocks.N.attn.a_to_qkv.lora_A.default.weight``)."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for block in range(2):
        for name, (fan_in, fan_out) in {"attn.a_to_qkv": (64, 192), "attn.b_to_out": (64, 64)}.items():
            tensors[f"blocks.{block}.{name}.lora_A.default.weight"] = torch.randn(4, fan_in, generator=gen) / 8
            tensors[f"blocks.{block}.{name}.lora_B.default.weight"] = torch.randn(fan_out, 4, generator=gen) / 4
    save_file(tensors, str(tmp_path / "eligen_lora.safetensors"))
    pipe = ours(repo)
    entity = {"eligen_entity_prompts": ["a red circle"], "eligen_entity_masks": masks()[:1]}
    before = pipe(PROMPT, **ARGS, **entity)
    report = pipe.load_lora(tmp_path / "eligen_lora.safetensors")
    assert report.format == "flux1/diffsynth" and report.tensors_matched == len(tensors) and not report.unmatched_keys
    assert (pipe(PROMPT, **ARGS, **entity) - before).abs().max() > 1e-4
