"""LoRAFusion (DiffSynth-Studio/LoRAFusion-preview-FLUX.1-dev): a learned gate over separate LoRA outputs per Linear.

For a DiT Linear with base output ``o = W x + b`` and LoRA side-path outputs ``l_i`` (each already multiplied by
its LoRA's scale and ``alpha / rank``), the layer's merger returns::

    g_i = sigmoid(LN_b(o) * w_base + LN_l(l_i) * w_lora + LN_b(o) * LN_l(l_i) * w_cross + bias)
    out = o + sum_i w_out * g_i * l_i

``LN_b`` / ``LN_l`` are affine LayerNorms over the output features (eps 1e-5); every vector is ``(d_out,)``.
:class:`FluxLoraFusion` holds one :class:`LoraMerger` per layer (``model_dict.<DiffSynth name>``, the file's keys)
and installs them as the combiners of the DiT's ``DeltaLinear`` layers (:meth:`FluxLoraFusion.enable`); a layer
with no side path keeps returning ``o``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from diffstudio.dit.diffsynth_names import bfl_path, diffsynth_key
from diffstudio.errors import PipelineInputError
from diffstudio.lora import LoraError, LoraState
from diffstudio.nn import DeltaLinear, delta_linears
from torch import Tensor, nn

#: Token rows per block of the inference gate: a block's ``(rows, d_out)`` tensors stay in the CPU cache across
#: its passes. Medium FLUX.1 Linears (1536 tokens), gate over the plain sum of 2 LoRAs, one layer: 1.64 -> 1.31
#: (d_out 3072), 1.40 -> 1.10 (7168), 1.71 -> 1.26 (1024) with 128 rows; 32 to 256 rows measured alike.
GATE_ROWS = 128


class LoraFusionMismatchError(LoraError):
    """The LoRA merger does not fit the DiT (other layers or widths), or the DiT holds fused LoRAs."""


class LoraMerger(nn.Module):
    """The gate of one Linear of width ``dim`` (keys as in the file).

    Args:
        dim: The layer's output features ``d_out``.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight_base = nn.Parameter(torch.zeros(dim))
        self.weight_lora = nn.Parameter(torch.zeros(dim))
        self.weight_cross = nn.Parameter(torch.zeros(dim))
        self.weight_out = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.norm_base = nn.LayerNorm(dim, eps=1e-5)
        self.norm_lora = nn.LayerNorm(dim, eps=1e-5)

    def _params(self, like: Tensor) -> list[Tensor]:
        tensors = [self.weight_base, self.weight_lora, self.weight_cross, self.weight_out, self.bias,
                   self.norm_base.weight, self.norm_base.bias, self.norm_lora.weight, self.norm_lora.bias]  # fmt: skip
        if tensors[0].device != like.device or tensors[0].dtype != like.dtype:
            return [t.to(like) for t in tensors]
        return tensors

    def forward(self, base: Tensor, lora_outputs: list[Tensor]) -> Tensor:
        """Gate and add the LoRA outputs: ``base (..., d)``, ``lora_outputs`` n x ``(..., d)`` -> ``(..., d)``.

        With no LoRA output the result is ``base`` itself.
        """
        if not lora_outputs:
            return base
        params = self._params(base)
        if not torch.is_grad_enabled():
            return self._inference(base, lora_outputs, params)
        w_base, w_lora, w_cross, w_out, bias, nb_w, nb_b, nl_w, nl_b = params
        shape = (base.shape[-1],)
        norm_base = F.layer_norm(base, shape, nb_w, nb_b, self.norm_base.eps)
        base_term = torch.addcmul(bias, norm_base, w_base)  # LN_b(o) w_base + bias
        lora_gain = torch.addcmul(w_lora, norm_base, w_cross)  # w_lora + LN_b(o) w_cross
        out = base
        for lora in lora_outputs:
            norm_lora = F.layer_norm(lora, shape, nl_w, nl_b, self.norm_lora.eps)
            gate = torch.sigmoid(torch.addcmul(base_term, norm_lora, lora_gain))
            out = torch.addcmul(out, gate * w_out, lora)
        return out

    def _inference(self, base: Tensor, lora_outputs: list[Tensor], params: list[Tensor]) -> Tensor:
        """The same gate without autograd: every affine folded into two per-layer tensors, row blocks, in place.

        With ``n = LN(o)`` (no affine), ``LN_b(o) = n nb_w + nb_b`` and ``LN_l(l) = m nl_w + nl_b``, the gate's
        argument is ``m * gain + shift`` where ``shift = s0 + n s1`` and ``gain = g0 + n g1`` for per-channel
        vectors ``s0, s1, g0, g1`` (``d_out`` each). Per block of :data:`GATE_ROWS` token rows: three passes
        over ``(rows, d_out)``; per LoRA five (its LN, the affine, sigmoid, ``w_out``, the accumulation). Every
        row is independent, so a block's passes run on data still in the CPU cache (the result is the same,
        bit for bit, as one block). ``base`` itself is never changed.
        """
        w_base, w_lora, w_cross, w_out, bias, nb_w, nb_b, nl_w, nl_b = params
        width = base.shape[-1]
        shape = (width,)
        base_gain = w_base + w_cross * nl_b  # what multiplies LN_b(o) in the shift
        cross_gain = w_cross * nl_w  # what multiplies LN_b(o) in the gain
        shift0 = bias + w_lora * nl_b + nb_b * base_gain
        gain0 = w_lora * nl_w + nb_b * cross_gain
        shift1, gain1 = nb_w * base_gain, nb_w * cross_gain
        rows_in = base.reshape(-1, width)
        loras = [lora.reshape(-1, width) for lora in lora_outputs]
        out = torch.empty_like(rows_in)
        for start in range(0, rows_in.shape[0], GATE_ROWS):
            stop = start + GATE_ROWS
            block, block_out = rows_in[start:stop], out[start:stop]
            n = F.layer_norm(block, shape, None, None, self.norm_base.eps)
            shift = torch.addcmul(shift0, n, shift1)
            gain = n.mul_(gain1).add_(gain0)
            for index, lora in enumerate(loras):
                part = lora[start:stop]
                gate = F.layer_norm(part, shape, None, None, self.norm_lora.eps)
                torch.addcmul(shift, gate, gain, out=gate).sigmoid_().mul_(w_out)
                if index == 0:
                    torch.addcmul(block, gate, part, out=block_out)
                else:
                    block_out.addcmul_(gate, part)
        return out.view(base.shape)


def _fused_loras(dit: nn.Module) -> list[str]:
    """Names of the LoRAs fused into ``dit``'s weights (any family's ``LoraState`` kept on the module)."""
    names: list[str] = []
    for value in list(vars(dit).values()):
        if isinstance(value, LoraState):
            names += [name for name, applied in value.applied.items() if applied.report.fused]
    return names


class FluxLoraFusion(nn.Module):
    """One :class:`LoraMerger` per DiT Linear, keyed by DiffSynth name (``model_dict.<name>.*``).

    Args:
        dims: DiffSynth layer name (``blocks___0___attn___a_to_qkv``) -> output features.

    Attributes:
        active: Whether the pipeline unit installs the merger on each call (``enable`` sets it, ``disable``
            clears it; True after loading, so loading the model enables it).
    """

    def __init__(self, dims: Mapping[str, int]) -> None:
        super().__init__()
        self.model_dict = nn.ModuleDict({name: LoraMerger(dim) for name, dim in dims.items()})
        self.active = True

    def forward(self, base: Tensor, lora_outputs: list[Tensor], name: str) -> Tensor:
        """The gated output of the layer ``name`` (DiffSynth or BFL name); shapes as :meth:`LoraMerger.forward`."""
        key = name if name in self.model_dict else diffsynth_key(name)
        merger: Tensor = self.model_dict[str(key)](base, lora_outputs)
        return merger

    def _targets(self, dit: nn.Module) -> dict[str, tuple[DeltaLinear, LoraMerger]]:
        layers = {path: layer for path, layer in delta_linears(dit) if diffsynth_key(path) is not None}
        mine = {bfl_path(key): key for key in self.model_dict}
        missing, extra = sorted(set(layers) - set(mine)), sorted(str(p) for p in set(mine) - set(layers))
        if missing or extra:
            parts = ([f"it has no gate for {len(missing)} DiT layer(s), e.g. {missing[:3]}"] if missing else []) + (
                [f"it gates {len(extra)} layer(s) the DiT lacks, e.g. {extra[:3]}"] if extra else []
            )
            raise LoraFusionMismatchError(
                f"the LoRA merger does not fit this DiT: {'; '.join(parts)}. It was made for a FLUX.1 DiT of "
                "another depth; use the merger trained for this model (LoRAFusion-preview is for FLUX.1-dev)"
            )
        out: dict[str, tuple[DeltaLinear, LoraMerger]] = {}
        for path, layer in layers.items():
            merger = self.model_dict[str(diffsynth_key(path))]
            assert isinstance(merger, LoraMerger)
            if merger.weight_out.shape[0] != layer.out_features:
                raise LoraFusionMismatchError(
                    f"the LoRA merger's gate for {path} has width {merger.weight_out.shape[0]}, but the layer has "
                    f"{layer.out_features} output features; use the merger trained for this model"
                )
            out[path] = (layer, merger)
        return out

    def enable(self, dit: nn.Module) -> int:
        """Install the gates as the combiners of ``dit``'s Linears; return how many layers are gated.

        Raises:
            LoraFusionMismatchError: The merger does not fit the DiT, or a LoRA is fused into its weights (the
                merger needs each LoRA as a side path).
        """
        fused = _fused_loras(dit)
        if fused:
            raise LoraFusionMismatchError(
                f"LoRA(s) {fused} are fused into the DiT's weights; the LoRA merger gates each LoRA's output "
                "separately, so unload them and load them again with fuse=False before enabling it"
            )
        targets = self._targets(dit)
        for layer, merger in targets.values():
            layer.set_combiner(merger)
        self.active = True
        return len(targets)

    def disable(self, dit: nn.Module) -> int:
        """Remove this merger's gates from ``dit`` (side paths are summed again); return how many were removed."""
        mergers = {id(m) for m in self.model_dict.values()}
        removed = 0
        for _, layer in delta_linears(dit):
            if layer.combiner is not None and id(layer.combiner) in mergers:
                layer.set_combiner(None)
                removed += 1
        self.active = False
        return removed

    def enabled_on(self, dit: nn.Module) -> bool:
        """True when every layer of ``dit`` this merger gates has its gate installed."""
        mergers = {id(m) for m in self.model_dict.values()}
        layers = [layer for path, layer in delta_linears(dit) if diffsynth_key(path) is not None]
        return bool(layers) and all(id(layer.combiner) in mergers for layer in layers)


def dims_from_shapes(shapes: Mapping[str, Iterable[int]]) -> dict[str, int]:
    """``model_dict.<name>.weight_out`` shapes -> ``{name: d_out}`` (file order).

    Raises:
        PipelineInputError: No ``model_dict.*.weight_out`` key.
    """
    dims: dict[str, int] = {}
    for key, shape in shapes.items():
        if key.startswith("model_dict.") and key.endswith(".weight_out"):
            dims[key[len("model_dict.") : -len(".weight_out")]] = int(list(shape)[0])
    if not dims:
        raise PipelineInputError("not a LoRA merger: no model_dict.<layer>.weight_out tensors")
    return dims


def enable_lora_merger(pipe: Any) -> int:
    """The seed's ``pipe.enable_lora_merger()``: gate the DiT's side-path LoRAs with the loaded merger.

    Returns:
        The number of gated layers.

    Raises:
        PipelineInputError: No merger or no DiT is loaded.
        LoraFusionMismatchError: See :meth:`FluxLoraFusion.enable`.
    """
    if not pipe.has("lora_merger") or not pipe.has("dit"):
        raise PipelineInputError(
            "enable_lora_merger() needs the DiT and the LoRA merger; add ModelConfig(model_id="
            "'DiffSynth-Studio/LoRAFusion-preview-FLUX.1-dev', origin_file_pattern='model.safetensors') to "
            "from_pretrained"
        )
    merger: FluxLoraFusion = pipe.lora_merger
    return merger.enable(pipe.dit)


def disable_lora_merger(pipe: Any) -> int:
    """Remove the merger's gates from the pipeline's DiT (LoRA side paths are summed again); see :meth:`disable`."""
    if not pipe.has("lora_merger"):
        return 0
    merger: FluxLoraFusion = pipe.lora_merger
    return merger.disable(pipe.dit)
