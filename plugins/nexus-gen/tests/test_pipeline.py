"""Nexus-Gen in ``FluxImagePipeline``: decoder files under the pickle policy, conversion, the text-stream unit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from diffstudio import ModelConfig
from diffstudio.errors import MissingPluginError, PickleRefusedError, PipelineInputError
from diffstudio.runtime import Runtime
from diffstudio_flux1 import FluxImagePipeline
from diffstudio_nexus_gen import convert_decoder_file, editing_text_ids, load_decoder
from diffstudio_nexus_gen.loaders import NexusGenCheckpointError

SIZE, SEQ = 32, 16
AXES = {"axes_dims_rope": [4, 14, 14]}


@pytest.fixture(scope="module")
def decoder_dit(helpers: Any, fx: Any) -> dict[str, torch.Tensor]:
    """The decoders' DiT: a tiny perturbed FLUX.1-dev in BFL names, sized like the kit's repository."""
    from diffstudio_flux1.convert import convert_diffusers_to_bfl_dit

    model = helpers.diffusers_dit(True, seed=21, context=fx.T5_HIDDEN, pooled=fx.CLIP_HIDDEN)
    return convert_diffusers_to_bfl_dit(model.state_dict())


@pytest.fixture(scope="module")
def decoders(tmp_path_factory: pytest.TempPathFactory, ng: Any, decoder_dit: Any) -> dict[str, Path]:
    """``generation_decoder.bin``, ``edit_decoder.bin`` and a safetensors copy of the first."""
    root = tmp_path_factory.mktemp("decoders")
    return {
        "generation": ng.write_decoder(root / "generation_decoder.bin", decoder_dit, ng.adapter_state(seed=3)),
        "editing": ng.write_decoder(root / "edit_decoder.bin", decoder_dit, ng.merger_state(seed=5)),
        "whole-safetensors": ng.write_decoder(root / "whole.safetensors", decoder_dit, ng.adapter_state(seed=3)),
    }


def base_configs(repo: Any) -> list[ModelConfig]:
    root = repo.root
    return [ModelConfig(path=str(root / n)) for n in ("text_encoder", "text_encoder_2", "vae")]


def pipeline(repo: Any, *extra: ModelConfig, runtime: Runtime | None = None, dit: bool = True) -> FluxImagePipeline:
    configs = base_configs(repo) + ([ModelConfig(path=str(repo.root / "transformer"))] if dit else []) + list(extra)
    pipe = FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=configs,
                                             runtime=runtime or Runtime())  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ar_config(ar_files: Any) -> ModelConfig:
    return ModelConfig(path=str(ar_files.folder / "model.safetensors"))


def decoder_config(path: Path) -> ModelConfig:
    return ModelConfig(path=str(path), config={**AXES, "heads": 2, "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})


@pytest.fixture(scope="module")
def edit_pipe(repo: Any, decoders: dict[str, Path], ar_files: Any) -> FluxImagePipeline:
    """The AR model + the editing decoder (loaded from the .bin with the flag)."""
    pipe = pipeline(repo, ar_config(ar_files), dit=False)
    path = decoders["editing"]
    assert load_decoder(pipe, path, allow_pickle=True, config=decoder_config(path)) == "editing"
    return pipe


def test_decoder_bin_is_refused_without_the_pickle_flag(repo: Any, decoders: dict[str, Path]) -> None:
    pipe = pipeline(repo, dit=False)
    with pytest.raises(PickleRefusedError, match="allow_pickle=True"):
        load_decoder(pipe, decoders["generation"])
    with pytest.raises(PickleRefusedError) as refused:
        pipeline(repo, ModelConfig(path=str(decoders["generation"])), dit=False)
    # from_pretrained has no pickle flag: the message names the ways that load a decoder, not a flag it lacks
    message = str(refused.value)
    assert "takes no allow_pickle" in message and "pass allow_pickle=True" not in message
    assert "diffstudio nexus-gen-convert" in message and "load_decoder(pipe, file, allow_pickle=True)" in message
    with pytest.raises(PickleRefusedError):
        convert_decoder_file(decoders["editing"], decoders["editing"].parent / "out")


def test_decoder_bin_loads_with_the_flag_into_the_dit_and_the_head_slots(
    edit_pipe: FluxImagePipeline, decoder_dit: Any, ng: Any
) -> None:
    pipe = edit_pipe
    state = pipe.dit.state_dict()
    assert all(torch.equal(state[k], v) for k, v in decoder_dit.items())
    merger = ng.merger_state(seed=5)
    head = pipe.nexus_gen_decoder.state_dict()
    assert set(head) == set(merger) and all(torch.equal(head[k], v) for k, v in merger.items())


def test_converted_decoder_loads_through_from_pretrained(
    repo: Any, decoders: dict[str, Path], decoder_dit: Any, tmp_path: Path
) -> None:
    dit_file, head_file = convert_decoder_file(decoders["generation"], tmp_path, allow_pickle=True)
    assert (dit_file.name, head_file.name) == (
        "generation_decoder-dit.safetensors",
        "generation_decoder-adapter.safetensors",
    )
    pipe = pipeline(repo, decoder_config(dit_file), ModelConfig(path=str(head_file)), dit=False)
    assert pipe.loaded["dit"].claim is not None and pipe.loaded["dit"].claim.model_type == "flux1-dit/custom"
    assert pipe.loaded["nexus_gen_decoder"].claim.model_type == "nexus-gen-head/generation"  # type: ignore[union-attr]
    state = pipe.dit.state_dict()
    assert all(torch.equal(state[k], v) for k, v in decoder_dit.items())


def test_a_whole_decoder_given_to_from_pretrained_is_refused_with_what_to_do(
    repo: Any, decoders: dict[str, Path]
) -> None:
    with pytest.raises(NexusGenCheckpointError, match="load_decoder.*nexus-gen-convert"):
        pipeline(repo, ModelConfig(path=str(decoders["whole-safetensors"])), dit=False)


class Recorder:
    """Records the text stream and pooled vector of every DiT call (a forward pre-hook)."""

    def __init__(self, dit: torch.nn.Module) -> None:
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.handle = dit.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.calls.append((args[2].detach().clone(), args[3].detach().clone(), args[5].detach().clone()))


def run(pipe: FluxImagePipeline, prompt: str, **kwargs: Any) -> Recorder:
    recorder = Recorder(pipe.dit)
    try:
        pipe(prompt, negative_prompt="", cfg_scale=2.0, height=SIZE, width=SIZE, num_inference_steps=1, seed=0,
             t5_sequence_length=SEQ, output_type="latent", **kwargs)  # fmt: skip
    finally:
        recorder.handle.remove()
    return recorder


def test_generation_replaces_the_positive_text_with_adapter_tokens_and_keeps_t5_on_the_negative(
    repo: Any, decoders: dict[str, Path], ar_files: Any
) -> None:
    pipe = pipeline(repo, ar_config(ar_files), dit=False)
    path = decoders["generation"]
    load_decoder(pipe, path, allow_pickle=True, config=decoder_config(path))
    prompt = "a red circle"
    recorder = run(pipe, prompt)
    (pos_txt, pos_ids, pos_y), (neg_txt, neg_ids, neg_y) = recorder.calls
    with torch.no_grad():
        want = pipe.nexus_gen_decoder(pipe.nexus_gen(prompt).target[None])
        encoded = pipe.prompt_encoder().encode([prompt, ""], SEQ)
    torch.testing.assert_close(pos_txt, want, atol=1e-6, rtol=0)
    assert pos_txt.shape == (1, 81, 24) and not pos_ids.any()
    torch.testing.assert_close(pos_y, encoded.y[:1], atol=1e-6, rtol=0)  # DiffSynth: CLIP of the prompt
    torch.testing.assert_close(neg_txt, encoded.txt[1:], atol=1e-6, rtol=0)  # the negative keeps T5("")
    torch.testing.assert_close(neg_y, encoded.y[1:], atol=1e-6, rtol=0)
    assert not neg_ids.any()
    empty = run(pipe, prompt, nexus_gen_pooled_prompt="empty").calls[0][2]
    torch.testing.assert_close(empty, encoded.y[1:], atol=1e-6, rtol=0)  # Nexus-Gen's own variant: CLIP("")
    with pytest.raises(PipelineInputError, match="nexus_gen_pooled_prompt"):
        run(pipe, prompt, nexus_gen_pooled_prompt="neither")
    with pytest.raises(PipelineInputError, match="edit_decoder"):
        run(pipe, prompt, nexus_gen_reference_image=_image())


def _image() -> Any:
    from PIL import Image

    return Image.new("RGB", (56, 56), (10, 200, 30))


def test_editing_merges_target_and_reference_with_the_published_text_ids(
    edit_pipe: FluxImagePipeline, reference_image: Any
) -> None:
    pipe = edit_pipe
    recorder = run(pipe, "Add a crown.", nexus_gen_reference_image=reference_image)
    (pos_txt, pos_ids, _), (neg_txt, _, _) = recorder.calls
    with torch.no_grad():
        out = pipe.nexus_gen("Add a crown.", reference_image)
        want = pipe.nexus_gen_decoder(out.target[None], [1, 18, 18], out.reference[None], [1, 6, 8])
    torch.testing.assert_close(pos_txt, want, atol=1e-6, rtol=0)
    assert pos_txt.shape == (1, 81 + 12, 24)
    grid = pipe.latent_grid(SIZE, SIZE)
    torch.testing.assert_close(pos_ids, editing_text_ids((2 * grid[0], 2 * grid[1]), (1, 18, 18), (1, 6, 8), 1))
    assert neg_txt.shape == (1, SEQ, 24)
    with pytest.raises(PipelineInputError, match="generation_decoder"):
        run(pipe, "a cat")


def test_without_the_plugin_the_arguments_name_the_distribution(repo: Any) -> None:
    pipe = pipeline(repo, runtime=Runtime(env={"DIFFSTUDIO_DISABLED_PLUGINS": "nexus_gen"}))
    with pytest.raises(MissingPluginError, match="diffstudio-nexus-gen") as info:
        pipe("a cat", height=SIZE, width=SIZE, nexus_gen_reference_image=_image())
    assert info.value.distribution == "diffstudio-nexus-gen"


def test_the_plugin_shows_in_diffstudio_plugins() -> None:
    statuses = {s.name: s for s in Runtime().statuses}
    assert "nexus_gen" in statuses and statuses["nexus_gen"].distribution.startswith("diffstudio-nexus-gen")


def test_without_the_ar_model_the_reference_argument_says_what_to_load(repo: Any) -> None:
    with pytest.raises(PipelineInputError, match="Nexus-Gen AR model is not loaded"):
        pipeline(repo)("a cat", height=SIZE, width=SIZE, num_inference_steps=1, nexus_gen_reference_image=_image())
