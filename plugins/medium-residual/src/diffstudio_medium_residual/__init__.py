"""diffstudio-medium-residual: per-block residuals at the latent grid as a template medium.

A template's ``block_residuals`` cache ``{"double_i" | "single_i": (B or 1, D, h, w)}`` is added to the image
tokens after the named blocks (the DiT's ``block_residual`` extension point, ControlNet-style). Several
templates' residuals are summed; residuals made at another resolution than the image are an error.
"""
