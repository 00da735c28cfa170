"""EliGen and an IP-Adapter in one FLUX.1 call: both take effect, whatever processors the DiT had before.

The IP-Adapter wraps a block's processor and EliGen swaps the SDPA at the bottom of the wrapper chain for its
regional one (the FLUX.1 family's composition convention), so neither adapter silently drops the other.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import pytest
import torch
from diffstudio import ModelConfig
from diffstudio.errors import PipelineInputError
from diffstudio.runtime import Runtime
from PIL import Image

pytest.importorskip("diffstudio_eligen")
pytest.importorskip("diffstudio_ipadapter")

from diffstudio_eligen.mask import RegionalAttentionProcessor  # noqa: E402
from diffstudio_flux1.pipeline import FluxImagePipeline  # noqa: E402
from diffstudio_ipadapter.model import FluxIPAdapter  # noqa: E402
from diffstudio_ipadapter.units import IPAdapterProcessor  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

H, W, SEQ = 32, 48, 16
PROMPT = "a red circle on a blue background"
ARGS: dict[str, Any] = {"height": H, "width": W, "num_inference_steps": 2, "seed": 0, "output_type": "latent",
                        "t5_sequence_length": SEQ, "embedded_guidance": 2.0}  # fmt: skip


@pytest.fixture(scope="module")
def pipe_factory(tmp_path_factory: pytest.TempPathFactory, helpers: ModuleType, fp: ModuleType) -> Any:
    """Builds fresh FLUX.1 pipelines over one tiny repository plus an InstantX IP-Adapter and its SigLIP.

    ``helpers`` and ``fp`` are the FLUX.1 test helpers (the root ``conftest.py``).
    """
    import transformers

    root = tmp_path_factory.mktemp("adapters-together")
    repo = fp.build_repo(root / "repo", helpers, seed=5)
    siglip = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=32,
        patch_size=8))  # fmt: skip
    helpers.perturb(siglip, 2)
    siglip.eval().save_pretrained(root / "siglip")
    adapter = FluxIPAdapter("instantx", 32, 24, 64, 3, 4)
    helpers.perturb(adapter, 11)
    save_file({k: v.contiguous() for k, v in adapter.state_dict().items()}, str(root / "instantx.safetensors"))
    parts = [repo.root / n for n in ("transformer", "text_encoder", "text_encoder_2", "vae")]
    parts += [root / "instantx.safetensors", root / "siglip"]

    def make() -> FluxImagePipeline:
        pipe = FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", runtime=Runtime(),
                                                 model_configs=[ModelConfig(path=str(p)) for p in parts])  # fmt: skip
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return make, fp.image(40, 40, seed=22)


def _masks() -> list[Image.Image]:
    left, right = Image.new("L", (W, H), 0), Image.new("L", (W, H), 0)
    left.paste(255, (0, 0, W // 2, H))
    right.paste(255, (W // 2, 8, W, H))
    return [left, right]


def _entities() -> dict[str, Any]:
    return {"eligen_entity_prompts": ["a red circle", "a green star"], "eligen_entity_masks": _masks()}


def test_eligen_and_ipadapter_both_take_effect_in_either_order(pipe_factory: Any) -> None:
    make, picture = pipe_factory
    pipe = make()
    plain = pipe(PROMPT, **ARGS)
    ip = pipe(PROMPT, **ARGS, ipadapter_images=picture)  # installs the IP-Adapter's processor first
    eligen = pipe(PROMPT, **ARGS, **_entities())  # then EliGen's, inside it
    both = pipe(PROMPT, **ARGS, **_entities(), ipadapter_images=picture)
    for name, other in (("plain", plain), ("EliGen alone", eligen), ("IP-Adapter alone", ip)):
        assert (both - other).abs().max() > 1e-3, f"EliGen + IP-Adapter equals {name}: an adapter was dropped"
    for name, processor in pipe.dit.attn_processors.items():
        assert isinstance(processor, IPAdapterProcessor), name
        assert isinstance(processor.inner, RegionalAttentionProcessor), name

    fresh = make()  # the other order: EliGen's processor first, the IP-Adapter's wrapped around it
    torch.testing.assert_close(fresh(PROMPT, **ARGS, **_entities()), eligen, rtol=0, atol=0)
    torch.testing.assert_close(fresh(PROMPT, **ARGS, **_entities(), ipadapter_images=picture), both, rtol=0, atol=0)
    # wrappers whose inputs are absent are transparent: later calls without the adapters are unchanged
    torch.testing.assert_close(fresh(PROMPT, **ARGS), plain, rtol=0, atol=0)
    torch.testing.assert_close(fresh(PROMPT, **ARGS, ipadapter_images=picture), ip, rtol=0, atol=0)


def test_eligen_refuses_a_block_processor_it_cannot_compose_with(pipe_factory: Any) -> None:
    make, _ = pipe_factory
    pipe = make()

    class Opaque:
        def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context: Any) -> torch.Tensor:
            return torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            ).transpose(1, 2)

    pipe.dit.set_attn_processor(Opaque(), ["double_0"])
    with pytest.raises(PipelineInputError, match=r"double_0.*inner.*with_inner"):
        pipe(PROMPT, **ARGS, **_entities())
