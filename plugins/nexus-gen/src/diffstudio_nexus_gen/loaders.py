"""Claims and loaders of Nexus-Gen's files: the AR model, the decoder files (one file, two components), their heads.

* AR model (``model*.safetensors`` of ``DiffSynth-Studio/Nexus-GenV2``): a Qwen2.5-VL in any key layout the shared
  slot reads (:mod:`diffstudio_qwen_vl.weights`) plus ``vision_head.weight`` and ``image_prefill_embeds.weight``;
  slot ``nexus_gen``. The processor is read from ``processor/`` beside the weights (or the weights' folder).
* Decoder file (``generation_decoder.bin`` / ``edit_decoder.bin``, or a safetensors copy with the same keys): a
  whole FLUX.1 DiT under ``pipe.dit.`` in DiffSynth's legacy names and the ``adapter.*`` / ``embedding_merger.*``
  head. :func:`load_decoder` reads it once and fills two slots: the DiT (converted to BFL names and built by the
  installed FLUX.1 family from a :func:`~diffstudio.loading.checkpoint.tensors_view`, so no family is imported) and
  ``nexus_gen_decoder`` (the head). Pickles go through core's pickle policy: refused unless ``allow_pickle=True``,
  then ``torch.load(weights_only=True, mmap=True)``. Through ``from_pretrained`` such a file is claimed and refused
  with a message naming :func:`load_decoder` and ``diffstudio nexus-gen-convert``.
* Head file (what ``diffstudio nexus-gen-convert`` writes beside the BFL DiT file): ``adapter.*`` or
  ``embedding_merger.*`` only; slot ``nexus_gen_decoder``. The converted DiT file is an ordinary BFL FLUX.1 DiT,
  claimed by the FLUX.1 family.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffstudio.errors import CheckpointError, ConfigError
from diffstudio.types import LoadRequest, ModelClaim

from diffstudio_nexus_gen.convert import ADAPTER_PREFIX, MERGER_PREFIX, decoder_kind, head_kind

if TYPE_CHECKING:
    from diffstudio.config import ModelConfig
    from diffstudio.loading import Checkpoint
    from diffstudio.pipeline.base import BasePipeline
    from torch import Tensor, nn

FAMILY = "flux1"
AR_SLOT = "nexus_gen"
HEAD_SLOT = "nexus_gen_decoder"
AR_EXTRA = ("vision_head.", "image_prefill_embeds.")


class NexusGenCheckpointError(CheckpointError):
    """A Nexus-Gen file that cannot be loaded the way it was given."""


def claim(checkpoint: Checkpoint) -> ModelClaim | None:
    """The plugin's answer to ``load_model``: the AR model, a whole decoder file, or a decoder head."""
    keys = checkpoint.keys()
    names = set(keys)
    if "vision_head.weight" in names and "image_prefill_embeds.weight" in names:
        from diffstudio_qwen_vl.weights import qwen_vl_layout

        layout = qwen_vl_layout(k for k in keys if not k.startswith(AR_EXTRA))
        if layout is not None:
            return ModelClaim(FAMILY, "nexus-gen-ar/qwen2.5-vl", AR_SLOT, layout, load_ar)
    kind = decoder_kind(names)
    if kind is not None:
        return ModelClaim(FAMILY, f"nexus-gen-decoder/{kind}", HEAD_SLOT, "diffsynth", refuse_whole_decoder)
    kind = head_kind(names)
    if kind is not None:
        return ModelClaim(FAMILY, f"nexus-gen-head/{kind}", HEAD_SLOT, "diffstudio", load_head)
    return None


def load_ar(checkpoint: Checkpoint, request: LoadRequest) -> nn.Module:
    """Build :class:`~diffstudio_nexus_gen.ar.NexusGenAR` (VLM through the shared Qwen2.5-VL slot) and its processor."""
    from diffstudio.loading import build_on_meta, find_meta_tensors, load_state_dict_into
    from diffstudio_qwen_vl.processor import load_processor
    from diffstudio_qwen_vl.weights import load_qwen_vl

    from diffstudio_nexus_gen.ar import NexusGenAR

    config = request.config.config if request.config is not None else None
    vlm = load_qwen_vl(checkpoint, request.torch_dtype, request.device, config=config, ignore_prefixes=AR_EXTRA)
    rows = int(checkpoint.shape("image_prefill_embeds.weight")[0])
    with_heads = build_on_meta(lambda: NexusGenAR(_Placeholder(vlm.config), rows))
    extra = checkpoint.state_dict([k for k in checkpoint.keys() if k.startswith(AR_EXTRA)])
    load_state_dict_into(with_heads, extra, strict=False, dtype=request.torch_dtype, device=request.device,
                         source=str(checkpoint.source))  # fmt: skip
    with_heads.model = vlm
    missing = find_meta_tensors(with_heads)
    if missing:
        raise NexusGenCheckpointError(f"{checkpoint.source}: the AR model lacks {', '.join(missing[:6])}")
    folder = Path(checkpoint.files[0]).parent if checkpoint.files else None
    for candidate in [folder / "processor", folder] if folder is not None else []:
        if (candidate / "preprocessor_config.json").is_file():
            with_heads.processor = load_processor(candidate)
            break
    with_heads.repeated_blocks = tuple(f"model.{b}" for b in vlm.repeated_blocks)  # type: ignore[assignment]
    with_heads.memory_leaves = vlm.memory_leaves  # type: ignore[assignment]
    with_heads.keep_in_high_precision = vlm.keep_in_high_precision  # type: ignore[assignment]
    return with_heads.eval().requires_grad_(False)


class _Placeholder:
    """Stands for the VLM while the heads are built on meta (only its config is read)."""

    def __init__(self, config: Any) -> None:
        self.config = config

    def __call__(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover - replaced before use
        raise RuntimeError("placeholder")


def build_head(state: Mapping[str, Tensor], request: LoadRequest, source: str) -> nn.Module:
    """The adapter (:class:`GenerationHead`) or merger (:class:`EditingHead`) from its tensors, sizes from shapes.

    ``ModelConfig(config={...})`` may give the merger's :class:`~diffstudio_nexus_gen.heads.MergerParams` fields
    that its weights cannot tell (``heads``, ``mrope_section``, ``rope_theta``); the published ones are defaults.

    Raises:
        NexusGenCheckpointError: The tensors are neither head.
    """
    from diffstudio.loading import build_on_meta, load_state_dict_into

    from diffstudio_nexus_gen.heads import EditingHead, GenerationHead, MergerParams

    shapes = {k: tuple(v.shape) for k, v in state.items()}
    kind = head_kind(set(state))
    module: nn.Module
    if kind == "generation":
        module = build_on_meta(lambda: GenerationHead.from_shapes(shapes))
    elif kind == "editing":
        fields = MergerParams.__dataclass_fields__  # one config serves the file's DiT and merger: take ours
        given = {k: v for k, v in _explicit_config(request.config).items() if k in fields}
        merger_shapes = {k.removeprefix(MERGER_PREFIX): v for k, v in shapes.items()}
        params = MergerParams.from_shapes(merger_shapes, **given)
        module = build_on_meta(lambda: EditingHead(params))
    else:
        raise NexusGenCheckpointError(
            f"{source} holds neither {ADAPTER_PREFIX}* (generation adapter) nor {MERGER_PREFIX}* (editing merger) "
            "tensors only"
        )
    load_state_dict_into(module, state, dtype=request.torch_dtype, device=request.device, source=source)
    module.memory_leaves = ("Linear", "LayerNorm", "RMSNorm")  # type: ignore[assignment]
    return module.eval().requires_grad_(False)


def _explicit_config(config: ModelConfig | None) -> Mapping[str, Any]:
    value = None if config is None else config.config
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError("the Nexus-Gen merger takes ModelConfig(config={...}) as a dict of MergerParams fields")
    return value


def load_head(checkpoint: Checkpoint, request: LoadRequest) -> nn.Module:
    """Build the head of a converted decoder (``*-adapter.safetensors`` / ``*-merger.safetensors``)."""
    return build_head(checkpoint.state_dict(checkpoint.keys()), request, str(checkpoint.source))


def refuse_whole_decoder(checkpoint: Checkpoint, request: LoadRequest) -> nn.Module:
    """A whole decoder file fills two slots, which one ``ModelConfig`` cannot: say what to do instead.

    Raises:
        NexusGenCheckpointError: Always.
    """
    raise NexusGenCheckpointError(
        f"{checkpoint.source} is a whole Nexus-Gen decoder (a FLUX.1 DiT and its head in one file), which fills two "
        "pipeline slots: load it with diffstudio_nexus_gen.load_decoder(pipe, path, allow_pickle=True), or split it "
        "once with `diffstudio nexus-gen-convert <file> <folder> --allow-pickle` and pass both safetensors files "
        "to from_pretrained."
    )


def read_decoder(source: Any, *, allow_pickle: bool = False) -> tuple[dict[str, Tensor], dict[str, Tensor], Checkpoint]:
    """Read a whole decoder file once: ``(DiT in BFL names, head tensors, the opened checkpoint)``.

    Args:
        source: The file (``.bin`` pickle or ``.safetensors``), or an open checkpoint.
        allow_pickle: The explicit opt-in core's pickle policy requires for ``.bin`` files.

    Raises:
        PickleRefusedError: A pickle without ``allow_pickle=True``.
        NexusGenCheckpointError: The file is not a Nexus-Gen decoder.
    """
    from diffstudio.loading import Checkpoint

    from diffstudio_nexus_gen.convert import split_decoder

    checkpoint = source if isinstance(source, Checkpoint) else Checkpoint.open(source, allow_pickle=allow_pickle)
    if decoder_kind(set(checkpoint.keys())) is None:
        raise NexusGenCheckpointError(
            f"{checkpoint.source} is not a Nexus-Gen decoder (no pipe.dit.* with adapter.* or embedding_merger.*; "
            f"telling keys: {', '.join(checkpoint.telling_keys())})"
        )
    dit, head = split_decoder(checkpoint.state_dict(checkpoint.keys()))
    return dit, head, checkpoint


def load_decoder(
    pipe: BasePipeline, source: Any, *, allow_pickle: bool = False, config: ModelConfig | None = None
) -> str:
    """Load a whole decoder file into ``pipe``: its DiT into ``dit``, its head into ``nexus_gen_decoder``.

    The file is read once (pickles memory-mapped); the DiT is converted to BFL names and claimed by the installed
    FLUX.1 family from an in-memory view, and both modules get the pipeline's memory strategy like any component.

    Args:
        pipe: A FLUX.1 pipeline.
        source: The decoder file (``generation_decoder.bin``, ``edit_decoder.bin`` or a safetensors copy).
        allow_pickle: Opt in to unpickling a ``.bin`` (``torch.load(weights_only=True)``).
        config: Memory fields (offload/onload/computation) and the merger's config, as for ``from_pretrained``.

    Returns:
        ``"generation"`` or ``"editing"``.

    Raises:
        PickleRefusedError: A pickle without ``allow_pickle=True``.
        NexusGenCheckpointError: Not a decoder, or no installed family builds its DiT.
    """
    from diffstudio.config import ModelConfig
    from diffstudio.loading.checkpoint import tensors_view

    config = config if config is not None else ModelConfig(path=str(source))
    dit_state, head_state, checkpoint = read_decoder(source, allow_pickle=allow_pickle)
    with checkpoint:
        view = tensors_view(f"{checkpoint.source} [DiT part]", dit_state, checkpoint.files)
        claims = [c for c in pipe.runtime.hooks.load_model(view, ModelConfig(path=str(source))) if c.component == "dit"]
        if len(claims) != 1 or claims[0].family != pipe.family:
            raise NexusGenCheckpointError(
                f"the DiT of {checkpoint.source} was claimed by {[c.describe() for c in claims] or 'no family'}; "
                f"it needs the FLUX.1 family (diffstudio-flux1) and a {pipe.family} pipeline"
            )
        _place(pipe, "dit", claims[0], lambda request: claims[0].load(view, request), config, checkpoint)
        kind = str(head_kind(set(head_state)))
        head_claim = ModelClaim(FAMILY, f"nexus-gen-head/{kind}", HEAD_SLOT, "diffsynth", load_head, "nexus-gen")
        source_name = f"{checkpoint.source} [head]"
        _place(pipe, HEAD_SLOT, head_claim, lambda request: build_head(head_state, request, source_name), config,
               checkpoint)  # fmt: skip
    return kind


def _place(
    pipe: BasePipeline, slot: str, claim: ModelClaim, build: Any, config: ModelConfig, checkpoint: Checkpoint
) -> None:
    """Build one part under the pipeline's memory budget for ``config`` and put it into ``slot``."""
    budget = pipe.memory_budget(config)
    if budget.managed:
        request = LoadRequest(config, None, "cpu")
    else:
        request = LoadRequest(config, budget.computation_dtype, budget.computation_device)
    module = build(request)
    strategy = pipe.runtime.hooks.vram_policy(module, slot, budget, pipe)
    pipe.set_component(
        slot, strategy.apply(module), strategy=strategy, claim=claim, files=[str(f) for f in checkpoint.files]
    )
