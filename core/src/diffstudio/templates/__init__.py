"""Diffusion Templates: template models turn template inputs into a cache of base-pipeline inputs.

* :class:`TemplatePipeline` loads templates and runs a base pipeline with their merged caches;
* :func:`load_template_model`, :func:`load_state_dict` and :func:`export_template` are the packaging steps;
* :mod:`.protocol` is what a template class must look like; :mod:`.trust` is the one rule for template code;
* :mod:`.geometry` records the DiT a template was made for and refuses another.

Importing this package imports torch lazily (only when a template is loaded or run).
"""

from __future__ import annotations

from diffstudio.templates.export import export_template
from diffstudio.templates.geometry import check_geometry, pipeline_geometry
from diffstudio.templates.loading import (
    LoadedTemplate,
    load_state_dict,
    load_template,
    load_template_data_processor,
    load_template_model,
)
from diffstudio.templates.pipeline import TemplatePipeline, pipeline_cache_keys
from diffstudio.templates.protocol import (
    RESERVED_INPUTS,
    check_template_class,
    forward_template,
    process_template_inputs,
    run_template,
)
from diffstudio.templates.trust import (
    DISABLE_ENV,
    bytecode_files,
    check_code_allowed,
    check_trust_flag,
    code_sha256_of,
    remote_code_disabled,
)

__all__ = [
    "DISABLE_ENV",
    "RESERVED_INPUTS",
    "LoadedTemplate",
    "TemplatePipeline",
    "bytecode_files",
    "check_code_allowed",
    "check_geometry",
    "check_template_class",
    "check_trust_flag",
    "code_sha256_of",
    "export_template",
    "forward_template",
    "load_state_dict",
    "load_template",
    "load_template_data_processor",
    "load_template_model",
    "pipeline_cache_keys",
    "pipeline_geometry",
    "process_template_inputs",
    "remote_code_disabled",
    "run_template",
]
