"""diffstudio-medium-lora: LoRA tensors as a template medium, applied per CFG branch and never merged.

A template's ``lora`` cache (canonical ``{DeltaLinear path: LoraWeights}`` or flat ``lora_A``/``lora_B``
tensors) becomes, in the ``medium_lora_side_paths`` unit, one side path per adapted layer; the family's
``predict_velocity`` attaches them for exactly one denoiser call (``dit_deltas``), so the positive branch uses
``lora`` and the negative branch ``negative_lora`` (or none), and the base weights are never modified.
Several templates' LoRAs are concatenated along rank, which is the sum of their updates.
"""
