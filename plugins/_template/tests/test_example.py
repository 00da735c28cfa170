from diffstudio_template_sdk.testing import UnitConformance

from diffstudio_example.units import ExampleUnit


class TestExampleUnits(UnitConformance):
    units = (ExampleUnit,)
