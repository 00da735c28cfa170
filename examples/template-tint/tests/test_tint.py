from diffstudio_template_sdk.testing import TemplateConformance
from diffstudio_tint.model import TintTemplate


class TestTint(TemplateConformance):
    template_class = TintTemplate
    example_inputs = [{"strength": 0.1}, {"strength": 0.9}, {}]
    cache_keys = {"kv_cache"}
    plugin_module = "diffstudio_tint.plugin"
    registered_name = "example/tint"


def test_tint_declares_the_embedded_models_geometry() -> None:
    from diffstudio_tint.plugin import register_templates  # noqa: F401 - importable without torch side effects

    assert TintTemplate().dit_geometry == {"double_blocks": 2, "single_blocks": 4, "heads": 2, "head_dim": 64}
    assert TintTemplate(single_blocks=20, head_dim=128).dit_geometry["single_blocks"] == 20
