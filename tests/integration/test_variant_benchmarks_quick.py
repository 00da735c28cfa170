"""``benchmarks/flux1_variants.py --quick`` runs every section to its figures: no section reports ``*_failed``.

The sections import plugin and core code lazily, so a renamed module only shows when a section runs (a400986
moved the DiffSynth layer names into core and both LoRA sections failed until this test existed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "flux1_variants.py"


@pytest.mark.slow
@pytest.mark.skipif(not SCRIPT.is_file(), reason="needs the repository's benchmarks/ folder")
def test_every_variant_section_reports_its_figures(tmp_path: Path) -> None:
    command = [sys.executable, str(SCRIPT), "--quick", "--repeat", "1", "--out", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=SCRIPT.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    failed = [row for row in rows if str(row.get("figure", "")).endswith("_failed")]
    assert not failed, failed
    figures = {row["figure"] for row in rows}
    expected = {"flex_step_ratio", "lora_encoder_encode_s", "lora_fusion_step_ratio", "lora_side_path_step_ratio"}
    assert expected <= figures, sorted(figures)
    assert all(row["value"] > 0 for row in rows if row["figure"] in expected)
