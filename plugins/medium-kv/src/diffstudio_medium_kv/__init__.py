"""diffstudio-medium-kv: the KV-cache template medium (and extra text tokens).

Owns the template-cache keys ``kv_cache`` and ``extra_text_embedding``: several templates' values are
concatenated along tokens (:func:`diffstudio_template_sdk.media.merge_kv_caches`). Families consume
``kv_cache`` in their own units (FLUX.2: ``flux2_extensions`` -> the DiT's ``kv_extension``); this plugin adds a
unit that checks the cache against the loaded DiT (block names, heads, head dim) before denoising starts.
"""
