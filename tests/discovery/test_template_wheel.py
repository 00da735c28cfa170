"""A third-party template package, built as a wheel and installed into a fresh venv, is discovered and used.

``examples/template-tint`` is built with ``pip wheel`` and installed (``--no-deps --no-index``: nothing is
downloaded) into a new virtual environment. That environment sees the development environment's packages (torch,
diffstudio and its plugins) through a ``.pth`` file that adds the dev ``site-packages`` as a site directory,
which is what ``--system-site-packages`` would do if torch lived in the base interpreter. The example package
itself exists only in the new environment, so finding ``example/tint`` there proves entry-point discovery.
"""

from __future__ import annotations

import json
import os
import site
import sys
import textwrap
import venv
from pathlib import Path

import pytest
from diffstudio.testing import import_file

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


_run = import_file(Path(__file__).with_name("test_wheels.py"))._run

SCRIPT = textwrap.dedent('''
    import importlib.metadata as md, json, sys, torch
    from pathlib import Path
    from diffstudio import ModelConfig, TemplatePipeline
    from diffstudio.runtime import Runtime
    from diffstudio.run_api import load_pipeline
    from diffstudio.templates import export_template

    root = Path(sys.argv[1])
    runtime = Runtime()
    pipe, _ = load_pipeline(runtime, None, device="cpu", torch_dtype=torch.float32)  # the embedded diffstudio/shapes
    pipe.set_progress_bar_config(disable=True)
    call = dict(prompt="a red circle", seed=1, height=32, width=32, num_inference_steps=2, output_type="latent",
                max_sequence_length=16)
    templates = TemplatePipeline.from_pretrained(device="cpu", model_configs=[ModelConfig(model_id="example/tint")],
                                                 runtime=runtime)
    tinted = templates(pipe, **call, template_inputs=[{"strength": 0.8}])
    cache = templates.pipeline_inputs(pipe, [{"strength": 0.8}])
    direct = pipe(**call, **cache)
    plain = pipe(**call)
    folder = export_template(templates.templates[0].model, root / "exported", runtime=runtime)
    data_only = TemplatePipeline.from_pretrained(device="cpu", model_configs=[str(folder)], runtime=runtime)
    again = data_only(pipe, **call, template_inputs=[{"strength": 0.8}])
    print(json.dumps({
        "dist_location": str(md.distribution("diffstudio-tint").locate_file("")),
        "kind": templates.templates[0].kind,
        "same_as_direct": bool(torch.allclose(tinted, direct, atol=1e-6)),
        "changed": float((tinted - plain).abs().max()),
        "data_only_kind": data_only.templates[0].kind,
        "data_only_same": bool(torch.allclose(tinted, again, atol=1e-5)),
        "files": sorted(p.name for p in folder.iterdir()),
    }))
''')


@pytest.fixture(scope="module")
def template_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("template-wheel")
    wheels = work / "wheels"
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
                  str(ROOT / "examples" / "template-tint")])  # fmt: skip
    assert built.returncode == 0, built.stderr
    env_dir = work / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    dev_site = next(p for p in site.getsitepackages() if Path(p, "torch").is_dir())
    Path(purelib, "zz_diffstudio_dev.pth").write_text(f"import site; site.addsitedir({dev_site!r})\n")
    wheel_files = [str(w) for w in wheels.glob("*.whl")]
    install = _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", *wheel_files])
    assert install.returncode == 0, install.stderr
    return env_dir


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIFFSTUDIO_") and k != "PYTHONPATH"}
    return {**env, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def test_the_installed_wheel_is_listed_as_a_template_plugin(template_env: Path) -> None:
    result = _run([str(template_env / "bin" / "python"), "-m", "diffstudio", "plugins", "--json"], env=_clean_env())
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["tint"]["status"] == "loaded" and rows["tint"]["distribution"] == "diffstudio-tint"
    assert rows["tint"]["hooks"] == ["register_templates"]
    assert "tint" not in {r["name"] for r in json.loads(_run([sys.executable, "-m", "diffstudio", "plugins", "--json"],
                                                                env=_clean_env()).stdout)}  # fmt: skip


def test_the_installed_template_generates_and_exports_data_only(template_env: Path, tmp_path: Path) -> None:
    from diffstudio_shapes import model

    if not model.installed():
        pytest.skip(f"the embedded model's weights are absent ({model.WEIGHTS}; scripts/shapes-model.sh builds them)")
    result = _run([str(template_env / "bin" / "python"), "-c", SCRIPT, str(tmp_path)], env=_clean_env())
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert str(template_env) in report["dist_location"]
    assert report["kind"] == "installed" and report["same_as_direct"] and report["changed"] > 1e-3
    assert report["data_only_kind"] == "data" and report["data_only_same"]
    assert report["files"] == ["model.safetensors", "template.json"]



def test_the_example_package_passes_its_own_tests(template_env: Path, tmp_path: Path) -> None:
    """``examples/template-tint/tests`` (the conformance kit on the example), run where the wheel is installed.

    The inner run gets its own ``--basetemp``: a default one would prune the numbered temporary folders of the outer
    run (pytest keeps the newest three), this module's venv among them.
    """
    tests = ROOT / "examples" / "template-tint" / "tests"
    inner = [str(template_env / "bin" / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider",
             "--basetemp", str(tmp_path / "inner"), str(tests)]  # fmt: skip
    result = _run(inner, env=_clean_env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and " failed" not in result.stdout
