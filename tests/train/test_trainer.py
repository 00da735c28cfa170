"""The trainer on a tiny FLUX.2 model: learning, split training, resume, formats, DDP, bad input."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffstudio.errors import ConfigError
from diffstudio.train import DatasetError, TrainConfigError, train
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_full_finetune_lowers_the_loss_and_saves_in_the_bfl_layout(tiny_model, tmp_path):
    result = train(**tiny_model.options(tmp_path, num_epochs=12, dataset_repeat=1, learning_rate=3e-3))
    first, last = sum(result.losses[:4]) / 4, sum(result.losses[-4:]) / 4
    assert last < first * 0.8, result.losses
    saved = _weights(tmp_path / "epoch-11.safetensors")
    assert saved.keys() == _weights(tiny_model.dit).keys()
    assert _max_diff(saved, _weights(tiny_model.dit)) > 0
    assert json.loads((tmp_path / "train_log.json").read_text())["steps"] == result.steps


def test_bf16_mixed_precision_trains_and_keeps_float32_weights(tiny_model, tmp_path):
    # the shapes recipe trains its DiT this way (autocast on CPU: 1.27x faster steps there)
    result = train(**tiny_model.options(tmp_path, num_epochs=12, dataset_repeat=1, learning_rate=3e-3,
                                        mixed_precision="bf16"))  # fmt: skip
    first, last = sum(result.losses[:4]) / 4, sum(result.losses[-4:]) / 4
    assert last < first * 0.8, result.losses
    saved = _weights(tmp_path / "epoch-11.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float32}
    assert _max_diff(saved, _weights(tiny_model.dit)) > 0


def test_split_training_reproduces_one_stage_losses(tiny_model, tmp_path):
    one = train(**tiny_model.options(tmp_path / "one", caption_dropout=0.3))
    train(**tiny_model.options(tmp_path / "split", caption_dropout=0.3, task="sft:data_process"))
    cached = sorted((tmp_path / "split" / "cache").glob("*.safetensors"))
    assert len(cached) == 8
    two = train(**tiny_model.options(tmp_path / "split", caption_dropout=0.3, task="sft:train"))
    assert two.losses == pytest.approx(one.losses, abs=1e-6)
    from_disk = train(**tiny_model.options(tmp_path / "split", caption_dropout=0.3, task="sft:train",
                                           cache_memory_mb=0))  # fmt: skip
    assert from_disk.losses == two.losses
    assert _max_diff(_weights(tmp_path / "one" / "epoch-1.safetensors"),
                     _weights(tmp_path / "split" / "epoch-1.safetensors")) < 1e-6  # fmt: skip


def test_the_preloaded_cache_hands_out_copies(tmp_path):
    from diffstudio.pipeline.state import PipelineState
    from diffstudio.train.cache import SampleCache

    cache = SampleCache(tmp_path)
    state = PipelineState(shared={"latents": torch.arange(6.0).reshape(1, 2, 3), "size": [2, 3]})
    state.branch("negative")["prompt_embeds"] = torch.ones(1, 4)
    cache.store(0, state, {})
    assert not cache.preload([0], budget_bytes=16)  # the file is larger: rows stay on disk
    assert cache.preload([0, 0], budget_bytes=2**20)
    cache.path(0).unlink()  # from now on only memory can answer
    first = cache.load(0)
    first.shared["latents"].add_(100)
    again = cache.load(0)
    assert torch.equal(again.shared["latents"], torch.arange(6.0).reshape(1, 2, 3))
    assert again.shared["size"] == [2, 3] and torch.equal(again.branch("negative")["prompt_embeds"], torch.ones(1, 4))
    with pytest.raises(ConfigError, match="missing"):
        SampleCache(tmp_path).load(0)


def test_resume_after_a_kill_reproduces_the_uninterrupted_run(tiny_model, tmp_path):
    """Kill a training process right after a random checkpoint, resume it, compare with a run never stopped."""
    import random

    schedule = {"lr_scheduler": "cosine", "lr_warmup_steps": 2, "max_steps": 8}  # the rate depends on the step
    reference = tmp_path / "reference"
    train(**tiny_model.options(reference, checkpoint_steps=1, ema_decay=0.9, **schedule))
    killed = tmp_path / "killed"
    stop_after = random.Random().randint(1, 6)
    flags = [item for key, value in schedule.items() for item in (f"--{key}", str(value))]
    argv = [sys.executable, "-m", "diffstudio", "train", *tiny_model.argv(killed, "--checkpoint_steps", "1",
                                                                            "--ema_decay", "0.9", *flags)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = killed / "checkpoints" / f"step-{stop_after}" / "trainer_state.json"
    while process.poll() is None and not target.exists():
        pass
    process.kill()
    process.wait()
    assert target.exists(), "the run ended before its checkpoint"
    resumed = train(**tiny_model.options(killed, checkpoint_steps=1, ema_decay=0.9, resume=True, **schedule))
    assert resumed.steps == 8
    assert _max_diff(_weights(reference / "epoch-1.safetensors"), _weights(killed / "epoch-1.safetensors")) == 0.0
    # resuming a finished run trains nothing and keeps its files and log (it once took one step more)
    before = {path.name: path.stat().st_mtime_ns for path in reference.iterdir() if path.is_file()}
    again = train(**tiny_model.options(reference, checkpoint_steps=1, ema_decay=0.9, resume=True, **schedule))
    assert (again.steps, again.losses, again.files) == (8, [], [])
    assert {path.name: path.stat().st_mtime_ns for path in reference.iterdir() if path.is_file()} == before


def test_two_processes_equal_one_process_with_doubled_accumulation(tiny_model, tmp_path):
    accelerate = Path(sys.executable).with_name("accelerate")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = tmp_path / "ddp"
    command = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "diffstudio", "train",
               *tiny_model.argv(two, "--batch_size", "1")]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    one = train(**tiny_model.options(tmp_path / "single", batch_size=1, gradient_accumulation_steps=2))
    assert one.steps == 8
    single = _weights(tmp_path / "single" / "epoch-1.safetensors")
    assert _max_diff(_weights(two / "epoch-1.safetensors"), single) < 1e-5


@pytest.mark.parametrize("layout", ["diffusers", "comfy", "kohya"])
def test_lora_training_writes_each_layout(tiny_model, tmp_path, layout):
    result = train(**tiny_model.options(
        tmp_path, trainable_models=[], lora_base_model="dit", lora_target_modules=["qkv", "proj", "linear1"],
        lora_rank=4, lora_format=layout, num_epochs=1,
    ))  # fmt: skip
    assert result.steps == 4
    keys = list(_weights(tmp_path / "epoch-0.safetensors"))
    expected = {"diffusers": "transformer.", "comfy": "diffusion_model.", "kohya": "lora_unet_"}[layout]
    assert keys and all(k.startswith(expected) for k in keys), keys[:4]


def _write_rows(data: Path, rows: list[dict[str, str]], name: str = "bad.csv") -> Path:
    path = data / name
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=sorted({k for r in rows for k in r}))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"image": "images/00000.png", "prompt": "a"}, {"image": "images/missing.png", "prompt": "b"}],
         r"row 1: image file .*missing\.png does not exist"),
        ([{"image": "corrupt.png", "prompt": "a"}], r"row 0: image file .*corrupt\.png is not a readable image"),
        ([{"image": "images/00000.png", "prompt": "a", "colour": "red"}], r"row 0: unknown column\(s\) \['colour'\]"),
        ([], r"holds no samples"),
    ],
)  # fmt: skip
def test_bad_data_stops_before_training_naming_the_row(tiny_model, tmp_path, rows, message):
    (tiny_model.data / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    metadata = _write_rows(tiny_model.data, rows, f"bad-{len(rows)}-{abs(hash(message))}.csv")
    if not rows:
        metadata.write_text("image,prompt\n")
    with pytest.raises(DatasetError, match=message):
        train(**tiny_model.options(tmp_path, dataset_metadata_path=str(metadata)))
    assert not (tmp_path / "checkpoints").exists()


def test_trainable_models_that_match_nothing_are_an_error(tiny_model, tmp_path):
    with pytest.raises(TrainConfigError, match=r"'unet'.*loaded: dit, text_encoder, vae"):
        train(**tiny_model.options(tmp_path, trainable_models=["unet"]))
    with pytest.raises(TrainConfigError, match=r"matches no Linear layer"):
        train(**tiny_model.options(tmp_path, trainable_models=[], lora_base_model="dit",
                                   lora_target_modules=["to_q"]))  # fmt: skip
