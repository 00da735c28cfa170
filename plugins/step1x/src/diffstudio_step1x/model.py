"""The Step1X-Edit checkpoint: one file, the FLUX.1 DiT (BFL names, no ``guidance_in``) and ``connector.*``.

:class:`Step1XDiT` is FLUX.1's :class:`~diffstudio_flux1.model.Flux` with the connector as its ``connector``
submodule, so the module's state dict is the file's, name for name, and loads by identity (meta device, strict
assignment, memory-mapped tensors). The pipeline shows the connector in its own slot too (``connector``: the same
module, managed by the DiT's memory strategy), so the file gives two components.

Claim (names and shapes only): ``connector.S.input_embedder.weight`` and ``connector.global_proj_out.weight`` beside
a FLUX.1 BFL DiT (``double_blocks.0.img_mod.lin.weight``, ``img_in.weight``). FLUX.1's own probe refuses files with
``connector.`` keys, so no other family claims it.

Sizes no file stores come from ``ModelConfig(config=...)``: the DiT's (``axes_dims_rope``, ...) as for FLUX.1, and
``connector_num_heads`` (default ``hidden / 128``: 32 for the published 4096) and ``connector_timestep_scale``
(1 by default: the published weights with the initial release and DiffSynth; 1000 for Step1X-Edit after 2025-05).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from diffstudio.types import LoadRequest, ModelClaim
from torch import Tensor

from diffstudio_step1x.connector import ConnectorParams, Qwen2Connector

if TYPE_CHECKING:
    from diffstudio.loading import Checkpoint
    from diffstudio_flux1.params import FluxParams

__all__ = ["FAMILY", "PREFIX", "Step1XDiT", "claim", "load_step1x"]

FAMILY = "step1x"
PREFIX = "connector."
_PROBES = ("connector.S.input_embedder.weight", "connector.global_proj_out.weight", "img_in.weight",
           "double_blocks.0.img_mod.lin.weight")  # fmt: skip


def _flux_class() -> type[Any]:
    from diffstudio_flux1.model import Flux

    return Flux


class Step1XDiT(_flux_class()):  # type: ignore[misc]
    """FLUX.1's DiT with the Step1X connector attached (``self.connector``); the forward is FLUX.1's."""

    def __init__(self, params: FluxParams, connector: ConnectorParams) -> None:
        super().__init__(params)
        self.connector = Qwen2Connector(connector)

    def text_stream(self, llm: Tensor, t: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Connector outputs for one call: ``llm (B, L, 3584)``, ``t (B,)``, ``mask (B, L)`` -> ``txt``, ``y``."""
        txt, y = self.connector(llm, t, mask)
        return txt, y


def claim(checkpoint: Checkpoint) -> ModelClaim | None:
    """Claim ``step1x-edit-*.safetensors`` (DiT + connector) for the ``dit`` slot of the step1x pipeline."""
    keys = set(checkpoint.keys())
    if not all(p in keys for p in _PROBES) or "guidance_in.in_layer.weight" in keys:
        return None
    return ModelClaim(FAMILY, "step1x-dit/edit", "dit", "bfl", load_step1x)


def load_step1x(checkpoint: Checkpoint, request: LoadRequest) -> Step1XDiT:
    """Build :class:`Step1XDiT` from the combined file (config first for what the shapes cannot tell)."""
    from diffstudio.loading import build_on_meta, load_state_dict_into
    from diffstudio.loading.component_config import read_component_config
    from diffstudio_flux1.params import FluxParams

    keys = checkpoint.keys()
    config = read_component_config(checkpoint, request.config)
    values: dict[str, Any] = dict(config.values) if config is not None else {}
    shapes = {k: checkpoint.shape(k) for k in keys}
    dit_shapes = {k: v for k, v in shapes.items() if not k.startswith(PREFIX)}
    params = FluxParams.from_state_dict_shapes(dit_shapes, source=str(checkpoint.source), config=config)
    if params.guidance_embed:
        params = dataclasses.replace(params, guidance_embed=False)
    connector = Qwen2Connector.params_from_shapes(
        {k[len(PREFIX) :]: v for k, v in shapes.items() if k.startswith(PREFIX)},
        float(values.get("connector_timestep_scale", 1.0)),
    )
    if "connector_num_heads" in values:
        connector = dataclasses.replace(connector, num_heads=int(values["connector_num_heads"]))
    model = build_on_meta(lambda: Step1XDiT(params, connector))
    load_state_dict_into(model, checkpoint.state_dict(keys), dtype=request.torch_dtype, device=request.device,
                         init_non_persistent=_rope, source=str(checkpoint.source))  # fmt: skip
    return model


def _rope(module: Any) -> None:
    reset = getattr(module, "reset_non_persistent_buffers", None)
    if callable(reset):
        reset()
