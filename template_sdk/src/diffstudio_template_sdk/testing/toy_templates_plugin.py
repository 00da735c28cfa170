"""Registers the toy templates (``toy/scale``, ``toy/kv``, ``toy/lora``, ``toy/residual``); no torch at import."""

from __future__ import annotations

from diffstudio_template_sdk.registration import template, templates_hook

_MODULE = "diffstudio_template_sdk.testing.toy_templates"

register_templates = templates_hook(
    template("toy/scale", f"{_MODULE}:ToyScaleTemplate", "toy: scale -> any tensor input", base_pipeline="toy"),
    template("toy/kv", f"{_MODULE}:ToyKVTemplate", "toy: scale -> KV cache"),
    template("toy/lora", f"{_MODULE}:ToyLoraTemplate", "toy: strength -> LoRA tensors"),
    template("toy/residual", f"{_MODULE}:ToyResidualTemplate", "toy: scale -> block residuals"),
)
