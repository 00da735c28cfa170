"""One loader recipe for the modules a family builds itself.

Read, convert, infer params (config first), build on meta, assign. A family's ``load_dit`` / ``load_vae`` is
one call of :func:`build_from_checkpoint` naming what differs: the params class's ``from_state_dict_shapes``,
the module constructor, the diffusers-to-canonical converter and the key that tells the diffusers layout, and
the diffusers class names of the component's ``config.json``::

    return build_from_checkpoint(
        checkpoint, request,
        infer=FluxParams.from_state_dict_shapes, build=Flux,
        convert=convert_diffusers_to_bfl_dit, converted_if="x_embedder.weight",
        config_classes=FluxParams.DIFFUSERS_CLASSES, prefixes=COMFY_PREFIXES,
    )

Importing this module does not import torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from diffstudio.loading.component_config import ComponentConfig, read_component_config

if TYPE_CHECKING:
    import torch
    from torch import nn

    from diffstudio.loading.checkpoint import Checkpoint
    from diffstudio.loading.shapes import Shapes
    from diffstudio.types import LoadRequest

P = TypeVar("P")
P_co = TypeVar("P_co", covariant=True)
M = TypeVar("M", bound="nn.Module")
C = TypeVar("C")

#: Key prefixes ComfyUI and other UIs put in front of a whole DiT's names.
COMFY_PREFIXES: tuple[str, ...] = ("model.diffusion_model.", "diffusion_model.")


class InferParams(Protocol[P_co]):
    """A params class's ``from_state_dict_shapes``: the sizes from canonical shapes, the config first."""

    def __call__(self, shapes: Shapes, *, source: str, config: ComponentConfig | None) -> P_co:
        """Return the params."""


def common_prefix(keys: Sequence[str], prefixes: Sequence[str] = COMFY_PREFIXES) -> str:
    """The first of ``prefixes`` that every key carries ('' when none, or when there are no keys)."""
    for prefix in prefixes:
        if keys and all(k.startswith(prefix) for k in keys):
            return prefix
    return ""


def first_claim(checkpoint: Checkpoint, probes: Sequence[Callable[[Checkpoint], C | None]]) -> C | None:
    """A family's answer to ``load_model``: the claim of the first probe (DiT, VAE, text encoder, ...) that matches."""
    for probe in probes:
        found = probe(checkpoint)
        if found is not None:
            return found
    return None


def text_config(checkpoint: Checkpoint, request: LoadRequest) -> dict[str, Any] | None:
    """``ModelConfig(config=)`` laid over the ``config.json`` beside the weights, for a transformers model's loader.

    None when the user passed no override: the loader then reads the file beside the weights itself (with its
    own message when there is none).
    """
    if request.config.config is None:
        return None
    config = read_component_config(checkpoint, request.config)
    return config.values if config is not None else None


def build_from_checkpoint(
    checkpoint: Checkpoint,
    request: LoadRequest,
    *,
    infer: InferParams[P],
    build: Callable[[P], M],
    convert: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
    converted_if: str | None = None,
    config_classes: tuple[str, ...] = (),
    prefixes: Sequence[str] = (),
    prefetch: bool | None = None,
) -> M:
    """Build a module from a claimed checkpoint: read, convert, infer params (config first), build on meta, assign.

    1. The component's configuration is read (:func:`~diffstudio.loading.component_config.read_component_config`:
       the ``config.json`` beside the weights when its ``_class_name`` is in ``config_classes``, with
       ``request.config.config`` laid over it).
    2. The tensors are mapped, without the first of ``prefixes`` every key carries, and converted to canonical
       names with ``convert`` when the key ``converted_if`` is among them.
    3. ``infer(shapes, source=..., config=...)`` gives the params; ``build(params)`` runs on the meta device, and
       the tensors are assigned strictly in ``request``'s dtype and device.

    Args:
        checkpoint: The claimed, opened checkpoint.
        request: The dtype and device, and the user's ``ModelConfig``.
        infer: The params from canonical shapes (a params class's ``from_state_dict_shapes``).
        build: The module constructor.
        convert: Another layout's names -> canonical names (e.g. diffusers -> BFL).
        converted_if: The key (after the prefix) that says the tensors need ``convert``; None: always convert.
        config_classes: ``_class_name`` values of the component's diffusers ``config.json``.
        prefixes: Key prefixes to strip (e.g. :data:`COMFY_PREFIXES`).
        prefetch: Read the pages ahead in parallel; None: only when no conversion runs (a conversion that copies,
            such as a q/k/v fusion, reads while it copies, which measured faster than reading ahead first).

    Returns:
        The module, in eval mode with gradients off.

    Raises:
        ConfigError: The configuration cannot be read or does not fit the family.
        ParamsShapeError: The shapes do not give consistent sizes, or contradict the configuration.
        StrictLoadError: Tensors are missing or unexpected.
    """
    from diffstudio.loading.assign import build_on_meta, load_state_dict_into

    config = read_component_config(checkpoint, request.config, config_classes)
    keys = checkpoint.keys()
    prefix = common_prefix(keys, prefixes)
    converting = convert is not None and (converted_if is None or prefix + converted_if in checkpoint)
    read_ahead = not converting if prefetch is None else prefetch
    state = checkpoint.state_dict(keys, prefetch=read_ahead)
    if prefix:
        state = {k[len(prefix) :]: v for k, v in state.items()}
    if converting and convert is not None:
        state = convert(state)
    shapes: dict[str, Any] = {k: tuple(v.shape) for k, v in state.items()}
    params = infer(shapes, source=checkpoint.source, config=config)
    model = build_on_meta(lambda: build(params))
    load_state_dict_into(model, state, dtype=request.torch_dtype, device=request.device, source=checkpoint.source)
    return model.eval().requires_grad_(False)
