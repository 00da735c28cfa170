"""The block-residual unit and the hook object it builds."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from diffstudio.errors import CacheFormatError
from diffstudio.pipeline.base import BasePipeline
from diffstudio.pipeline.units import InputParam, OutputParam, PipelineUnit
from diffstudio_template_sdk.media import check_residuals, residual_tokens
from torch import Tensor


class ResidualHook:
    """``hook(kind, index, img) -> residual tokens or None`` for the DiT's ``block_residual`` argument.

    Args:
        tokens: ``{"double_i" | "single_i": (B or 1, h*w, D)}`` residual tokens in row-major grid order.
    """

    def __init__(self, tokens: Mapping[str, Tensor]) -> None:
        self.tokens = dict(tokens)

    def __call__(self, kind: str, index: int, img: Tensor) -> Tensor | None:
        """Return the residual ``(B, L_img, D)`` for block ``kind_index`` (in ``img``'s dtype), or None."""
        residual = self.tokens.get(f"{kind}_{index}")
        if residual is None:
            return None
        return residual.to(device=img.device, dtype=img.dtype).expand(img.shape[0], -1, -1)


class BlockResiduals(PipelineUnit):
    """Check the branch's ``block_residuals`` against the latent grid and the DiT, and build the hook."""

    name = "medium_residual_hook"
    description = "Turns block_residuals {block: (B|1, D, h, w)} into the DiT's block_residual hook, per branch."
    per_branch = True
    inputs = (
        InputParam("block_residuals", "{'double_i'|'single_i': (1|B, D, h, w)} at the latent grid", per_branch=True),
        InputParam("height", "image height", True),
        InputParam("width", "image width", True),
    )
    outputs = (OutputParam("block_residual", "hook(kind, index, img) -> (B, h*w, D) residual or None", optional=True),)

    def process(self, pipe: BasePipeline, **inputs: Any) -> Mapping[str, Any]:
        if inputs["block_residuals"] is None:
            return {}
        residuals = check_residuals(inputs["block_residuals"])
        grid_of = getattr(pipe, "latent_grid", None)
        if grid_of is None:
            raise CacheFormatError(f"{type(pipe).__name__} does not expose latent_grid(height, width); "
                                   "block residuals need the latent grid")  # fmt: skip
        h, w = grid_of(inputs["height"], inputs["width"])
        dit = pipe.dit if pipe.has("dit") else None
        names = set(getattr(dit, "block_names", ()))
        width = getattr(dit, "hidden_size", None)
        tokens: dict[str, Tensor] = {}
        for name, residual in residuals.items():
            if names and name not in names:
                raise CacheFormatError(f"block_residuals names the block {name!r}, which this DiT does not have")
            if tuple(residual.shape[2:]) != (h, w):
                raise CacheFormatError(
                    f"block_residuals[{name!r}] is at a {residual.shape[2]}x{residual.shape[3]} latent grid, but a "
                    f"{inputs['height']}x{inputs['width']} image has a {h}x{w} grid. Residuals do not resize: give "
                    f"the residual template the height and width of the image being generated."
                )
            if width is not None and residual.shape[1] != width:
                raise CacheFormatError(
                    f"block_residuals[{name!r}] has {residual.shape[1]} channels; the DiT's width is {width}"
                )
            tokens[name] = residual_tokens(residual.to(pipe.device))
        return {"block_residual": ResidualHook(tokens)}
