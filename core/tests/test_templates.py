"""TemplatePipeline and the three ways to get a template, on the toy family (no real model needed)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from diffstudio import ModelConfig
from diffstudio.cli import main as cli_main
from diffstudio.errors import (
    CacheMergeError,
    CodeHashMismatchError,
    RemoteCodeDisabledError,
    TemplateCacheKeyError,
    TemplateError,
    TemplateFormatError,
    TemplateInputError,
    UntrustedCodeError,
)
from diffstudio.runtime import Runtime
from diffstudio.templates import (
    TemplatePipeline,
    check_template_class,
    code_sha256_of,
    export_template,
    load_state_dict,
    load_template,
    load_template_model,
    pipeline_cache_keys,
)
from diffstudio.templates.export import apply_checkpoint
from diffstudio_template_sdk.testing import toy_plugin, toy_templates_plugin
from diffstudio_template_sdk.testing.toy import ToyPipeline, write_toy_checkpoint
from diffstudio_template_sdk.testing.toy_templates import ToyScaleTemplate
from safetensors.torch import save_file
from torch import nn

SEED_MODEL = '''
from pathlib import Path
import torch

Path({marker!r}).write_text("model.py was executed")


class Offset(torch.nn.Module):
    def __init__(self, tokens=64, channels=48):
        super().__init__()
        self.offset = torch.nn.Parameter(torch.full((1, tokens, channels), 0.25))

    @torch.no_grad()
    def process_inputs(self, scale, pipe=None, **kwargs):
        return {{"scale": torch.tensor(float(scale))}}

    def forward(self, scale, pipe=None, **kwargs):
        return {{"latents": self.offset * scale}}


class Data:
    def __call__(self, scale, **kwargs):
        return {{"scale": scale}}


TEMPLATE_MODEL = Offset
TEMPLATE_MODEL_PATH = "model.safetensors"
TEMPLATE_DATA_PROCESSOR = Data
'''


@pytest.fixture
def runtime() -> Runtime:
    return Runtime(env={}, load_entrypoints=False, plugins=[toy_plugin, toy_templates_plugin])


@pytest.fixture
def pipe(runtime: Runtime, tmp_path: Path) -> ToyPipeline:
    checkpoint = write_toy_checkpoint(tmp_path / "toy.safetensors")
    loaded = ToyPipeline.from_pretrained(torch.float32, "cpu", [ModelConfig(path=str(checkpoint))], runtime=runtime)
    assert isinstance(loaded, ToyPipeline)
    loaded.set_progress_bar_config(disable=True)
    return loaded


def seed_folder(root: Path) -> tuple[Path, Path]:
    """A seed-format template folder whose model.py writes a marker file when executed."""
    folder, marker = root / "seed-template", root / "executed.txt"
    folder.mkdir(parents=True)
    (folder / "model.py").write_text(SEED_MODEL.format(marker=str(marker)))
    save_file({"offset": torch.full((1, 64, 48), 0.5)}, str(folder / "model.safetensors"))
    return folder, marker


def run(pipe: ToyPipeline, **kwargs: Any) -> torch.Tensor:
    out: torch.Tensor = pipe("a toy", seed=1, height=32, width=32, num_inference_steps=2, output_type="pt", **kwargs)
    return out


# -- trust ---------------------------------------------------------------------------------------------------


def test_untrusted_seed_folder_is_refused_and_nothing_is_executed(tmp_path: Path, runtime: Runtime) -> None:
    folder, marker = seed_folder(tmp_path)
    with pytest.raises(UntrustedCodeError) as info:
        load_template(folder, runtime=runtime)
    message = str(info.value)
    assert str(folder / "model.py") in message and "trust_code=True" in message and "--trust-code" in message
    assert f"diffstudio template inspect {folder}" in message and code_sha256_of(folder / "model.py") in message
    with pytest.raises(UntrustedCodeError):
        TemplatePipeline.from_pretrained(device="cpu", model_configs=[ModelConfig(path=str(folder))], runtime=runtime)
    assert not marker.exists()


def test_kill_switch_refuses_code_even_when_trusted(
    tmp_path: Path, runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, marker = seed_folder(tmp_path)
    with pytest.raises(RemoteCodeDisabledError, match="DIFFSTUDIO_DISABLE_REMOTE_CODE=1"):
        load_template(folder, runtime=runtime, trust_code=True, env={"DIFFSTUDIO_DISABLE_REMOTE_CODE": "1"})
    monkeypatch.setenv("DIFFSTUDIO_DISABLE_REMOTE_CODE", "1")
    with pytest.raises(RemoteCodeDisabledError):
        TemplatePipeline.from_pretrained(device="cpu", model_configs=[str(folder)], trust_code=True, runtime=runtime)
    assert not marker.exists()


def test_trusted_seed_folder_loads_logs_its_hash_and_honours_the_pin(
    tmp_path: Path, runtime: Runtime, pipe: ToyPipeline, caplog: pytest.LogCaptureFixture
) -> None:
    folder, marker = seed_folder(tmp_path)
    digest = code_sha256_of(folder / "model.py")
    with pytest.raises(CodeHashMismatchError, match="changed"):
        load_template(folder, runtime=runtime, trust_code=True, code_sha256="0" * 64)
    assert not marker.exists()
    with caplog.at_level(logging.WARNING, logger="diffstudio.templates"):
        templates = TemplatePipeline.from_pretrained(
            device="cpu", model_configs=[str(folder)], trust_code=True, code_sha256=digest, runtime=runtime
        )
    assert marker.exists() and digest in caplog.text
    loaded = templates.templates[0]
    assert loaded.kind == "code" and loaded.code_sha256 == digest and loaded.data_processor is not None
    torch.testing.assert_close(loaded.model.offset, torch.full((1, 64, 48), 0.5))  # weights, not the init
    out = templates(pipe, prompt="a toy", seed=1, height=32, width=32, num_inference_steps=2, output_type="pt",
                    template_inputs=[{"scale": 2.0}])  # fmt: skip
    torch.testing.assert_close(out, run(pipe, latents=torch.ones(1, 64, 48)))


def test_data_only_template_loads_without_running_code(tmp_path: Path, runtime: Runtime) -> None:
    torch.manual_seed(3)
    model = ToyScaleTemplate(tokens=64)
    folder = export_template(model, tmp_path / "data", runtime=runtime)
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors", "template.json"]
    loaded = load_template(folder, runtime=runtime)
    assert loaded.kind == "data" and loaded.registered_name == "toy/scale"
    torch.testing.assert_close(loaded.model.direction, model.direction, rtol=0, atol=0)
    # a model.py next to template.json is ignored, never executed
    marker = tmp_path / "executed.txt"
    (folder / "model.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    assert load_template(folder, runtime=runtime).kind == "data" and not marker.exists()


def test_data_only_template_naming_an_uninstalled_class_says_what_to_install(tmp_path: Path) -> None:
    bare = Runtime(env={}, load_entrypoints=False)
    registered = Runtime(env={}, load_entrypoints=False, plugins=[toy_templates_plugin])
    folder = export_template(ToyScaleTemplate(), tmp_path / "data", runtime=registered)
    with pytest.raises(TemplateError, match="'toy/scale', which no installed package registers"):
        load_template(folder, runtime=bare)


def test_a_folder_that_is_no_template_is_explained(tmp_path: Path, runtime: Runtime) -> None:
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(TemplateFormatError, match="neither template.json"):
        load_template(tmp_path, runtime=runtime)


# -- pipeline ------------------------------------------------------------------------------------------------


def test_installed_template_by_name_feeds_the_base_pipeline(runtime: Runtime, pipe: ToyPipeline) -> None:
    torch.manual_seed(0)
    templates = TemplatePipeline.from_pretrained(device="cpu", model_configs=[ModelConfig(model_id="toy/scale")],
                                                 runtime=runtime)  # fmt: skip
    model = templates.templates[0].model
    assert templates.templates[0].kind == "installed"
    out = templates(pipe, prompt="a toy", seed=1, height=32, width=32, num_inference_steps=2, output_type="pt",
                    template_inputs=[{"scale": 0.5}])  # fmt: skip
    with torch.no_grad():
        expected = run(pipe, latents=model.base + 0.5 * model.direction)
    torch.testing.assert_close(out, expected)
    assert templates.last_templates == [("toy/scale", {"scale": 0.5})]


def test_model_id_routes_inputs_and_unknown_ids_are_errors(tmp_path: Path, runtime: Runtime) -> None:
    folder = export_template(ToyScaleTemplate(key="seed"), tmp_path / "seed-as-template", runtime=runtime)
    templates = TemplatePipeline.from_pretrained(device="cpu", model_configs=["toy/scale", str(folder)],
                                                 runtime=runtime, lazy_loading=True)  # fmt: skip
    assert templates.route({}) == 0 and templates.route({"model_id": 1}) == 1
    assert templates.route({"model_id": "toy/scale"}) == 0 and templates.route({"model_id": str(folder)}) == 1
    with pytest.raises(TemplateInputError, match="indices 0..1"):
        templates.route({"model_id": 2})
    with pytest.raises(TemplateInputError, match="names no loaded template"):
        templates.route({"model_id": "other"})
    caches = templates.template_caches(None, [{"scale": 1.0}, {"model_id": 1, "scale": 1.0}])
    assert [name for name, _ in caches] == ["toy/scale", "seed-as-template"]
    assert list(caches[1][1]) == ["seed"]


def test_a_cache_key_the_pipeline_does_not_declare_is_rejected(runtime: Runtime, pipe: ToyPipeline) -> None:
    templates = TemplatePipeline([load_template("toy/scale", runtime=runtime)], runtime=runtime)
    templates.templates[0].model.key = "kv_cache"  # the toy pipeline has no KV-cache input
    with pytest.raises(TemplateCacheKeyError) as info:
        templates(pipe, prompt="x", template_inputs=[{"scale": 1.0}])
    message = str(info.value)
    assert "'toy/scale'" in message and "'kv_cache'" in message and "latents" in message and "seed" in message
    templates.templates[0].model.key = "latents"  # latents has no negative (per-branch) form
    with pytest.raises(TemplateCacheKeyError, match="negative cache key .latents.") as negative:
        templates.pipeline_inputs(pipe, negative_template_inputs=[{"scale": 1.0}])
    assert "accepted negative keys: prompt" in str(negative.value)
    positive, negative_of = pipeline_cache_keys(pipe)
    assert "latents" in positive and negative_of["prompt"] == "negative_prompt"


def test_conflicting_values_for_a_key_no_medium_owns_are_rejected(runtime: Runtime, pipe: ToyPipeline) -> None:
    templates = TemplatePipeline.from_pretrained(device="cpu", model_configs=["toy/scale"], runtime=runtime)
    same = templates.pipeline_inputs(pipe, [{"scale": 1.0}, {"scale": 1.0}])
    assert same["latents"].shape == (1, 64, 48)
    with pytest.raises(CacheMergeError, match=r"'latents' from the templates \['toy/scale', 'toy/scale'\]"):
        templates.pipeline_inputs(pipe, [{"scale": 1.0}, {"scale": 2.0}])
    with pytest.raises(TemplateError, match="also passed explicitly"):
        templates(pipe, prompt="x", latents=torch.zeros(1, 64, 48), template_inputs=[{"scale": 1.0}])


def test_template_inputs_are_checked_against_the_template(runtime: Runtime) -> None:
    templates = TemplatePipeline.from_pretrained(device="cpu", model_configs=["toy/scale"], runtime=runtime)
    with pytest.raises(TemplateInputError, match=r"does not accept the input\(s\) \['brightness'\]"):
        templates.template_caches(None, [{"scale": 1.0, "brightness": 2}])
    with pytest.raises(TemplateInputError, match=r"needs the input\(s\) \['scale'\]"):
        templates.template_caches(None, [{}])
    with pytest.raises(TemplateInputError, match="reserved"):
        templates.template_caches(None, [{"scale": 1.0, "pipe": None}])
    with pytest.raises(TemplateInputError, match="one dict per template"):
        templates.template_caches(None, [0.5])  # type: ignore[list-item]


class NoKwargs(nn.Module):
    def process_inputs(self, scale: float) -> dict[str, Any]:
        return {}

    def forward(self, **kwargs: Any) -> dict[str, Any]:
        return {}


class ReservedName(nn.Module):
    def process_inputs(self, model_id: int, **kwargs: Any) -> dict[str, Any]:
        return {}

    def forward(self, **kwargs: Any) -> dict[str, Any]:
        return {}


def test_protocol_violations_are_explained() -> None:
    with pytest.raises(TemplateFormatError, match=r"must accept \*\*kwargs"):
        check_template_class(NoKwargs)
    with pytest.raises(TemplateFormatError, match="'model_id', which is reserved"):
        check_template_class(ReservedName)
    with pytest.raises(TemplateFormatError, match="subclass torch.nn.Module"):
        check_template_class(dict)


# -- packaging -----------------------------------------------------------------------------------------------


def test_seed_packaging_steps_and_trained_checkpoint(tmp_path: Path, runtime: Runtime) -> None:
    folder, _ = seed_folder(tmp_path)
    model = load_template_model(str(folder), torch_dtype=torch.float32, device="cpu", trust_code=True, runtime=runtime)
    trained = tmp_path / "epoch-1.safetensors"
    save_file({"pipe.template_model.offset": torch.full((1, 64, 48), 3.0)}, str(trained))
    state = load_state_dict(trained, torch_dtype=torch.bfloat16)
    assert state["pipe.template_model.offset"].dtype == torch.bfloat16
    assert apply_checkpoint(model, trained, remove_prefix="pipe.template_model.") == []
    torch.testing.assert_close(model.offset, torch.full((1, 64, 48), 3.0))
    with pytest.raises(TemplateFormatError, match="remove-prefix"):
        apply_checkpoint(model, trained)
    with pytest.raises(TemplateFormatError, match="safetensors only"):
        load_state_dict(tmp_path / "model.bin")
    with pytest.raises(TemplateError, match="not a registered template class"):
        export_template(model, tmp_path / "out", runtime=runtime)


def test_cli_inspect_shows_code_without_running_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder, marker = seed_folder(tmp_path)
    assert cli_main(["template", "inspect", str(folder)]) == 0
    shown = capsys.readouterr().out
    assert code_sha256_of(folder / "model.py") in shown and "TEMPLATE_MODEL = Offset" in shown
    assert cli_main(["template", "export", str(folder), str(tmp_path / "out")]) == 1
    assert "Refusing to run" in capsys.readouterr().err and not marker.exists()


def test_run_api_applies_templates_and_records_them(tmp_path: Path, runtime: Runtime) -> None:
    import json

    import numpy as np
    from diffstudio import run
    from diffstudio.errors import PipelineInputError
    from PIL import Image

    checkpoint = write_toy_checkpoint(tmp_path / "toy.safetensors")
    common = {"model": str(checkpoint), "runtime": runtime, "device": "cpu", "progress": False, "height": 32,
              "width": 32, "num_inference_steps": 2}  # fmt: skip
    plain = run("a toy", out=tmp_path / "plain", **common)
    jobs = [{"prompt": "a toy", "seed": 0}, {"prompt": "a toy", "seed": 0, "template_inputs": [{"scale": 3.0}]}]
    templated = run(jobs=jobs, out=tmp_path / "t", templates=["toy/scale"], template_inputs=[{"scale": -1.0}], **common)
    pixels = [torch.from_numpy(np.asarray(Image.open(r["path"]).convert("L"), dtype=np.float32))
              for r in (*plain, *templated)]  # fmt: skip
    assert (pixels[0] - pixels[1]).abs().max() > 0 and (pixels[1] - pixels[2]).abs().max() > 0
    assert "toy/scale" in json.dumps(Image.open(templated[1]["path"]).info.get("diffstudio", ""))
    with pytest.raises(PipelineInputError, match="no templates are loaded"):
        run(jobs=jobs[1:], out=tmp_path / "none", **common)
