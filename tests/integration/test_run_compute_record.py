"""``diffstudio run`` says which CPU compute path ran (dtype, native or emulated bf16, why) in the PNG record and
on the console (issue 27.1)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from diffstudio.devices import CPU_BF16_ENV, cpu_compute_path
from diffstudio.outputs import read_image_metadata

DIFFSTUDIO = str(Path(sys.executable).with_name("diffstudio"))


def test_png_record_and_console_name_the_cpu_compute_path(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIFFSTUDIO_")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    out = tmp_path / "out"
    command = [DIFFSTUDIO, "run", "a red circle", "--steps", "1", "--height", "32", "--width", "32", "--out", str(out)]
    result = subprocess.run([*command, "--device", "cpu"], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    detected = cpu_compute_path() if CPU_BF16_ENV not in os.environ else None
    (png,) = out.glob("*.png")
    _, record = read_image_metadata(png)
    assert record is not None
    compute = record["extra"]["compute"]
    assert compute["device"] == "cpu" and compute["dtype"] == record["job"]["dtype"]
    assert compute["cpu_path"] in ("native-bf16", "emulated-bf16") and compute["reason"]
    line = next(x for x in result.stderr.splitlines() if x.startswith("diffstudio: computing in"))
    assert compute["cpu_path"] in line and compute["dtype"] in line
    if detected is not None:
        assert compute["cpu_path"] == detected.path and compute["dtype"] == detected.default_dtype
