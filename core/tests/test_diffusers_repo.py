"""``diffstudio.loading.diffusers_repo``: a diffusers repository folder read from its ``model_index.json``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from diffstudio.loading.diffusers_repo import DiffusersRepoError, is_diffusers_repo, read_repo, repo_model_configs


def _repo(root: Path, index: dict[str, object] | None) -> Path:
    for name in ("transformer", "vae", "text_encoder"):
        (root / name).mkdir(parents=True)
        (root / name / "config.json").write_text("{}")
        (root / name / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "tokenizer.json").write_text("{}")
    (root / "scheduler").mkdir()
    if index is not None:
        (root / "model_index.json").write_text(json.dumps(index))
    return root


INDEX = {
    "_class_name": "Flux2KleinPipeline",
    "_diffusers_version": "0.36.0",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "Qwen3ForCausalLM"],
    "tokenizer": ["transformers", "Qwen2TokenizerFast"],
    "transformer": ["diffusers", "Flux2Transformer2DModel"],
    "vae": ["diffusers", "AutoencoderKLFlux2"],
    "image_encoder": [None, None],
}


def test_model_dir_reads_model_index_into_components(tmp_path: Path) -> None:
    root = _repo(tmp_path / "repo", INDEX)
    assert is_diffusers_repo(root)
    repo = read_repo(root, offload_device="cpu")
    assert repo.pipeline_class == "Flux2KleinPipeline"
    assert list(repo.components) == ["text_encoder", "transformer", "vae"]
    assert [c.path for c in repo.model_configs] == [str(root / n) for n in ("text_encoder", "transformer", "vae")]
    assert all(c.offload_device == "cpu" for c in repo.model_configs)
    assert repo.tokenizers == {"tokenizer": root / "tokenizer"} and "scheduler" in repo.skipped
    configs, tokenizer = repo_model_configs(root)
    assert len(configs) == 3 and tokenizer is not None and tokenizer.path == str(root / "tokenizer")


def test_repo_without_index_takes_weight_subfolders(tmp_path: Path) -> None:
    root = _repo(tmp_path / "repo", None)
    assert is_diffusers_repo(root) and not is_diffusers_repo(root / "vae")
    assert list(read_repo(root).components) == ["text_encoder", "transformer", "vae"]


def test_repo_lists_missing_components_and_refuses_bad_indexes(tmp_path: Path) -> None:
    root = _repo(tmp_path / "repo", {**INDEX, "text_encoder_2": ["transformers", "T5EncoderModel"]})
    assert read_repo(root).missing == ["text_encoder_2"]
    for bad in ("[1, 2]", "{not json", "[" * 5000 + "]" * 5000):
        (root / "model_index.json").write_text(bad)
        with pytest.raises(DiffusersRepoError, match="model_index.json"):
            read_repo(root)
    (root / "model_index.json").write_text(json.dumps({"../escape": ["diffusers", "X"]}))
    with pytest.raises(DiffusersRepoError, match="not a plain folder name"):
        read_repo(root)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "model_index.json").write_text(json.dumps({"transformer": ["diffusers", "X"]}))
    with pytest.raises(DiffusersRepoError, match="listed but missing: transformer"):
        read_repo(empty)
