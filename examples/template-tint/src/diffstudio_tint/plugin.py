"""Entry module: registers ``example/tint`` through the SDK's helper (imports no torch)."""

from diffstudio_template_sdk import template, templates_hook

register_templates = templates_hook(
    template(
        "example/tint",
        "diffstudio_tint.model:TintTemplate",
        "example: tint strength in [0, 1] -> a KV cache for every DiT block",
        data_processor="diffstudio_tint.model:TintData",
        target_model="diffstudio/shapes",
        dit_geometry={"double_blocks": 2, "single_blocks": 4, "heads": 2, "head_dim": 64},
    )
)
