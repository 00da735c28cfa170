from diffstudio_template_sdk.testing import TemplateConformance
from diffstudio_tint.model import TintTemplate


class TestTint(TemplateConformance):
    template_class = TintTemplate
    example_inputs = [{"strength": 0.1}, {"strength": 0.9}, {}]
    cache_keys = {"kv_cache"}
    plugin_module = "diffstudio_tint.plugin"
    registered_name = "example/tint"
