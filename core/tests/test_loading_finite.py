"""``diffstudio.loading.nonfinite_tensors``: the helper behind the NaN/Inf checks of LoRAs (finding 21.6)."""

from __future__ import annotations

import torch
from diffstudio.loading import is_finite, nonfinite_tensors


def test_nonfinite_tensors_names_nan_and_inf_in_every_float_kind() -> None:
    tensors = {
        "nan32": torch.tensor([1.0, float("nan")]),
        "inf16": torch.tensor([float("-inf"), 0.0], dtype=torch.float16),
        "ok_bf16": torch.ones(3, dtype=torch.bfloat16),
        "inf_e5m2": torch.tensor([float("inf")]).to(torch.float8_e5m2),
        "nan_e4m3": torch.tensor([float("nan")]).to(torch.float8_e4m3fn),  # torch.isfinite has no kernel for it
        "ints": torch.tensor([1, 2]),
        "bools": torch.tensor([True]),
        "complex": torch.tensor([complex(1.0, float("nan"))]),
    }
    assert nonfinite_tensors(tensors) == ["nan32", "inf16", "inf_e5m2", "nan_e4m3", "complex"]
    assert nonfinite_tensors(tensors, ["ok_bf16", "ints"]) == []
    assert is_finite(torch.zeros(0)) and not is_finite(torch.tensor(float("nan")))
