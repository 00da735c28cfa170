"""infinityou_* arguments on FluxImagePipeline: the identity changes the image, a photo with keypoints equals its
embedding, a plain ControlNet works beside the InfuseNet, and every misuse is a typed error."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import torch
from diffstudio import ModelConfig
from diffstudio.cli import main as cli
from diffstudio.errors import MissingPluginError, PipelineInputError
from diffstudio.runtime import Runtime
from diffstudio_controlnet import ControlNetInput
from diffstudio_flux1.pipeline import FluxImagePipeline
from diffstudio_infiniteyou import ARCFACE_TEMPLATE, FaceStackError, draw_keypoints
from diffstudio_infiniteyou.face import align_face, crop_tensor
from PIL import Image

H, W, SEQ = 32, 48, 16
PROMPT = "a portrait photo"
ARGS: dict[str, Any] = {"height": H, "width": W, "num_inference_steps": 2, "seed": 1, "output_type": "latent",
                        "t5_sequence_length": SEQ}  # fmt: skip


def pipeline(repo: Any, *extra: Any, runtime: Runtime | None = None) -> FluxImagePipeline:
    root = repo.root
    parts = [root / "transformer", root / "text_encoder", root / "text_encoder_2", root / "vae", *extra]
    pipe = FluxImagePipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu", model_configs=[ModelConfig(path=str(p)) for p in parts],
        runtime=runtime or Runtime(),
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe(repo: Any, files: Any) -> FluxImagePipeline:
    return pipeline(repo, files.infusenet_folder, files.projector_file, files.arcface_file)


def _embedding(seed: int) -> torch.Tensor:
    e = torch.randn(512, generator=torch.Generator().manual_seed(seed))
    return e / e.norm()


def test_the_identity_embedding_and_guidance_change_the_image(pipe: FluxImagePipeline) -> None:
    base = pipe(PROMPT, **ARGS)
    first = pipe(PROMPT, infinityou_id_embedding=_embedding(0), **ARGS)
    again = pipe(PROMPT, infinityou_id_embedding=_embedding(0).tolist(), infinityou_guidance=1.0, **ARGS)
    other = pipe(PROMPT, infinityou_id_embedding=_embedding(1), **ARGS)
    guided = pipe(PROMPT, infinityou_id_embedding=_embedding(0), infinityou_guidance=3.0, **ARGS)
    assert torch.equal(first, again) and (first - base).abs().max() > 1e-4
    assert (other - first).abs().max() > 1e-5 and (guided - first).abs().max() > 1e-5
    off = pipe(PROMPT, infinityou_id_embedding=_embedding(0), controlnet_inputs=[
        ControlNetInput(Image.new("RGB", (W, H)), start=0.2, end=0.1)], **ARGS)  # fmt: skip
    assert torch.equal(off, base)  # no step in its range: the InfuseNet never acts
    drawn = draw_keypoints((W, H), [[15, 10], [30, 10], [22, 16], [16, 24], [29, 24]])
    kps = pipe(PROMPT, infinityou_id_embedding=_embedding(0), controlnet_inputs=[ControlNetInput(drawn)], **ARGS)
    assert (kps - first).abs().max() > 1e-5  # the keypoint control image reaches the InfuseNet
    cfg = pipe(PROMPT, infinityou_id_embedding=_embedding(0), cfg_scale=2.0, negative_prompt="blurry", **ARGS)
    assert cfg.shape == first.shape


def test_a_photo_with_keypoints_equals_its_precomputed_embedding(pipe: FluxImagePipeline, files: Any) -> None:
    rng = np.random.default_rng(3)
    photo = Image.fromarray(rng.integers(0, 255, (H * 4, W * 4, 3), dtype=np.uint8))
    keypoints = ARCFACE_TEMPLATE * 1.3 + np.array([40.0, 20.0])
    from_photo = pipe(PROMPT, infinityou_id_image=photo, infinityou_id_keypoints=keypoints.tolist(), **ARGS)
    bgr = np.asarray(photo)[:, :, ::-1]
    with torch.no_grad():
        embedding = files.arcface(crop_tensor(align_face(bgr, keypoints)))[0]
    assert torch.equal(from_photo, pipe(PROMPT, infinityou_id_embedding=embedding, **ARGS))


def test_a_plain_controlnet_and_the_infusenet_work_together(
    repo: Any, files: Any, plain_controlnet: Any, fp: Any
) -> None:
    both = pipeline(repo, plain_controlnet, files.infusenet_folder, files.projector_file)
    assert both.loaded["controlnet"].claim.plugin == "controlnet" and both.has("infuse_net")
    edges, face = fp.image(W, H, seed=4), Image.new("RGB", (W, H))
    plain_only = both(PROMPT, controlnet_inputs=[ControlNetInput(edges)], **ARGS)
    identity_only = both(PROMPT, infinityou_id_embedding=_embedding(0), **ARGS)
    inputs = [ControlNetInput(edges), ControlNetInput(face, controlnet_id=1)]  # the InfuseNet comes after the nets
    together = both(PROMPT, infinityou_id_embedding=_embedding(0), controlnet_inputs=inputs, **ARGS)
    assert (together - plain_only).abs().max() > 1e-5 and (together - identity_only).abs().max() > 1e-5
    with pytest.raises(PipelineInputError, match="no ControlNet is loaded"):  # id 0 is the InfuseNet without one
        pipeline(repo, files.infusenet_folder, files.projector_file)(
            PROMPT, infinityou_id_embedding=_embedding(0), controlnet_inputs=[ControlNetInput(face, controlnet_id=1)],
            **ARGS)  # fmt: skip


def test_misuse_is_a_typed_error(pipe: FluxImagePipeline, repo: Any, files: Any) -> None:
    photo = Image.new("RGB", (64, 64))
    with pytest.raises(FaceStackError, match="infinityou_face_detector"):
        pipe(PROMPT, infinityou_id_image=photo, **ARGS)
    with pytest.raises(PipelineInputError, match="512 finite numbers"):
        pipe(PROMPT, infinityou_id_embedding=[0.1] * 20, **ARGS)
    with pytest.raises(PipelineInputError, match="not both"):
        pipe(PROMPT, infinityou_id_image=photo, infinityou_id_embedding=_embedding(0), **ARGS)
    with pytest.raises(PipelineInputError, match="infinityou_id_keypoints must be 5"):
        pipe(PROMPT, infinityou_id_image=photo, infinityou_id_keypoints=[[1, 2]], **ARGS)
    no_arcface = pipeline(repo, files.infusenet_folder, files.projector_file)
    with pytest.raises(FaceStackError, match="recognition_arcface_ir_se50.pth"):
        no_arcface(PROMPT, infinityou_id_image=photo, infinityou_id_keypoints=ARCFACE_TEMPLATE.tolist(), **ARGS)
    no_net = pipeline(repo, files.projector_file)
    with pytest.raises(PipelineInputError, match="no infuse_net is loaded"):
        no_net(PROMPT, infinityou_id_embedding=_embedding(0), **ARGS)


def test_without_the_plugin_the_arguments_name_the_distribution(repo: Any, capsys: Any) -> None:
    blocked = pipeline(repo, runtime=Runtime(env={"DIFFSTUDIO_DISABLED_PLUGINS": "infiniteyou"}))
    for name, value in (("infinityou_id_embedding", _embedding(0)), ("infinityou_guidance", 1.0),
                        ("infinityou_id_image", Image.new("RGB", (8, 8)))):  # fmt: skip
        with pytest.raises(MissingPluginError, match="diffstudio-infiniteyou") as info:
            blocked(PROMPT, **{name: value}, **ARGS)
        assert info.value.distribution == "diffstudio-infiniteyou"
    assert cli(["plugins", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    row = next(r for r in (rows if isinstance(rows, list) else rows["plugins"]) if r["name"] == "infiniteyou")
    assert "diffstudio-infiniteyou" in json.dumps(row) and "pipeline_unit" in json.dumps(row)
