"""The DiT call contract and the DiT layers shared by every FLUX family; owned by no family.

Why in core: the contract is a vocabulary (which tensors may enter a dual-stream DiT call, and where) plus a few
pure-torch layers, with no checkpoint or family knowledge; putting it in core lets adapters say "I work with any
FLUX DiT" with a dependency on core only (see CONTRIBUTING, "DiT extension points").

Extension points (branch keys of ``predict_velocity``; a family lists those it honours in ``extension_inputs``):

* ``extra_txt`` / ``extra_txt_ids``: extra text tokens appended after the prompt's, per CFG branch.
* ``extra_img`` / ``extra_img_ids``: extra image tokens with their own ids, appended after the family's reference
  tokens (Kontext / edit images); they attend, their outputs are dropped (Step1X: ids with ``t = 0``).
* ``img_cond``: image conditioning concatenated to the target tokens along channels (Fill, Flex.2); a call hook
  may return it, so it can depend on the step.
* ``kv_extension``: ``{"double_i" | "single_i": (K, V)}`` appended to that block's post-RoPE keys and values.
* ``block_residual``: :class:`~diffstudio.dit.extensions.BlockResidualHook`, residuals after double / single
  blocks (ControlNet, InfiniteYou).
* ``attention_kwargs``: extras handed to every block's attention processor; processors chain through an ``inner``
  attribute and ``with_inner(processor)`` (IP-Adapter, EliGen), in any order.
* ``stack_hook``: :class:`~diffstudio.dit.extensions.StackHook` around the whole block stack (step caching).
* ``text_stream``: :class:`~diffstudio.dit.extensions.TextStream` replacing ``txt``, ``txt_ids`` and the pooled
  vector of the call (Step1X's connector, Nexus-Gen).
* ``call_hooks``: ``{name: CallHook}``, called with a :class:`~diffstudio.dit.extensions.DitCall` (inputs, step
  index, timestep, branch) before the forward; they return any of the keys above.
* ``dit_deltas``: ``{DeltaLinear path: side path}`` attached for this call only (per-branch LoRA);
  :class:`~diffstudio.dit.extensions.CombinedDelta` combines separate LoRA outputs at one Linear (LoRA-Fusion).

Layers (:mod:`diffstudio.dit.layers`): ``MLPEmbedder``, ``EmbedND``, ``LastLayer``, ``Modulation``,
``SelfAttention``, ``ProcessorSlot``, ``MaskedAttentionProcessor``; :mod:`diffstudio.dit.blocks` has the
self-modulated (FLUX.1 / ControlNet) double and single blocks.
"""

from __future__ import annotations

from diffstudio.dit.extensions import (
    BRANCH_KEYS,
    DEPRECATED_KEYS,
    EXTENSION_INPUTS,
    HOOK_KEYS,
    BatchedResidual,
    BlockResidualHook,
    CallHook,
    CombinedDelta,
    DitCall,
    ExtensionConflictError,
    StackHook,
    SummedResidual,
    TextStream,
    append_tokens,
    branch_extensions,
    branch_of,
    call_extensions,
    merge_extensions,
    run_call_hooks,
)

__all__ = [
    "BRANCH_KEYS",
    "DEPRECATED_KEYS",
    "EXTENSION_INPUTS",
    "HOOK_KEYS",
    "BatchedResidual",
    "BlockResidualHook",
    "CallHook",
    "CombinedDelta",
    "DitCall",
    "ExtensionConflictError",
    "StackHook",
    "SummedResidual",
    "TextStream",
    "append_tokens",
    "branch_extensions",
    "branch_of",
    "call_extensions",
    "merge_extensions",
    "run_call_hooks",
]
