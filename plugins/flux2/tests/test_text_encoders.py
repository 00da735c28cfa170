"""FLUX.2 prompt encoding (Qwen3 for klein, Mistral3 for dev) equals diffusers' on tiny real models."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import ModuleType

import pytest
import torch
from diffstudio.errors import CheckpointError, PipelineInputError, StrictLoadError
from diffstudio.testing import import_file
from diffstudio_flux2.text_encoders import (
    MISTRAL3_LAYERS,
    QWEN3_LAYERS,
    Mistral3PromptEncoder,
    Qwen3PromptEncoder,
    TextEncoderError,
    TextEncoderMismatchError,
    TokenizerConfigError,
    check_context_width,
    is_mistral3_text_encoder,
    is_qwen3_text_encoder,
    load_mistral3_encoder,
    load_qwen3_encoder,
    load_tokenizer,
    mistral3_layout,
    prompt_text_ids,
    text_hidden_size,
)
from safetensors import safe_open
from safetensors.torch import save_file


def _load_fixtures() -> ModuleType:
    return import_file(Path(__file__).with_name("fixtures_text.py"))


fx = _load_fixtures()

TOL = 1e-5
PROMPTS = [
    "a red circle",
    "High resolution. A dreamy underwater portrait of a serene young woman in a blue dress.",
]
HIDDEN = 32


def _keys_shapes(files: list[Path]) -> tuple[list[str], dict[str, tuple[int, ...]]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        with safe_open(str(file), "pt") as f:
            for key in f.keys():  # noqa: SIM118
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return list(shapes), shapes


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    from transformers import Qwen3ForCausalLM

    root = tmp_path_factory.mktemp("klein")
    vocab = fx.build_qwen3_tokenizer(root / "tokenizer")
    fx.build_qwen3_encoder(root / "text_encoder", vocab, seed=0, shards=3)
    reference = Qwen3ForCausalLM.from_pretrained(str(root / "text_encoder"), local_files_only=True).eval()
    return {"root": root, "reference": reference, "tokenizer": load_tokenizer(root / "tokenizer", "qwen3")}


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    from transformers import Mistral3ForConditionalGeneration

    root = tmp_path_factory.mktemp("dev")
    vocab = fx.build_mistral_tokenizer(root / "tokenizer")
    tokenizer = load_tokenizer(root / "tokenizer", "mistral3")
    img = tokenizer.convert_tokens_to_ids("[IMG]")
    fx.build_mistral3_encoder(root / "text_encoder", vocab, img, seed=1)
    fx.build_mistral3_encoder(root / "text_encoder_legacy", vocab, img, seed=1, shards=2, legacy=True)
    reference = Mistral3ForConditionalGeneration.from_pretrained(
        str(root / "text_encoder"), local_files_only=True
    ).eval()
    return {"root": root, "reference": reference, "tokenizer": tokenizer}


# -- tokenizer fixtures behave like the official ones ------------------------------------------------------


def test_qwen3_tokenizer_folder_is_a_real_qwen2_tokenizer(qwen):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(qwen["root"] / "tokenizer"), local_files_only=True)
    assert type(tok).__name__ in {"Qwen2Tokenizer", "Qwen2TokenizerFast"}
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"
    text = tok.apply_chat_template(
        [{"role": "user", "content": "a cat"}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=False,
    )
    assert text == "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    thinking = tok.apply_chat_template(
        [{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True
    )
    assert thinking.endswith("<|im_start|>assistant\n")
    ids = tok(text)["input_ids"]
    for special in ("<|im_start|>", "<|im_end|>", "<think>", "</think>"):
        assert tok.convert_tokens_to_ids(special) in ids
    assert tok.decode(tok("a red cat, 一只猫")["input_ids"]) == "a red cat, 一只猫"


def test_mistral_tokenizer_folder_renders_like_mistral_small(mistral):
    tok = mistral["tokenizer"]
    messages = Mistral3PromptEncoder(torch.nn.Linear(1, 1), tok).messages(["a [IMG]cat"])[0]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text.startswith("<s>[SYSTEM_PROMPT]You are an AI that reasons")
    assert text.endswith("speculation.[/SYSTEM_PROMPT][INST]a cat[/INST]")
    enc = tok.apply_chat_template(messages, tokenize=True, return_dict=True)
    assert enc["input_ids"][0] == tok.bos_token_id and enc["input_ids"].count(tok.bos_token_id) == 1


# -- parity with diffusers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("max_len", [512, 40])
def test_qwen3_prompt_embeds_match_flux2_klein_pipeline(qwen, max_len):
    from diffusers import Flux2KleinPipeline

    pipe = Flux2KleinPipeline(
        scheduler=None,
        vae=None,
        text_encoder=qwen["reference"],
        tokenizer=qwen["tokenizer"],
        transformer=None,
    )
    with torch.no_grad():
        ref_embeds, ref_ids = pipe.encode_prompt(
            PROMPTS, device=torch.device("cpu"), max_sequence_length=max_len
        )
    encoder = Qwen3PromptEncoder.from_pretrained(qwen["root"] / "text_encoder", qwen["root"] / "tokenizer")
    embeds, ids = encoder.encode(PROMPTS, max_sequence_length=max_len)
    assert embeds.shape == ref_embeds.shape == (2, max_len, 3 * HIDDEN)
    diff = (embeds - ref_embeds).abs().max().item()
    assert diff <= TOL, f"max abs diff {diff}"
    assert ref_embeds.abs().mean() > 0.1
    assert ids.dtype == ref_ids.dtype and torch.equal(ids, ref_ids)
    assert encoder.width == 3 * HIDDEN
    _, mask = encoder.tokenize(PROMPTS, max_len)  # padding, and truncation at 40
    assert mask[0].sum() < mask[1].sum() <= max_len and mask[0, -1] == 0


def test_mistral3_prompt_embeds_match_flux2_pipeline(mistral):
    from diffusers import Flux2Pipeline

    pipe = Flux2Pipeline(
        scheduler=None,
        vae=None,
        text_encoder=mistral["reference"],
        tokenizer=mistral["tokenizer"],
        transformer=None,
    )
    prompts = [PROMPTS[0], PROMPTS[1] + " [IMG] with an image token"]
    with torch.no_grad():
        ref_embeds, ref_ids = pipe.encode_prompt(prompts, device=torch.device("cpu"), max_sequence_length=512)
    encoder = Mistral3PromptEncoder.from_pretrained(
        mistral["root"] / "text_encoder", mistral["root"] / "tokenizer"
    )
    embeds, ids = encoder(prompts)
    assert embeds.shape == ref_embeds.shape == (2, 512, 3 * HIDDEN)
    diff = (embeds - ref_embeds).abs().max().item()
    assert diff <= TOL, f"max abs diff {diff}"
    assert ref_embeds.abs().mean() > 0.1
    assert torch.equal(ids, ref_ids)


def test_mistral3_legacy_layout_loads_to_identical_outputs(mistral):
    root, tok = mistral["root"], mistral["tokenizer"]
    modern = Mistral3PromptEncoder(load_mistral3_encoder(root / "text_encoder"), tok)
    legacy_files = sorted((root / "text_encoder_legacy").glob("*.safetensors"))
    keys, shapes = _keys_shapes(legacy_files)
    assert any(k.startswith("language_model.model.") for k in keys)
    assert mistral3_layout(keys, shapes) == "legacy"
    legacy = Mistral3PromptEncoder(load_mistral3_encoder(legacy_files), tok)
    a, _ = modern.encode(PROMPTS, 64)
    b, _ = legacy.encode(PROMPTS, 64)
    assert torch.equal(a, b)


def test_qwen3_loads_from_file_lists_both_layouts_and_trims_layers(qwen, tmp_path):
    root, tok = qwen["root"], qwen["tokenizer"]
    files = sorted((root / "text_encoder").glob("*.safetensors"))
    assert len(files) == 3
    trimmed = load_qwen3_encoder(files)
    full = load_qwen3_encoder(root / "text_encoder", layers=None)
    assert len(trimmed.layers) == max(QWEN3_LAYERS) + 1 and len(full.layers) == 30
    # Qwen3Model layout (no "model." prefix, no lm_head)
    state = {
        k[len("model.") :]: v for k, v in qwen["reference"].state_dict().items() if k.startswith("model.")
    }
    bare = tmp_path / "bare"
    bare.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(bare / "model.safetensors"))
    shutil.copy(root / "text_encoder" / "config.json", bare / "config.json")
    outs = [
        Qwen3PromptEncoder(m, tok).encode(PROMPTS, 48)[0] for m in (trimmed, full, load_qwen3_encoder(bare))
    ]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_dtype_and_device_arguments(qwen):
    model = load_qwen3_encoder(qwen["root"] / "text_encoder", torch.bfloat16, "cpu")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    embeds, ids = Qwen3PromptEncoder(model, qwen["tokenizer"]).encode("one prompt", 16)
    assert embeds.dtype == torch.bfloat16 and embeds.shape == (1, 16, 3 * HIDDEN) and ids.shape == (1, 16, 4)
    embeds32, _ = Qwen3PromptEncoder(model, qwen["tokenizer"]).encode(["x"], 16, dtype=torch.float32)
    assert embeds32.dtype == torch.float32


# -- detection, widths, errors -----------------------------------------------------------------------------


def test_detection_by_keys_and_shapes(qwen, mistral):
    q_keys, q_shapes = _keys_shapes(sorted((qwen["root"] / "text_encoder").glob("*.safetensors")))
    m_keys, m_shapes = _keys_shapes([mistral["root"] / "text_encoder" / "model.safetensors"])
    assert is_qwen3_text_encoder(q_keys, q_shapes) and not is_mistral3_text_encoder(q_keys, q_shapes)
    assert is_mistral3_text_encoder(m_keys, m_shapes) and not is_qwen3_text_encoder(m_keys, m_shapes)
    assert mistral3_layout(m_keys, m_shapes) == "transformers5"
    assert text_hidden_size(q_keys, q_shapes) == HIDDEN == text_hidden_size(m_keys, m_shapes)
    dit_keys = {"txt_in.weight": (32, 96), "img_in.weight": (32, 16)}
    assert not is_qwen3_text_encoder(dit_keys, dit_keys) and not is_mistral3_text_encoder(dit_keys, dit_keys)
    with pytest.raises(TextEncoderError):
        text_hidden_size(dit_keys, dit_keys)
    bad = dict(q_shapes, **{"model.layers.0.self_attn.q_proj.weight": (32, 7)})  # width != hidden
    assert not is_qwen3_text_encoder(q_keys, bad)
    with pytest.raises(TextEncoderError, match="not a Qwen3"):
        load_qwen3_encoder(mistral["root"] / "text_encoder")
    with pytest.raises(TextEncoderError, match="not a Mistral3"):
        load_mistral3_encoder(qwen["root"] / "text_encoder")


def test_context_width_mismatch_is_a_typed_error():
    check_context_width(3 * 2560, 7680)
    with pytest.raises(TextEncoderMismatchError, match="7680") as info:
        check_context_width(3 * 4096, 7680)
    assert isinstance(info.value, CheckpointError)


def test_tokenizer_errors_say_to_pass_tokenizer_config(tmp_path, qwen):
    (tmp_path / "empty").mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json")
    (broken / "tokenizer_config.json").write_text("{}")
    no_template = tmp_path / "no_template"
    shutil.copytree(qwen["root"] / "tokenizer", no_template)
    (no_template / "chat_template.jinja").unlink()
    for source in (None, tmp_path / "missing", tmp_path / "empty", broken, no_template):
        with pytest.raises(TokenizerConfigError, match="tokenizer_config") as info:
            load_tokenizer(source, "qwen3")
        assert isinstance(info.value, PipelineInputError)
    with pytest.raises(TokenizerConfigError, match="tokenizer_config"):
        Qwen3PromptEncoder(torch.nn.Linear(1, 1), None)


def test_missing_config_and_strict_loading(tmp_path, qwen):
    src = qwen["root"] / "text_encoder"
    no_config = tmp_path / "no_config"
    shutil.copytree(src, no_config)
    (no_config / "config.json").unlink()
    with pytest.raises(TextEncoderError, match="config.json"):
        load_qwen3_encoder(no_config)
    assert load_qwen3_encoder(no_config, config=src / "config.json") is not None
    state = {
        k: v
        for k, v in qwen["reference"].state_dict().items()
        if "layers.3.mlp.up_proj" not in k and k != "lm_head.weight"
    }
    holed = tmp_path / "holed"
    holed.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(holed / "model.safetensors"))
    shutil.copy(src / "config.json", holed / "config.json")
    with pytest.raises(StrictLoadError, match="layers.3.mlp.up_proj"):
        load_qwen3_encoder(holed)
    with pytest.raises(TextEncoderError, match="layers"):
        load_qwen3_encoder(src, layers=(9, 18, 40))


def test_text_ids_and_input_checks(qwen):
    ids = prompt_text_ids(2, 5)
    assert ids.shape == (2, 5, 4) and ids.dtype == torch.int64
    assert torch.equal(ids[1, :, 3], torch.arange(5)) and not ids[..., :3].any()
    encoder = Qwen3PromptEncoder(load_qwen3_encoder(qwen["root"] / "text_encoder"), qwen["tokenizer"])
    with pytest.raises(PipelineInputError):
        encoder.encode([], 8)
    assert encoder.layers == QWEN3_LAYERS and Mistral3PromptEncoder.default_layers == MISTRAL3_LAYERS
