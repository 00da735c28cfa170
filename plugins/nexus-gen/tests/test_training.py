"""Nexus-Gen training as DiffSynth's table lists it: the editing decoder's DiT, full and LoRA; the AR model frozen.

Sigma is pinned (logit-normal with a tiny spread) so that 8 steps on two memorised samples lower the loss reliably.
Split training (``sft:data_process`` then ``sft:train``) must keep the AR model's text stream: its losses equal
one-stage training's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from diffstudio.train import train
from diffstudio_nexus_gen import convert_decoder_file
from safetensors.torch import load_file

EPOCHS = 8
MERGER = {"heads": 2, "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, helpers: Any, fx: Any, fp: Any, ng: Any, repo: Any,
          ar_files: Any) -> dict[str, Any]:  # fmt: skip
    """The converted editing decoder (config.json beside its DiT) and two (edited, reference, instruction) rows."""
    from diffstudio_flux1.convert import convert_diffusers_to_bfl_dit

    root = tmp_path_factory.mktemp("nexus-gen-train")
    dit = convert_diffusers_to_bfl_dit(helpers.diffusers_dit(True, seed=31, context=fx.T5_HIDDEN,
                                                             pooled=fx.CLIP_HIDDEN).state_dict())  # fmt: skip
    decoder = ng.write_decoder(root / "edit_decoder.bin", dit, ng.merger_state(seed=5))
    dit_file, head_file = convert_decoder_file(decoder, root / "converted", allow_pickle=True)
    (root / "converted" / "config.json").write_text((repo.root / "transformer" / "config.json").read_text())
    data = root / "data"
    data.mkdir()
    rows = []
    for i in range(2):
        fp.image(32, 32, seed=70 + i).save(data / f"{i}.png")
        fp.image(56, 56, seed=90 + i).save(data / f"ref-{i}.png")
        rows.append({"prompt": "Add a crown.", "image": f"{i}.png", "nexus_gen_reference_image": f"ref-{i}.png"})
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    models = [str(repo.root / n) for n in ("text_encoder", "text_encoder_2", "vae")]
    models += [str(dit_file), {"path": str(head_file), "config": MERGER}, str(ar_files.folder / "model.safetensors")]
    return {"data": data, "models": models, "dit": dit}


def options(setup: dict[str, Any], output: Path, **extra: Any) -> dict[str, Any]:
    data = setup["data"]
    values: dict[str, Any] = {
        "dataset_base_path": str(data), "dataset_metadata_path": str(data / "metadata.jsonl"),
        "data_file_keys": ["image", "nexus_gen_reference_image"],
        "model_paths": setup["models"], "height": 32, "width": 32, "batch_size": 2, "output_path": str(output),
        "pipeline_args": {"t5_sequence_length": 16}, "seed": 0, "num_epochs": EPOCHS,
        "timestep_sampling": "logit_normal", "logit_std": 1e-4,
    }  # fmt: skip
    values.update(extra)
    return values


def falls(losses: list[float]) -> tuple[float, float]:
    return sum(losses[:2]) / 2, sum(losses[-2:]) / 2


def test_full_training_of_the_editing_decoder_dit_lowers_the_loss(setup: dict[str, Any], tmp_path: Path) -> None:
    result = train(**options(setup, tmp_path, trainable_models=["dit"], learning_rate=1e-3))
    first, last = falls(result.losses)
    print(f"nexus-gen full training loss {first:.4f} -> {last:.4f} over {len(result.losses)} steps")
    assert len(result.losses) == EPOCHS and last < 0.8 * first, result.losses
    saved = load_file(str(tmp_path / f"epoch-{EPOCHS - 1}.safetensors"))
    assert set(saved) == set(setup["dit"])  # the DiT only, in BFL names (the merger and the AR model stay frozen)


def test_lora_training_lowers_the_loss_and_split_training_keeps_the_text_stream(
    setup: dict[str, Any], tmp_path: Path
) -> None:
    lora = {"lora_base_model": "dit", "lora_rank": 4, "learning_rate": 1e-2}
    result = train(**options(setup, tmp_path / "one-stage", **lora))
    first, last = falls(result.losses)
    print(f"nexus-gen LoRA training loss {first:.4f} -> {last:.4f} over {len(result.losses)} steps")
    assert last < 0.8 * first, result.losses
    saved = load_file(str(tmp_path / "one-stage" / f"epoch-{EPOCHS - 1}.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k or "lora_up" in k)
    split = tmp_path / "split"
    train(**options(setup, split, task="sft:data_process", trainable_models=["dit"]))
    assert "nexus_gen_prompt" in json.loads((split / "cache" / "units.json").read_text())["units"]
    stored = load_file(str(next((split / "cache").glob("0*.safetensors"))))
    txt = stored["positive/text_stream@text_stream.txt"]
    assert txt.shape[0] == 1 and txt.shape[1] > 81 and txt.shape[2] == 24  # the merger's 81 target + reference tokens
    cached = train(**options(setup, split, task="sft:train", **lora))
    # the AR model ran once per row in stage 1; stage 2 trains on its stored text stream: the same losses
    assert cached.losses == pytest.approx(result.losses, rel=1e-4, abs=1e-6)
