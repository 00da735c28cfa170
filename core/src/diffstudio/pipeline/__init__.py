"""Pipelines: units, state, the base pipeline and image conversion helpers."""
