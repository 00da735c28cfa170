"""Each adapter plugin installs on its own from wheels into a fresh venv, pulling core only (no family).

Wheels of diffstudio-core, diffstudio-flux1 and the three adapters are built once. For every adapter a new venv
gets ``pip install --no-index --find-links <wheels> diffstudio-<adapter>``: pip resolves core from the wheel
folder by the adapter's declared dependencies, and no family comes with it (adapters import no family: they speak
core's DiT contract, ``diffstudio.dit``). Third-party packages (torch, transformers, ...) come from the
development environment through a ``.pth`` file that adds a copy of its site-packages made of symlinks with every
diffstudio distribution left out, so only the wheels provide diffstudio there. ``diffstudio plugins`` then lists
the adapter and no family; after ``pip install diffstudio-flux1`` it lists both (and not the other adapters), and
the FLUX.1 pipeline names the distribution of an absent adapter when its argument is passed.
"""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import textwrap
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ADAPTERS = {"controlnet": "controlnet_inputs", "ipadapter": "ipadapter_images", "eligen": "eligen_entity_prompts"}
pytestmark = pytest.mark.slow


def _run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kwargs)  # type: ignore[call-overload]


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("adapter-wheels")
    for source in [ROOT / "core", ROOT / "plugins" / "flux1", *(ROOT / "plugins" / n for n in ADAPTERS)]:
        built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                      str(folder), str(source)])  # fmt: skip
        assert built.returncode == 0, built.stderr
    return folder


@pytest.fixture(scope="module")
def third_party(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The dev site-packages as symlinks, without any diffstudio distribution or editable hook."""
    dev_site = Path(next(p for p in site.getsitepackages() if Path(p, "torch").is_dir()))
    folder = tmp_path_factory.mktemp("third-party-site")
    for entry in dev_site.iterdir():
        if "diffstudio" not in entry.name.lower():
            (folder / entry.name).symlink_to(entry)
    return folder


SCRIPT = textwrap.dedent("""
    import json, sys
    from diffstudio.errors import MissingPluginError
    from diffstudio_flux1 import FluxImagePipeline
    pipe = FluxImagePipeline(device="cpu")
    result = {}
    for name, argument in json.loads(sys.argv[1]).items():
        try:
            pipe.check_inputs({argument: [1]})
            result[name] = "accepted"
        except MissingPluginError as error:
            result[name] = error.distribution
    print(json.dumps(result))
""")


@pytest.mark.parametrize("adapter", sorted(ADAPTERS))
def test_the_adapter_installs_alone_and_is_listed(adapter: str, wheels: Path, third_party: Path,
                                                  tmp_path: Path) -> None:  # fmt: skip
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    Path(purelib, "zz_third_party.pth").write_text(f"import site; site.addsitedir({str(third_party)!r})\n")
    _run([str(python), "-m", "pip", "uninstall", "-q", "-y", "setuptools"])  # the dev one (torch's pin) shows through
    install = _run([str(python), "-m", "pip", "install", "-q", "--no-index", "--find-links", str(wheels),
                    f"diffstudio-{adapter}"])  # fmt: skip
    assert install.returncode == 0, install.stderr[-2000:]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DIFFSTUDIO_") and k != "PYTHONPATH"}
    listed = _run([str(env_dir / "bin" / "diffstudio"), "plugins", "--json"], env={**clean, "OMP_NUM_THREADS": "1"})
    assert listed.returncode == 0, listed.stderr
    alone = {row["name"]: row for row in json.loads(listed.stdout)}
    assert alone[adapter]["status"] == "loaded" and "flux1" not in alone and "flux2" not in alone
    family = _run([str(python), "-m", "pip", "install", "-q", "--no-index", "--find-links", str(wheels),
                   "diffstudio-flux1"])  # fmt: skip
    assert family.returncode == 0, family.stderr[-2000:]
    listed = _run([str(env_dir / "bin" / "diffstudio"), "plugins", "--json"], env={**clean, "OMP_NUM_THREADS": "1"})
    assert listed.returncode == 0, listed.stderr
    rows = {row["name"]: row for row in json.loads(listed.stdout)}
    assert rows[adapter]["status"] == "loaded" and rows[adapter]["distribution"] == f"diffstudio-{adapter}"
    assert (
        rows["flux1"]["status"] == "loaded"
        and str(env_dir)
        in _run([str(python), "-c", "import diffstudio_flux1; print(diffstudio_flux1.__file__)"], env=clean).stdout
    )
    assert not set(ADAPTERS) - {adapter} & set(rows)
    checked = _run([str(python), "-c", SCRIPT, json.dumps(ADAPTERS)], env={**clean, "OMP_NUM_THREADS": "1"})
    assert checked.returncode == 0, checked.stderr[-2000:]
    outcome = json.loads(checked.stdout.strip().splitlines()[-1])
    assert outcome == {n: "accepted" if n == adapter else f"diffstudio-{n}" for n in ADAPTERS}
