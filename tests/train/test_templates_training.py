"""Template training with ``diffstudio train`` on the tiny FLUX.2 model: the three template sources, sub-module
training, split training, saving (data-only export, the seed's packaging steps) and bad arguments."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from diffstudio import ModelConfig
from diffstudio.errors import UntrustedCodeError
from diffstudio.runtime import Runtime
from diffstudio.templates import TemplatePipeline, export_template, load_state_dict, load_template_model
from diffstudio.templates.export import apply_checkpoint
from diffstudio.train import TrainConfigError, train
from diffstudio_template_sdk.testing import toy_templates_plugin
from diffstudio_template_sdk.testing.toy_templates import ToyKVTemplate, ToyLoraTemplate
from safetensors.torch import load_file, save_file

pytestmark = pytest.mark.slow

#: The tiny DiT (hidden 32, 2 heads of 16, one double and one single block): LoRA targets and their sizes.
LORA_TARGETS = {"double_blocks.0.img_attn.qkv": (32, 96), "single_blocks.0.linear1": (32, 288)}
SEED_CODE = """
import pathlib
import torch
from diffstudio_template_sdk.testing.toy_templates import ToyKVTemplate

pathlib.Path(__file__).with_name("executed.txt").write_text("model.py ran")


class SeedKV(ToyKVTemplate):
    pass


class DataProcessor:
    def __call__(self, brightness, **kwargs):
        return {"scale": brightness}


TEMPLATE_MODEL = SeedKV
TEMPLATE_MODEL_PATH = "model.safetensors" if (pathlib.Path(__file__).parent / "model.safetensors").exists() else None
TEMPLATE_DATA_PROCESSOR = DataProcessor
"""


@pytest.fixture(scope="module")
def runtime() -> Runtime:
    return Runtime(plugins=[toy_templates_plugin])


def template_data(tiny_model: Any, folder: Path, key: str = "scale") -> Path:
    """The tiny data set's rows with a ``template_inputs`` JSON column (one value per row)."""
    import csv

    with open(tiny_model.data / "metadata.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "metadata.jsonl"
    lines = [json.dumps({**row, "template_inputs": {key: round(0.1 + 0.8 * i / (len(rows) - 1), 3)}})
             for i, row in enumerate(rows)]  # fmt: skip
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def options(tiny_model: Any, output: Path, metadata: Path, template: str, **overrides: Any) -> dict[str, Any]:
    arguments: dict[str, Any] = {
        "dataset_metadata_path": str(metadata), "extra_inputs": ["template_inputs"], "batch_size": 1,
        "trainable_models": ["template_model"], "template_model_id_or_path": template,
        "remove_prefix_in_ckpt": "pipe.template_model.",
    }  # fmt: skip
    return tiny_model.options(output, **{**arguments, **overrides})


def pipeline(tiny_model: Any, runtime: Runtime) -> Any:
    from diffstudio_flux2 import Flux2ImagePipeline

    files = json.loads(tiny_model.model_paths())
    pipe = Flux2ImagePipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu", runtime=runtime, model_configs=[ModelConfig(path=f) for f in files],
        tokenizer_config=ModelConfig(path=str(tiny_model.root / "tokenizer")),
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


CALL = {"prompt": "a red circle on a blue background", "seed": 1, "height": 64, "width": 64, "num_inference_steps": 2,
        "output_type": "latent", "max_sequence_length": 32}  # fmt: skip


def test_kv_template_training_lowers_the_loss_and_reloads_through_the_template_pipeline(tiny_model, runtime, tmp_path):
    torch.manual_seed(1)
    untrained = ToyKVTemplate(tokens=32)
    source = export_template(untrained, tmp_path / "initial", runtime=runtime)  # a data-only template
    metadata = template_data(tiny_model, tmp_path / "data")
    result = train(**options(tiny_model, tmp_path / "out", metadata, str(source), num_epochs=6, learning_rate=0.1),
                   runtime=runtime)  # fmt: skip
    assert len(result.losses) == 48
    # the losses of the first epoch's samples (same noise and sigmas) before and after training
    frozen = {"num_epochs": 1, "learning_rate": 1e-12}
    before = train(**options(tiny_model, tmp_path / "before", metadata, str(source), **frozen), runtime=runtime).losses
    after = train(**options(tiny_model, tmp_path / "after", metadata, str(tmp_path / "out" / "epoch-5"), **frozen),
                  runtime=runtime).losses  # fmt: skip
    assert before[0] == pytest.approx(result.losses[0], abs=1e-6)  # the same first sample, untrained
    assert sum(after) < 0.97 * sum(before), (before, after)  # deterministic: 0.948 when written
    saved = load_file(str(tmp_path / "out" / "epoch-5.safetensors"))
    assert sorted(saved) == ["base", "direction"]  # pipe.template_model. removed
    folder = tmp_path / "out" / "epoch-5"
    assert json.loads((folder / "template.json").read_text())["template"] == "toy/kv"
    assert not (folder / "model.py").exists()

    pipe = pipeline(tiny_model, runtime)
    trained = TemplatePipeline.from_pretrained(device="cpu", model_configs=[str(folder)], runtime=runtime)
    initial = TemplatePipeline.from_pretrained(device="cpu", model_configs=[str(source)], runtime=runtime)
    after = trained(pipe, **CALL, template_inputs=[{"scale": 0.5}])
    before = initial(pipe, **CALL, template_inputs=[{"scale": 0.5}])
    assert (after - before).abs().max() > 1e-3
    # the packaging step: the untrained template plus the checkpoint equals the exported folder
    assert apply_checkpoint(untrained, tmp_path / "out" / "epoch-5.safetensors") == []
    torch.testing.assert_close(untrained.state_dict(), trained.templates[0].model.state_dict())


def test_an_installed_template_trains_by_its_registered_name(tiny_model, runtime, tmp_path):
    metadata = template_data(tiny_model, tmp_path / "data")
    result = train(**options(tiny_model, tmp_path / "out", metadata, "toy/kv", max_steps=2), runtime=runtime)
    assert result.steps == 2
    assert json.loads((tmp_path / "out" / "step-2" / "template.json").read_text())["template"] == "toy/kv"
    assert sorted(load_file(str(tmp_path / "out" / "step-2.safetensors"))) == ["base", "direction"]


def test_split_training_of_a_lora_sub_module_reproduces_one_stage_losses(tiny_model, runtime, tmp_path):
    torch.manual_seed(3)
    source = export_template(ToyLoraTemplate(LORA_TARGETS, rank=2), tmp_path / "lora-template", runtime=runtime)
    metadata = template_data(tiny_model, tmp_path / "data", key="strength")
    common = {"trainable_models": ["template_model.up"], "learning_rate": 1e-2}
    one = train(**options(tiny_model, tmp_path / "one", metadata, str(source), **common), runtime=runtime)
    train(**options(tiny_model, tmp_path / "split", metadata, str(source), **common, task="sft:data_process"),
          runtime=runtime)  # fmt: skip
    units = json.loads((tmp_path / "split" / "cache" / "units.json").read_text())["units"]
    assert "flux2_encode_prompt" in units and "flux2_input_image" in units
    assert "medium_lora_side_paths" not in units  # reads the template cache: runs in stage 2
    assert len(list((tmp_path / "split" / "cache" / "template").glob("*.safetensors"))) == 8
    two = train(**options(tiny_model, tmp_path / "split", metadata, str(source), **common, task="sft:train"),
                runtime=runtime)  # fmt: skip
    assert len(one.losses) == 16
    assert two.losses == pytest.approx(one.losses, abs=1e-6)
    a, b = (
        load_file(str(tmp_path / "one" / "epoch-1.safetensors")),
        load_file(str(tmp_path / "split" / "epoch-1.safetensors")),
    )
    assert sorted(a) == ["up.0", "up.1"]  # only the trained sub-module
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    initial = load_state_dict(source / "model.safetensors")
    assert torch.equal(initial["down.0"], load_state_dict(tmp_path / "one" / "epoch-1" / "model.safetensors")["down.0"])
    assert not torch.equal(initial["up.0"], a["up.0"])


def test_a_seed_format_template_runs_only_when_trusted_and_packages_with_the_seed_steps(tiny_model, runtime, tmp_path):
    code = tmp_path / "seed-template"
    code.mkdir()
    (code / "model.py").write_text(SEED_CODE, encoding="utf-8")
    metadata = template_data(tiny_model, tmp_path / "data", key="brightness")
    with pytest.raises(UntrustedCodeError, match="trust_code=True"):
        train(**options(tiny_model, tmp_path / "refused", metadata, str(code)), runtime=runtime)
    assert not (code / "executed.txt").exists()

    train(**options(tiny_model, tmp_path / "out", metadata, str(code), trust_code=True), runtime=runtime)
    assert (code / "executed.txt").exists()
    assert not (tmp_path / "out" / "epoch-1").exists()  # an unregistered class: the state dict only
    checkpoint = tmp_path / "out" / "epoch-1.safetensors"
    assert sorted(load_file(str(checkpoint))) == ["base", "direction"]

    # the seed's packaging steps, only imports and paths changed
    model = load_template_model(str(code), torch_dtype=torch.float32, device="cpu", trust_code=True)
    state_dict = load_state_dict(str(checkpoint), torch_dtype=torch.float32, device="cpu")
    state_dict.update(model.state_dict())
    save_file(state_dict, str(code / "model.safetensors"))
    packaged = load_template_model(str(code), torch_dtype=torch.float32, device="cpu", trust_code=True)
    assert packaged.state_dict().keys() == model.state_dict().keys()
    # the order that keeps the trained values (the seed's update keeps the untrained ones): model, then checkpoint
    state_dict = dict(model.state_dict())
    state_dict.update(load_state_dict(str(checkpoint)))
    save_file(state_dict, str(code / "model.safetensors"))
    packaged = load_template_model(str(code), torch_dtype=torch.float32, device="cpu", trust_code=True)
    torch.testing.assert_close(packaged.state_dict(), load_file(str(checkpoint)))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"template_model_id_or_path": None}, "need --template_model_id_or_path"),
        ({"batch_size": 2}, "--batch_size 1"),
        ({"extra_inputs": []}, "--extra_inputs template_inputs"),
        ({"trainable_models": ["template_model.mlp"]}, "has no sub-module 'mlp'"),
    ],
)
def test_template_arguments_that_do_not_fit_are_errors(tiny_model, runtime, tmp_path, overrides, message):
    metadata = template_data(tiny_model, tmp_path / "data")
    arguments = options(tiny_model, tmp_path / "out", metadata, "toy/kv")
    arguments.update(overrides)
    with pytest.raises(TrainConfigError, match=message):
        train(**arguments, runtime=runtime)


def test_the_frozen_base_may_be_stored_in_fp8(tiny_model, runtime, tmp_path):
    metadata = template_data(tiny_model, tmp_path / "data")
    torch.manual_seed(1)
    source = str(export_template(ToyKVTemplate(), tmp_path / "initial", runtime=runtime))
    full = train(**options(tiny_model, tmp_path / "fp32", metadata, source, max_steps=3), runtime=runtime).losses
    fp8 = train(**options(tiny_model, tmp_path / "fp8", metadata, source, max_steps=3, fp8_models=["dit"]),
                runtime=runtime).losses  # fmt: skip
    assert fp8 == pytest.approx(full, rel=0.05)
    assert fp8 != full  # the DiT's weights really were rounded to float8
    trained = load_file(str(tmp_path / "fp8" / "step-3.safetensors"))
    assert trained["base"].dtype == torch.float32
    assert not torch.equal(trained["base"], load_state_dict(source)["base"])
