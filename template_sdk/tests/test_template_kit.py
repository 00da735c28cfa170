"""The template test kit on the toy templates, the registration helper and the scaffold."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from diffstudio.errors import TemplateFormatError
from diffstudio_template_sdk.registration import import_object, package_file, template
from diffstudio_template_sdk.scaffold import ScaffoldError, new_template_package, package_names
from diffstudio_template_sdk.testing import TemplateConformance
from diffstudio_template_sdk.testing.toy_templates import (
    ToyKVTemplate,
    ToyLoraTemplate,
    ToyResidualTemplate,
    ToyScaleTemplate,
)

PLUGIN = "diffstudio_template_sdk.testing.toy_templates_plugin"


class TestToyKV(TemplateConformance):
    template_class = ToyKVTemplate
    example_inputs = [{"scale": 0.1}, {"scale": 0.9}]
    cache_keys = {"kv_cache"}
    plugin_module = PLUGIN
    registered_name = "toy/kv"


class TestToyLora(TemplateConformance):
    template_class = ToyLoraTemplate
    config = {"targets": {"double_blocks.0.img_attn.qkv": (32, 96)}, "rank": 3, "alpha": 1.5}
    example_inputs = [{"strength": 0.5}, {}]
    cache_keys = {"lora"}
    plugin_module = PLUGIN
    registered_name = "toy/lora"


class TestToyResidual(TemplateConformance):
    template_class = ToyResidualTemplate
    example_inputs = [{"scale": 1.0, "height": 32, "width": 48}]
    cache_keys = {"block_residuals"}


class TestToyScale(TemplateConformance):
    template_class = ToyScaleTemplate
    example_inputs = [{"scale": 2.0}]
    cache_keys = {"latents"}
    plugin_module = PLUGIN
    registered_name = "toy/scale"


def test_registration_helper_imports_lazily_and_reports_bad_targets() -> None:
    spec = template("x/y", "diffstudio_template_sdk.testing.toy_templates:ToyKVTemplate", "d", config={"tokens": 2})
    assert spec.factory() is ToyKVTemplate and spec.config == {"tokens": 2} and spec.weights is None
    with pytest.raises(TemplateFormatError, match="package.module:ClassName"):
        import_object("no_colon")
    with pytest.raises(TemplateFormatError, match="no attribute"):
        import_object("diffstudio_template_sdk.media:Nope")
    with pytest.raises(TemplateFormatError, match="not a file"):
        package_file("diffstudio_template_sdk:missing.safetensors")


def test_scaffold_names_and_refusals(tmp_path: Path) -> None:
    assert package_names("soft-light") == {
        "dist": "diffstudio-soft-light",
        "module": "diffstudio_soft_light",
        "class_name": "SoftLightTemplate",
        "name": "soft-light",
    }
    with pytest.raises(ScaffoldError, match="lowercase"):
        package_names("Bad Name")
    new_template_package("glow", tmp_path)
    with pytest.raises(ScaffoldError, match="already exists"):
        new_template_package("glow", tmp_path)


@pytest.mark.slow
def test_scaffolded_package_passes_its_own_conformance_tests(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "diffstudio", "template", "new", "glow", "--dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "diffstudio-glow"
    project = tomllib.loads((folder / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["diffstudio"] == {"diffstudio_glow": "diffstudio_glow.plugin"}
    assert (folder / "src" / "diffstudio_glow" / "py.typed").exists()
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(folder / "tests")],
        capture_output=True, text=True, timeout=300, cwd=folder,
        env={"PYTHONPATH": str(folder / "src"), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert tests.returncode == 0, tests.stdout[-3000:] + tests.stderr[-2000:]
    assert "7 passed" in tests.stdout
