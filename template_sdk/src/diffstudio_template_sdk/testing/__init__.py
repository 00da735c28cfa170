"""The diffstudio test kit: fixtures (see :mod:`.plugin`), conformance mixins and a toy family."""

from diffstudio_template_sdk.testing.conformance import FamilyConformance, UnitConformance, VramPolicyConformance

__all__ = ["FamilyConformance", "UnitConformance", "VramPolicyConformance"]
