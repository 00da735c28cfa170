"""Template code trust (issue 21): the pin covers what runs, trust flags are booleans, the kill switch fails closed."""

from __future__ import annotations

import importlib.util
import logging
import py_compile
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from diffstudio import ModelConfig
from diffstudio.cli import main as cli_main
from diffstudio.errors import RemoteCodeDisabledError, TrustFlagError, UntrustedCodeError
from diffstudio.runtime import Runtime
from diffstudio.templates import (
    TemplatePipeline,
    bytecode_files,
    code_sha256_of,
    load_template,
    load_template_data_processor,
    load_template_model,
    remote_code_disabled,
)
from diffstudio_template_sdk.testing import toy_plugin, toy_templates_plugin
from safetensors.torch import save_file

MODEL_PY = '''
from pathlib import Path
import torch

Path({marker!r}).write_text({label!r})


class Offset(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.offset = torch.nn.Parameter(torch.zeros(1, 64, 48))

    @torch.no_grad()
    def process_inputs(self, scale=1.0, pipe=None, **kwargs):
        return {{"scale": torch.tensor(float(scale))}}

    def forward(self, scale, pipe=None, **kwargs):
        return {{"latents": self.offset * scale}}


TEMPLATE_MODEL = Offset
TEMPLATE_MODEL_PATH = "model.safetensors"
'''


@pytest.fixture
def runtime() -> Runtime:
    return Runtime(env={}, load_entrypoints=False, plugins=[toy_plugin, toy_templates_plugin])


def seed_folder(root: Path, label: str = "benign") -> tuple[Path, Path]:
    """A seed-format folder whose model.py writes ``label`` into a marker file when it runs."""
    folder, marker = root / "seed", root / "ran.txt"
    folder.mkdir()
    (folder / "model.py").write_text(MODEL_PY.format(marker=str(marker), label=label))
    save_file({"offset": torch.full((1, 64, 48), 0.5)}, str(folder / "model.safetensors"))
    return folder, marker


def plant_pyc(folder: Path, marker: Path) -> Path:
    """Put an unchecked-hash ``__pycache__/model.<tag>.pyc`` compiled from a malicious source beside model.py."""
    evil = folder.parent / "evil" / "model.py"
    evil.parent.mkdir()
    evil.write_text(MODEL_PY.format(marker=str(marker), label="PWNED"))
    target = Path(importlib.util.cache_from_source(str(folder / "model.py")))
    py_compile.compile(str(evil), cfile=str(target), doraise=True,
                       invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)  # fmt: skip
    return target


def test_the_planted_pyc_is_what_the_import_system_runs(tmp_path: Path) -> None:
    """The attack of test_pinned_template_ignores_pycache is real: importing model.py runs the .pyc."""
    folder, marker = seed_folder(tmp_path)
    plant_pyc(folder, marker)
    spec = importlib.util.spec_from_file_location("h1_probe_template", folder / "model.py")
    assert spec is not None and spec.loader is not None
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    assert marker.read_text() == "PWNED"


def test_pinned_template_ignores_pycache(
    tmp_path: Path, runtime: Runtime, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    folder, marker = seed_folder(tmp_path)
    digest = code_sha256_of(folder / "model.py")
    pyc = plant_pyc(folder, marker)
    before = sorted(p.name for p in pyc.parent.iterdir())
    with caplog.at_level(logging.WARNING, logger="diffstudio.templates"):
        loaded = load_template(folder, runtime=runtime, trust_code=True, code_sha256=digest)
    assert marker.read_text() == "benign"  # the reviewed source ran, not the bytecode
    assert loaded.code_sha256 == digest and loaded.kind == "code"
    assert "__pycache__" in caplog.text and "ignored" in caplog.text
    assert sorted(p.name for p in pyc.parent.iterdir()) == before  # no bytecode written either
    assert bytecode_files(folder) == [pyc.parent, pyc]
    assert cli_main(["template", "inspect", str(folder), "--no-code"]) == 0
    shown = capsys.readouterr().out
    assert f"__pycache__/{pyc.name}" in shown and "BYTECODE" in shown and digest in shown


def test_template_code_writes_no_bytecode(tmp_path: Path, runtime: Runtime) -> None:
    folder, marker = seed_folder(tmp_path)
    (folder / "h1_sibling_helper.py").write_text("VALUE = 3\n")
    source = (folder / "model.py").read_text()
    (folder / "model.py").write_text(  # a model.py that imports a file beside it
        "import sys\nsys.path.insert(0, __import__('os').path.dirname(__file__))\nimport h1_sibling_helper\n"
        "sys.path.pop(0)\n" + source
    )
    writing = sys.dont_write_bytecode
    sys.dont_write_bytecode = False  # as in a plain interpreter: imports would write bytecode
    try:
        load_template(folder, runtime=runtime, trust_code=True)
        assert sys.dont_write_bytecode is False  # restored
    finally:
        sys.dont_write_bytecode = writing
        sys.modules.pop("h1_sibling_helper", None)
    assert marker.read_text() == "benign" and bytecode_files(folder) == []


def test_a_file_changed_after_its_check_cannot_run_other_bytes(
    tmp_path: Path, runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bytes hashed are the bytes run: model.py swapped right after the check is not re-read."""
    from diffstudio.templates import loading, trust

    folder, marker = seed_folder(tmp_path)
    digest = code_sha256_of(folder / "model.py")
    checked = trust.trusted_code

    def check_then_swap(code: Path, **kwargs: Any) -> trust.TrustedCode:
        result = checked(code, **kwargs)
        code.write_text(MODEL_PY.format(marker=str(marker), label="SWAPPED"))
        return result

    monkeypatch.setattr(loading, "trusted_code", check_then_swap)
    loaded = load_template(folder, runtime=runtime, trust_code=True, code_sha256=digest)
    assert marker.read_text() == "benign" and loaded.code_sha256 == digest


@pytest.mark.parametrize("flag", ["no", "false", "0", "yes", "", 1, 0, None, [], 1.0])
def test_trust_code_must_be_a_real_boolean(tmp_path: Path, runtime: Runtime, flag: object) -> None:
    folder, marker = seed_folder(tmp_path)
    calls = [
        lambda: load_template(folder, runtime=runtime, trust_code=flag),
        lambda: load_template_model(str(folder), trust_code=flag, runtime=runtime),
        lambda: load_template_data_processor(str(folder), trust_code=flag, runtime=runtime),
        lambda: TemplatePipeline.from_pretrained(device="cpu", model_configs=[str(folder)], trust_code=flag,
                                                 runtime=runtime, lazy_loading=True),  # fmt: skip
        lambda: TemplatePipeline([ModelConfig(path=str(folder))], trust_code=flag, runtime=runtime),
        # installed templates run no folder code, but a bad flag is refused the same way
        lambda: load_template("toy/scale", runtime=runtime, trust_code=flag),
    ]
    for call in calls:
        with pytest.raises(TrustFlagError, match="trust_code=.* is not a boolean"):
            call()
    assert not marker.exists()


def test_trust_code_through_run_api_is_checked(tmp_path: Path, runtime: Runtime) -> None:
    from diffstudio import run
    from diffstudio_template_sdk.testing.toy import write_toy_checkpoint

    folder, marker = seed_folder(tmp_path)
    checkpoint = write_toy_checkpoint(tmp_path / "toy.safetensors")
    with pytest.raises(TrustFlagError):
        run("a toy", model=str(checkpoint), out=tmp_path / "out", runtime=runtime, device="cpu", progress=False,
            height=32, width=32, num_inference_steps=1, templates=[str(folder)], trust_code="no")  # fmt: skip
    assert not marker.exists()


def test_trust_flag_is_checked_even_when_nothing_is_generated(tmp_path: Path, runtime: Runtime) -> None:
    from diffstudio import run

    folder, marker = seed_folder(tmp_path)
    with pytest.raises(TrustFlagError, match="trust_code"):
        run("a toy", out=tmp_path / "out", runtime=runtime, device="cpu", progress=False, dry_run=True,
            templates=[str(folder)], trust_code="yes")  # fmt: skip
    with pytest.raises(TrustFlagError, match="code_sha256"):
        run("a toy", out=tmp_path / "out", runtime=runtime, device="cpu", progress=False, dry_run=True,
            templates=[str(folder)], trust_code=True, code_sha256=[123])  # fmt: skip
    assert not marker.exists()


@pytest.mark.parametrize("pin", [123, b"ab" * 32, ["0" * 64]])
def test_code_sha256_must_be_a_string(tmp_path: Path, runtime: Runtime, pin: object) -> None:
    folder, marker = seed_folder(tmp_path)
    with pytest.raises(TrustFlagError, match="code_sha256"):
        load_template(folder, runtime=runtime, trust_code=True, code_sha256=pin)
    assert not marker.exists()


@pytest.mark.parametrize("value", ["2", "enable", "disabled", "y", "1.0", "-1", "nope"])
def test_unrecognised_kill_switch_value_fails_closed(
    tmp_path: Path, runtime: Runtime, caplog: pytest.LogCaptureFixture, value: str
) -> None:
    folder, marker = seed_folder(tmp_path)
    env = {"DIFFSTUDIO_DISABLE_REMOTE_CODE": value}
    with caplog.at_level(logging.WARNING, logger="diffstudio.templates"):
        with pytest.raises(RemoteCodeDisabledError, match=f"DIFFSTUDIO_DISABLE_REMOTE_CODE={value}"):
            load_template(folder, runtime=runtime, trust_code=True, env=env)
    assert "fail closed" in caplog.text and repr(value) in caplog.text
    assert not marker.exists()


@pytest.mark.parametrize(
    ("value", "disabled"),
    [("1", True), ("true", True), (" YES ", True), ("On", True),
     ("0", False), ("", False), ("off", False), ("FALSE", False), (" no ", False), (None, False)],
)  # fmt: skip
def test_kill_switch_values(value: str | None, disabled: bool) -> None:
    assert remote_code_disabled({} if value is None else {"DIFFSTUDIO_DISABLE_REMOTE_CODE": value}) is disabled


def test_kill_switch_from_the_process_environment(
    tmp_path: Path, runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, marker = seed_folder(tmp_path)
    monkeypatch.setenv("DIFFSTUDIO_DISABLE_REMOTE_CODE", "2")
    with pytest.raises(RemoteCodeDisabledError):
        TemplatePipeline.from_pretrained(device="cpu", model_configs=[str(folder)], trust_code=True, runtime=runtime)
    monkeypatch.setenv("DIFFSTUDIO_DISABLE_REMOTE_CODE", "0")
    with pytest.raises(UntrustedCodeError):
        load_template(folder, runtime=runtime)
    assert not marker.exists()
    load_template(folder, runtime=runtime, trust_code=True)
    assert marker.read_text() == "benign"


def test_code_modules_are_fresh_and_not_imported_by_name(tmp_path: Path, runtime: Runtime) -> None:
    folder, marker = seed_folder(tmp_path)
    first = load_template(folder, runtime=runtime, trust_code=True).model
    second = load_template(folder, runtime=runtime, trust_code=True).model
    assert type(first) is not type(second)  # executed afresh on every load, as the seed does
    module = sys.modules[type(second).__module__]
    assert module.__file__ == str(folder / "model.py") and getattr(module, "__cached__", None) is None
