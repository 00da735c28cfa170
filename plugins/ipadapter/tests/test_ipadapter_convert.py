"""InstantX's pickle-based ``ip-adapter.bin`` flattened to safetensors: keys, values, atomic write, file mode."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import torch
from diffstudio_ipadapter import convert_instantx_bin
from safetensors.torch import load_file


def test_convert_instantx_bin_flattens_writes_atomically_with_the_umask_mode(tmp_path: Path) -> None:
    nested = {
        "image_proj": {"proj.weight": torch.randn(4, 3), "norm.weight": torch.ones(4)},
        "ip_adapter": {"0.to_k_ip.weight": torch.randn(2, 4)},
    }
    source = tmp_path / "ip-adapter.bin"
    torch.save(nested, source)
    old_umask = os.umask(0o022)
    try:
        target = convert_instantx_bin(source, tmp_path / "ip-adapter.safetensors")
    finally:
        os.umask(old_umask)
    flat = load_file(str(target))
    assert sorted(flat) == ["image_proj.norm.weight", "image_proj.proj.weight", "ip_adapter.0.to_k_ip.weight"]
    assert torch.equal(flat["ip_adapter.0.to_k_ip.weight"], nested["ip_adapter"]["0.to_k_ip.weight"])
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ip-adapter.bin", "ip-adapter.safetensors"]
