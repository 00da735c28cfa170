"""Templates record the DiT geometry they were made for (issue 22.7); the example template fits the embedded model.

The end-to-end tests run the embedded ``diffstudio/shapes`` model (FLUX.2 DiT, 2 double + 4 single blocks, 2 heads
of 64) at 32 x 32 for one step, and are skipped when its plugin or weights are absent.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from diffstudio.errors import TemplateFormatError, TemplateGeometryError
from diffstudio.runtime import Runtime
from diffstudio.templates import TemplatePipeline, export_template, load_template, pipeline_geometry
from diffstudio.templates.geometry import normalise_geometry

ROOT = Path(__file__).resolve().parents[2]
SHAPES = {"double_blocks": 2, "single_blocks": 4, "heads": 2, "head_dim": 64}
OLD_TINT = {"double_blocks": 2, "single_blocks": 2, "heads": 2, "head_dim": 16}  # the example's former defaults
CALL = {"prompt": "a red circle on a blue background", "seed": 0, "height": 32, "width": 32,
        "num_inference_steps": 1, "output_type": "latent"}  # fmt: skip


def _shapes_missing() -> str | None:
    try:
        from diffstudio_shapes import model
    except ImportError:
        return "diffstudio-shapes is not installed"
    return None if model.installed() else f"the embedded model's weights are absent ({model.WEIGHTS})"


@pytest.fixture(scope="module")
def tint() -> ModuleType:
    """The example package's entry module, importable from the source tree (it is not installed here)."""
    source = str(ROOT / "examples" / "template-tint" / "src")
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(source)
        module = importlib.import_module("diffstudio_tint.plugin")
        importlib.import_module("diffstudio_tint.model")
    return module


@pytest.fixture(scope="module")
def shapes(tint: ModuleType) -> tuple[Runtime, Any]:
    """A runtime with every installed plugin plus the example, and the embedded model's pipeline on the CPU."""
    missing = _shapes_missing()
    if missing:
        pytest.skip(missing)
    from diffstudio.run_api import load_pipeline

    runtime = Runtime(env={}, plugins=[tint])
    pipe, _ = load_pipeline(runtime, None, device="cpu", torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return runtime, pipe


def test_embedded_model_geometry_is_read_from_the_pipeline(shapes: tuple[Runtime, Any]) -> None:
    _, pipe = shapes
    assert pipeline_geometry(pipe) == SHAPES
    assert pipeline_geometry(None) is None and pipeline_geometry(object()) is None


def test_example_tint_runs_on_the_embedded_model(shapes: tuple[Runtime, Any]) -> None:
    runtime, pipe = shapes
    templates = TemplatePipeline.from_pretrained(device="cpu", model_configs=["example/tint"], runtime=runtime)
    assert templates.templates[0].dit_geometry == SHAPES
    tinted = templates(pipe, **CALL, template_inputs=[{"strength": 0.8}])
    plain = pipe(**CALL)
    assert float((tinted - plain).abs().max()) > 1e-3


def test_template_made_for_another_dit_is_refused_naming_both_geometries(
    shapes: tuple[Runtime, Any], tmp_path: Path
) -> None:
    from diffstudio_tint.model import TintTemplate

    runtime, pipe = shapes
    old = TintTemplate(single_blocks=2, head_dim=16)  # what `example/tint` used to build
    folder = export_template(old, tmp_path / "old-tint", runtime=runtime)
    record = json.loads((folder / "template.json").read_text())
    assert record["dit_geometry"] == OLD_TINT and record["target_model"] == "diffstudio/shapes"
    templates = TemplatePipeline.from_pretrained(device="cpu", model_configs=[str(folder)], runtime=runtime)
    with pytest.raises(TemplateGeometryError) as info:
        templates(pipe, **CALL, template_inputs=[{"strength": 0.8}])
    message = str(info.value)
    assert "2 double + 2 single blocks, 2 heads x 16" in message
    assert "2 double + 4 single blocks, 2 heads x 64" in message
    assert "old-tint" in message


def test_example_tint_readme_command_runs_on_the_embedded_default(
    shapes: tuple[Runtime, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from diffstudio.cli import main

    monkeypatch.syspath_prepend(str(ROOT / "examples" / "template-tint" / "src"))
    monkeypatch.setenv("DIFFSTUDIO_PLUGINS", "diffstudio_tint.plugin")
    for name in ("DIFFSTUDIO_LOAD_PLUGINS", "DIFFSTUDIO_DISABLED_PLUGINS"):
        monkeypatch.delenv(name, raising=False)
    argv = ["run", "a red circle on a blue background", "--template", "example/tint", "--template-input",
            '{"strength": 0.8}', "--steps", "1", "--height", "32", "--width", "32", "--device", "cpu",
            "--out", str(tmp_path), "--format", "json"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(rows) == 1 and Path(rows[0]["path"]).is_file()


def test_recorded_geometry_is_validated_and_must_agree_with_the_class(tmp_path: Path, tint: ModuleType) -> None:
    from diffstudio_tint.model import TintTemplate

    runtime = Runtime(env={}, load_entrypoints=False, plugins=[tint])
    folder = export_template(TintTemplate(), tmp_path / "tint", runtime=runtime)
    assert load_template(folder, runtime=runtime).dit_geometry == SHAPES
    path = folder / "template.json"
    record = json.loads(path.read_text())
    cases = [({**SHAPES, "heads": "2"}, "integer"), ({"heads": 2}, "exactly the keys"),
             ([2, 4, 2, 64], "must be an object"), ({**SHAPES, "heads": 0}, ">= 1"),
             ({**SHAPES, "heads": True}, "integer"), (OLD_TINT, "declares 2 double \\+ 4 single")]  # fmt: skip
    for bad, match in cases:
        path.write_text(json.dumps({**record, "dit_geometry": bad}))
        with pytest.raises(TemplateFormatError, match=match):
            load_template(folder, runtime=runtime)
    with pytest.raises(TemplateFormatError, match="declares"):
        export_template(TintTemplate(), tmp_path / "wrong", runtime=runtime, dit_geometry=OLD_TINT)
    assert normalise_geometry(None, "x") is None


def test_registered_geometry_is_refused_when_malformed() -> None:
    from diffstudio_template_sdk.registration import template

    with pytest.raises(TemplateFormatError, match="dit_geometry"):
        template("x/y", "m:C", "d", dit_geometry={"double_blocks": 2})
