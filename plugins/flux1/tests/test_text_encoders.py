"""CLIP pooled vectors and T5 token embeddings equal diffusers' FluxPipeline.encode_prompt (<= 1e-5)."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest
import torch
from diffstudio.testing import import_file
from diffstudio_flux1.text_encoders import (
    CLIP_MAX_LENGTH,
    PromptEncoder,
    TextEncoderError,
    TokenizerConfigError,
    load_clip_encoder,
    load_tokenizer,
)


def _load(name: str) -> ModuleType:
    return import_file(Path(__file__).with_name(f"{name}.py"))


fx = _load("fixtures_text")
PROMPTS = ["a red circle on a blue background", "A cat holding a sign that says hello world. " * 12]


@pytest.fixture(scope="module")
def text_repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    clip_vocab = fx.build_clip_tokenizer(root / "tokenizer")
    t5_vocab = fx.build_t5_tokenizer(root / "tokenizer_2")
    clip = fx.build_clip_encoder(root / "text_encoder", clip_vocab, legacy=True)
    fx.build_clip_encoder(root / "text_encoder_t5layout", clip_vocab, legacy=False)
    t5 = fx.build_t5_encoder(root / "text_encoder_2", t5_vocab)
    return root, clip, t5


def _reference(root, clip, t5, length):
    from diffusers import FluxPipeline

    pipe = FluxPipeline(
        scheduler=None, vae=None, transformer=None, text_encoder=clip, text_encoder_2=t5,
        tokenizer=load_tokenizer(root / "tokenizer", "clip"), tokenizer_2=load_tokenizer(root / "tokenizer_2", "t5"),
    )  # fmt: skip
    with torch.no_grad():
        return pipe.encode_prompt(PROMPTS, None, max_sequence_length=length)


@pytest.mark.parametrize("clip_folder", ["text_encoder", "text_encoder_t5layout"])
def test_prompt_embeddings_match_diffusers(text_repo, helpers, clip_folder):
    root, clip_ref, t5_ref = text_repo
    clip, clip_claim = helpers.load(root / clip_folder)
    t5, t5_claim = helpers.load(root / "text_encoder_2")
    assert (clip_claim.component, t5_claim.component) == ("text_encoder", "text_encoder_2")
    assert clip_claim.source_format == ("legacy" if clip_folder == "text_encoder" else "transformers5")
    encoder = PromptEncoder(
        clip, load_tokenizer(root / "tokenizer", "clip"), t5, load_tokenizer(root / "tokenizer_2", "t5")
    )
    ref_txt, ref_pooled, ref_ids = _reference(root, clip_ref, t5_ref, 32)
    with torch.no_grad():
        got = encoder.encode(PROMPTS, 32)
    assert got.txt.shape == ref_txt.shape == (2, 32, fx.T5_HIDDEN)
    assert got.y.shape == ref_pooled.shape == (2, fx.CLIP_HIDDEN)
    assert (got.txt - ref_txt).abs().max() <= 1e-5 and (got.y - ref_pooled).abs().max() <= 1e-5
    assert got.txt_ids.shape == (2, 32, 3) and not got.txt_ids.any() and not ref_ids.any()
    assert got.y.abs().max() > 0.1 and (got.y[0] - got.y[1]).abs().max() > 1e-3


def test_clip_pools_at_the_end_of_text_token(text_repo):
    root, clip_ref, _ = text_repo
    tokenizer = load_tokenizer(root / "tokenizer", "clip")
    ids = tokenizer(PROMPTS[:1], padding="max_length", max_length=CLIP_MAX_LENGTH, truncation=True, return_tensors="pt")
    eos = int((ids.input_ids[0] == tokenizer.eos_token_id).nonzero()[0])
    with torch.no_grad():
        out = clip_ref(ids.input_ids)
    assert ids.input_ids.shape[1] == 77 and 0 < eos < 76
    assert torch.equal(out.pooler_output[0], out.last_hidden_state[0, eos])


def test_t5_loads_from_shards_with_the_tied_embedding(text_repo, helpers):
    root, _, t5_ref = text_repo
    assert len(list((root / "text_encoder_2").glob("*.safetensors"))) == 2
    t5, _ = helpers.load(root / "text_encoder_2")
    assert t5.encoder.embed_tokens.weight is t5.shared.weight
    assert torch.equal(t5.shared.weight, t5_ref.shared.weight)


def test_errors_are_typed(text_repo, tmp_path):
    root, _, _ = text_repo
    with pytest.raises(TokenizerConfigError, match="tokenizer_1_config"):
        load_tokenizer(tmp_path / "missing", "clip")
    with pytest.raises(TextEncoderError, match="not a CLIP"):
        load_clip_encoder(root / "text_encoder_2")
