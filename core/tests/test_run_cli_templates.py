"""``diffstudio run`` with templates: ``--template``, ``--template-input``, ``--trust-code``, ``--code-sha256``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffstudio.cli import main
from diffstudio.templates import code_sha256_of
from diffstudio_template_sdk.testing.toy import write_toy_checkpoint
from PIL import Image
from safetensors.torch import save_file

SEED_MODEL = """
from pathlib import Path
import torch

Path(__file__).with_name("executed.txt").write_text("model.py ran")


class Offset(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.offset = torch.nn.Parameter(torch.zeros(1, 64, 48))

    @torch.no_grad()
    def process_inputs(self, scale=1.0, **kwargs):
        return {"scale": torch.tensor(float(scale))}

    def forward(self, scale, **kwargs):
        return {"latents": self.offset * scale}


TEMPLATE_MODEL = Offset
TEMPLATE_MODEL_PATH = "model.safetensors"
"""


@pytest.fixture
def toy_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Environment with the toy family and toy templates; the common ``diffstudio run`` arguments."""
    for name in ("DIFFSTUDIO_LOAD_PLUGINS", "DIFFSTUDIO_DISABLED_PLUGINS", "DIFFSTUDIO_DISABLE_REMOTE_CODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(
        "DIFFSTUDIO_PLUGINS",
        "diffstudio_template_sdk.testing.toy_plugin,diffstudio_template_sdk.testing.toy_templates_plugin",
    )
    checkpoint = write_toy_checkpoint(tmp_path / "toy.safetensors")
    return ["run", "a toy", "--model", str(checkpoint), "--steps", "2", "--height", "32", "--width", "32",
            "--device", "cpu", "--seed", "0", "--format", "json"]  # fmt: skip


def _image(capsys: pytest.CaptureFixture[str]) -> tuple[np.ndarray, str]:
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(rows) == 1, rows
    with Image.open(rows[0]["path"]) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float32), json.dumps(image.info.get("diffstudio", ""))


def test_template_flags_apply_installed_templates(toy_cli, tmp_path, capsys):
    assert main([*toy_cli, "--out", str(tmp_path / "plain")]) == 0
    plain, _ = _image(capsys)
    arguments = [*toy_cli, "--template", "toy/scale", "--template-input", '{"scale": 3.0}']
    assert main([*arguments, "--out", str(tmp_path / "three")]) == 0
    three, record = _image(capsys)
    assert "toy/scale" in record and np.abs(three - plain).max() > 0
    assert main([*toy_cli, "--template", "toy/scale", "--template-input", '[{"scale": -1.0}]',
                 "--out", str(tmp_path / "minus")]) == 0  # fmt: skip
    minus, _ = _image(capsys)
    assert np.abs(minus - three).max() > 0
    assert main([*toy_cli, "--template-input", '{"scale": 3.0}', "--out", str(tmp_path / "none")]) == 1
    assert "no templates are loaded" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*toy_cli, "--template", "toy/scale", "--template-input", "scale=3"])
    assert "not JSON" in capsys.readouterr().err


def test_seed_format_templates_need_trust_code_and_honour_the_pin(toy_cli, tmp_path, capsys):
    folder = tmp_path / "seed-template"
    folder.mkdir()
    (folder / "model.py").write_text(SEED_MODEL, encoding="utf-8")
    save_file({"offset": torch.full((1, 64, 48), 0.5)}, str(folder / "model.safetensors"))
    arguments = [*toy_cli, "--template", str(folder), "--template-input", '{"scale": 2.0}']
    assert main([*arguments, "--out", str(tmp_path / "refused")]) == 1
    assert "--trust-code" in capsys.readouterr().err and not (folder / "executed.txt").exists()
    assert main([*arguments, "--trust-code", "--code-sha256", "0" * 64, "--out", str(tmp_path / "pinned")]) == 1
    assert "the code changed" in capsys.readouterr().err and not (folder / "executed.txt").exists()
    digest = code_sha256_of(folder / "model.py")
    assert main([*arguments, "--trust-code", "--code-sha256", digest, "--out", str(tmp_path / "ran")]) == 0
    _, record = _image(capsys)
    assert (folder / "executed.txt").exists() and "seed-template" in record
