"""The diffstudio test kit: fixtures (see :mod:`.plugin`), conformance mixins and a toy family.

Names load lazily so the ``pytest11`` plugin costs nothing in test runs that do not use them.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["FamilyConformance", "TemplateConformance", "UnitConformance", "VramPolicyConformance"]


def __getattr__(name: str) -> Any:
    if name == "TemplateConformance":
        return importlib.import_module("diffstudio_template_sdk.testing.template_conformance").TemplateConformance
    if name in __all__:
        return getattr(importlib.import_module("diffstudio_template_sdk.testing.conformance"), name)
    raise AttributeError(f"module 'diffstudio_template_sdk.testing' has no attribute {name!r}")
