"""The command line's shell, through the installed ``diffstudio`` entry point (issues 21 and 22).

Every error a user can cause is one line and a non-zero exit code; ``--debug`` shows the traceback; a closed
pipe is quiet; ``--help`` groups plugin commands under their distribution; ``plugins`` and ``models`` list
without importing torch. A small plugin module (``DIFFSTUDIO_PLUGINS``) provides a command that fails on request.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from diffstudio.builtin import catalog
from diffstudio.builtin.commands import _plugins_arguments, _plugins_run
from diffstudio.runtime import Runtime
from diffstudio.types import PluginStatus

DIFFSTUDIO = Path(sys.executable).with_name("diffstudio")

PLUGIN = textwrap.dedent('''
    import sys
    from diffstudio import hookimpl
    from diffstudio.errors import ConfigError
    from diffstudio.types import CommandSpec

    def _arguments(parser):
        parser.add_argument("what")

    def _run(args, runtime):
        if args.what == "typed":
            raise ConfigError("--what typed: this value is wrong; pass 'ok' instead")
        if args.what == "bug":
            raise RuntimeError("oops\\nsecond line")
        if args.what == "interrupt":
            raise KeyboardInterrupt
        if args.what == "missing-file":
            open("/nonexistent-h6/jobs.json")
        if args.what == "flood":
            for _ in range(20000):
                print("x" * 60)
        return 0

    @hookimpl
    def register_commands(register):
        register(CommandSpec("h6-check", "fails on request (tests)", _arguments, _run))
''')

BROKEN_ARGS_PLUGIN = textwrap.dedent('''
    from diffstudio import hookimpl
    from diffstudio.types import CommandSpec

    def _broken_arguments(parser):
        raise ValueError("cannot add my arguments")

    @hookimpl
    def register_commands(register):
        register(CommandSpec("h6-broken", "its arguments cannot be added", _broken_arguments, lambda a, r: 0))
''')


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("cli_plugin")
    (folder / "h6_cli_plugin.py").write_text(PLUGIN)
    (folder / "h6_broken_args.py").write_text(BROKEN_ARGS_PLUGIN)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DIFFSTUDIO_")}
    return {**clean, "PYTHONPATH": str(folder), "DIFFSTUDIO_PLUGINS": "h6_cli_plugin", "COLUMNS": "100"}


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(DIFFSTUDIO), *args], capture_output=True, text=True, env=env, timeout=120)


def test_typed_error_prints_one_line_without_traceback(plugin_env: dict[str, str]) -> None:
    result = _cli(plugin_env, "h6-check", "typed")
    assert result.returncode == 1
    assert result.stderr == "diffstudio: error: --what typed: this value is wrong; pass 'ok' instead\n"


def test_missing_file_prints_one_line_naming_the_file(plugin_env: dict[str, str]) -> None:
    result = _cli(plugin_env, "h6-check", "missing-file")
    assert result.returncode == 1
    assert result.stderr == "diffstudio: error: /nonexistent-h6/jobs.json: No such file or directory\n"


def test_internal_error_is_one_line_naming_the_command_and_plugin(plugin_env: dict[str, str]) -> None:
    result = _cli(plugin_env, "h6-check", "bug")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "internal error in the command 'h6-check' of plugin 'h6_cli_plugin': RuntimeError: oops" in result.stderr
    assert "--debug" in result.stderr


def test_debug_flag_shows_the_traceback(plugin_env: dict[str, str]) -> None:
    for args, extra in ((["--debug", "h6-check", "bug"], {}), (["h6-check", "bug", "--debug"], {}),
                        (["h6-check", "typed"], {"DIFFSTUDIO_DEBUG": "1"})):  # fmt: skip
        result = _cli({**plugin_env, **extra}, *args)
        assert result.returncode == 1, args
        assert "Traceback (most recent call last)" in result.stderr, args
        assert result.stderr.splitlines()[-1].startswith("diffstudio: "), args


def test_keyboard_interrupt_exits_130(plugin_env: dict[str, str]) -> None:
    result = _cli(plugin_env, "h6-check", "interrupt")
    assert result.returncode == 130
    assert result.stderr == "diffstudio: interrupted\n"


def test_plugins_json_into_a_closed_pipe_is_quiet(plugin_env: dict[str, str]) -> None:
    for args in (["plugins", "--json"], ["h6-check", "flood"]):
        pipe = subprocess.PIPE
        proc = subprocess.Popen([str(DIFFSTUDIO), *args], stdout=pipe, stderr=pipe, env=plugin_env)
        assert proc.stdout is not None
        proc.stdout.close()  # `| head` that already left: every write meets a closed pipe
        _, err = proc.communicate(timeout=120)
        assert err == b"", (args, err)
        assert proc.returncode == 141


def test_argparse_errors_print_usage_and_exit_2(plugin_env: dict[str, str]) -> None:
    result = _cli(plugin_env, "plugins", "--no-such-flag")
    assert result.returncode == 2
    assert result.stderr.startswith("usage: diffstudio") and "--no-such-flag" in result.stderr


def test_top_level_help_groups_plugin_commands_under_their_plugin(plugin_env: dict[str, str]) -> None:
    result = _cli(plugin_env, "--help")
    assert result.returncode == 0
    core, _, plugins = result.stdout.partition("plugin commands (")
    assert "plugins " in core and "models " in core and "run " in core
    assert "h6-check" not in core and "shapes-data" not in core
    assert "plugin commands (h6_cli_plugin):\n  h6-check" in result.stdout
    if "shapes-data" in result.stdout:
        assert "plugin commands (diffstudio-shapes):" in result.stdout
    invoked = _cli(plugin_env, "h6-check", "ok")  # invocation unchanged
    assert invoked.returncode == 0 and invoked.stderr == ""


def test_broken_add_arguments_disables_only_that_plugin(plugin_env: dict[str, str]) -> None:
    env = {**plugin_env, "DIFFSTUDIO_PLUGINS": "h6_cli_plugin,h6_broken_args"}
    result = _cli(env, "plugins", "--json")
    assert result.returncode == 0
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["h6_broken_args"]["status"] == "failed"
    error = rows["h6_broken_args"]["error"]
    assert "h6-broken" in error and "cannot add my arguments" in error
    assert rows["h6_cli_plugin"]["status"] == "loaded"
    assert "h6_broken_args" in result.stderr and len(result.stderr.splitlines()) == 1


def test_plugins_table_aligned_past_28_characters(capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    runtime = Runtime(env={}, load_entrypoints=False)
    long_dist = "diffstudio-a-rather-long-distribution-name"
    runtime.statuses.append(PluginStatus("long", long_dist, "10.20.30", "m", "failed", "ImportError: no"))
    parser = argparse.ArgumentParser()
    _plugins_arguments(parser)
    assert _plugins_run(parser.parse_args([]), runtime) == 0
    lines = capsys.readouterr().out.splitlines()
    column = lines[0].index("HOOKS / ERROR")
    assert lines[0].index("STATUS") == lines[1].index("BUILTIN")
    assert all(len(line) > column and line[column - 2 : column] == "  " and line[column] != " " for line in lines)
    assert f"{long_dist} 10.20.30  ImportError: no" in lines[-1]
    help_text = parser.format_help()
    assert "JSON array" in help_text and "one object per plugin" in help_text


def test_models_lists_embedded_models_and_pipelines(tmp_path: Path) -> None:
    from diffstudio import hookimpl
    from diffstudio.types import EmbeddedModel
    from diffstudio_template_sdk.testing import toy_plugin

    class Embedded:
        @hookimpl
        def register_embedded_models(self, register: Callable[[EmbeddedModel], None]) -> None:
            files = ("dit/*.safetensors",)
            register(EmbeddedModel("diffstudio/toy", tmp_path, "toy", "toy", files, defaults={"height": 32}))

    runtime = Runtime(env={}, load_entrypoints=False, plugins=[toy_plugin, Embedded()])
    (tmp_path / "hf" / "models--black-forest-labs--FLUX.2-klein-4B" / "snapshots" / "abc").mkdir(parents=True)
    (tmp_path / "hf" / "models--org--no-snapshot").mkdir(parents=True)
    (tmp_path / "ms" / "models" / "Qwen" / "Qwen3___5-0___6B").mkdir(parents=True)
    env = {"HF_HUB_CACHE": str(tmp_path / "hf"), "MODELSCOPE_CACHE": str(tmp_path / "ms")}
    data = catalog.model_rows(runtime, env)
    assert data["default_model"] is None
    [model] = data["embedded_models"]
    assert model["id"] == "diffstudio/toy" and model["pipeline"] == "toy" and model["defaults"] == {"height": 32}
    assert model["files"] == ["dit/*.safetensors"] and model["root"] == str(tmp_path)
    assert [p["name"] for p in data["pipelines"]] == ["toy"]
    cached = [(row["id"], row["cache"]) for row in data["cached"]]
    assert cached == [("Qwen/Qwen3.5-0.6B", "modelscope"), ("black-forest-labs/FLUX.2-klein-4B", "huggingface")]
    json.dumps(data)


def test_models_command_through_the_entry_point(plugin_env: dict[str, str]) -> None:
    text = _cli(plugin_env, "models")
    assert text.returncode == 0 and "Embedded models" in text.stdout and "Pipelines" in text.stdout
    data = json.loads(_cli(plugin_env, "models", "--json").stdout)
    assert set(data) == {"default_model", "embedded_models", "pipelines", "cached"}


def test_help_plugins_and_models_do_not_import_torch(plugin_env: dict[str, str]) -> None:
    script = textwrap.dedent("""
        import contextlib, io, sys
        from diffstudio.cli import main
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                main(["--help"])
            except SystemExit:
                pass
            codes = [main(["plugins"]), main(["plugins", "--json"]), main(["models"])]
        print(codes, sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=plugin_env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[0, 0, 0] []"
