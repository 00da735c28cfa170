from __future__ import annotations

import csv
import json
from pathlib import Path

import diffstudio_shapes.plugin as plugin
import pytest
from diffstudio.cli import build_parser
from diffstudio.errors import ConfigError
from diffstudio.runtime import Runtime


@pytest.fixture
def runtime() -> Runtime:
    rt = Runtime(env={}, load_entrypoints=False)
    rt.register(plugin, name="shapes")
    return rt


def _run(runtime: Runtime, argv: list[str]) -> int:
    args = build_parser(runtime).parse_args(argv)
    return runtime.hooks.commands().get(args._command).run(args, runtime)


def test_commands_are_registered(runtime: Runtime) -> None:
    names = set(runtime.hooks.commands().names())
    assert {"shapes-data", "shapes-score", "run", "plugins"} <= names
    assert runtime.hooks.commands().owner("shapes-data") == "shapes"


def test_shapes_data_and_score_commands(runtime: Runtime, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "heldout"
    argv = ["shapes-data", str(out), "--count", "6", "--size", "32", "--seed", "2", "--split", "heldout"]
    assert _run(runtime, [*argv, "--shapes", "circle,zigzag", "--format", "json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["count"], summary["written"], summary["skipped"]) == (6, 6, 0)
    with open(out / "metadata.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 6 and all(("circle" in r["prompt"]) != ("zigzag" in r["prompt"]) for r in rows)
    assert _run(runtime, [*argv, "--shapes", "circle,zigzag"]) == 0
    assert "0 drawn, 6 already there" in capsys.readouterr().out
    assert _run(runtime, ["shapes-score", str(out), "--format", "json", "--out", str(tmp_path / "s.json")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["count"] == 6 and result["accuracy"]["colour"] == 1.0
    assert json.loads((tmp_path / "s.json").read_text())["count"] == 6
    with pytest.raises(ConfigError, match="Unknown shape"):
        _run(runtime, ["shapes-data", str(tmp_path / "bad"), "--shapes", "circle,hexagon"])
    with pytest.raises(ConfigError, match="metadata.csv"):
        _run(runtime, ["shapes-score", str(tmp_path / "missing")])


def test_cli_main_runs_the_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Through the installed entry point, as `diffstudio shapes-data ...` does.
    from diffstudio.cli import main

    monkeypatch.setenv("DIFFSTUDIO_LOAD_PLUGINS", "shapes")
    assert main(["shapes-data", str(tmp_path / "d"), "--count", "2", "--size", "16"]) == 0
    assert sorted(p.name for p in (tmp_path / "d" / "images").iterdir()) == ["00000.png", "00001.png"]


def test_eval_model_folder_expands_to_its_files_and_a_bare_folder_is_refused(tmp_path: Path) -> None:
    from diffstudio_shapes.commands import model_arguments
    from diffstudio_shapes.model import model_files

    folder = tmp_path / "weights"
    layout = ("flux2-shapes.safetensors", "ae.safetensors", "text_encoder/model.safetensors",
              "tokenizer/tokenizer.json")  # fmt: skip
    for name in layout:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"")
    assert model_arguments([str(folder)]) == model_files(folder)
    assert model_arguments(["dit.safetensors", "ae.safetensors"]) == ["dit.safetensors", "ae.safetensors"]
    assert model_arguments(None) is None
    (folder / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(ConfigError, match=r"without the shapes model's layout .*one --model each"):
        model_arguments([str(folder)])
