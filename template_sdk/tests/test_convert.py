"""``diffstudio template export SEED_FOLDER OUT --trust-code`` converts from the folder alone (issue 22.8)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import tomllib
import torch
from diffstudio.cli import main
from diffstudio.runtime import Runtime
from diffstudio.templates import code_sha256_of, export_template, load_template
from diffstudio_template_sdk.convert import default_template_name
from safetensors.torch import save_file

SEED = '''
from pathlib import Path
import torch

Path(__file__).with_name("ran.txt").write_text("ran")


class Glow(torch.nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.width = width
        self.gain = torch.nn.Parameter(torch.zeros(width))

    @torch.no_grad()
    def process_inputs(self, strength=1.0, pipe=None, **kwargs):
        return {"strength": torch.tensor(float(strength))}

    def forward(self, strength, pipe=None, **kwargs):
        return {"latents": self.gain * strength}


class Rows:
    def __call__(self, strength, **kwargs):
        return {"strength": strength}


TEMPLATE_MODEL = Glow
TEMPLATE_MODEL_CONFIG = {"width": 8}
TEMPLATE_MODEL_PATH = "model.safetensors"
TEMPLATE_DATA_PROCESSOR = Rows
TEMPLATE_DIT_GEOMETRY = {"double_blocks": 2, "single_blocks": 4, "heads": 2, "head_dim": 64}
'''


def seed_folder(root: Path) -> Path:
    folder = root / "My_Glow"
    folder.mkdir()
    (folder / "model.py").write_text(SEED)
    save_file({"gain": torch.arange(8, dtype=torch.float32)}, str(folder / "model.safetensors"))
    return folder


def test_export_converts_a_seed_folder_whose_class_is_not_registered(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = seed_folder(tmp_path)
    digest = code_sha256_of(folder / "model.py")
    trained = tmp_path / "epoch-1.safetensors"
    save_file({"pipe.template_model.gain": torch.full((8,), 3.0)}, str(trained))
    out = tmp_path / "package"
    assert main(["template", "export", str(folder), str(out)]) == 1  # untrusted: refused, nothing written
    assert "Refusing to run" in capsys.readouterr().err and not out.exists()
    assert not (folder / "ran.txt").exists()
    argv = ["template", "export", str(folder), str(out), "--trust-code", "--code-sha256", digest,
            "--checkpoint", str(trained), "--remove-prefix", "pipe.template_model."]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["template"] == "my-glow" and result["module"] == "diffstudio_my_glow"
    assert result["code_sha256"] == digest and "pip install" in result["next"]
    package = out / "src" / "diffstudio_my_glow"
    assert (package / "model.py").read_bytes() == (folder / "model.py").read_bytes()
    project = tomllib.loads((out / "pyproject.toml").read_text())["project"]
    assert project["name"] == "diffstudio-my-glow"
    assert project["entry-points"]["diffstudio"] == {"diffstudio_my_glow": "diffstudio_my_glow.plugin"}
    assert digest in (out / "README.md").read_text()
    # the package, importable as if installed, registers the template: it loads by name, no trust needed
    monkeypatch.syspath_prepend(str(out / "src"))
    plugin = importlib.import_module("diffstudio_my_glow.plugin")
    runtime = Runtime(env={}, load_entrypoints=False, plugins=[plugin])
    loaded = load_template("my-glow", runtime=runtime)
    assert loaded.kind == "installed" and loaded.config == {"width": 8} and loaded.data_processor is not None
    assert loaded.dit_geometry == {"double_blocks": 2, "single_blocks": 4, "heads": 2, "head_dim": 64}
    torch.testing.assert_close(loaded.model.gain.detach(), torch.full((8,), 3.0))  # the checkpoint's weights
    data_only = export_template(loaded.model, tmp_path / "data-only", runtime=runtime)
    again = load_template(data_only, runtime=runtime)
    assert again.kind == "data" and again.registered_name == "my-glow"
    # a second conversion into the same, non-empty folder is refused
    assert main([*argv[:4], "--trust-code"]) == 1
    assert "not an empty folder" in capsys.readouterr().err


def test_export_names_the_package_as_asked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = seed_folder(tmp_path)
    argv = ["template", "export", str(folder), str(tmp_path / "p"), "--trust-code", "--name", "acme/soft-glow"]
    assert main(argv) == 0, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["template"] == "acme/soft-glow" and result["module"] == "diffstudio_soft_glow"
    assert main([*argv[:4], "--trust-code", "--name", "Bad Name"]) == 1
    assert "lowercase" in capsys.readouterr().err


def test_default_template_name() -> None:
    assert default_template_name(Path("My_Glow")) == "my-glow"
    assert default_template_name(Path("2024 tint!")) == "template-2024-tint"
