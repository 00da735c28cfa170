"""The image projector equals the published Resampler (transcribed below) and loads from the published pickle only
through the pickle policy; the face alignment equals a least-squares similarity computed here; the IR-SE ArcFace
equals facexlib's backbone (transcribed below); keypoints are drawn as InfiniteYou draws them."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffstudio.errors import PickleRefusedError
from diffstudio_infiniteyou import ARCFACE_TEMPLATE, align_face, draw_keypoints, load_file, similarity_transform
from diffstudio_infiniteyou.face import NoFaceError, largest_face, resize_and_pad, warp_affine
from torch import Tensor, nn

# ---------------------------------------------------------------------------------------------------------------
# oracle 1: InfiniteYou's pipelines/resampler.py (IP-Adapter-Plus perceiver), transcribed
# ---------------------------------------------------------------------------------------------------------------


class OracleAttention(nn.Module):
    def __init__(self, dim: int, dim_head: int, heads: int) -> None:
        super().__init__()
        self.dim_head, self.heads = dim_head, heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim_head * heads, bias=False)
        self.to_kv = nn.Linear(dim, dim_head * heads * 2, bias=False)
        self.to_out = nn.Linear(dim_head * heads, dim, bias=False)

    def forward(self, x: Tensor, latents: Tensor) -> Tensor:
        x, latents = self.norm1(x), self.norm2(latents)
        b, n, _ = latents.shape
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat((x, latents), dim=-2)).chunk(2, dim=-1)

        def split(t: Tensor) -> Tensor:
            return t.view(b, t.shape[1], self.heads, -1).transpose(1, 2).reshape(b, self.heads, t.shape[1], -1)

        q, k, v = split(q), split(k), split(v)
        s = 1 / math.sqrt(math.sqrt(self.dim_head))
        w = torch.softmax(((q * s) @ (k * s).transpose(-2, -1)).float(), dim=-1).type(q.dtype)
        return self.to_out((w @ v).permute(0, 2, 1, 3).reshape(b, n, -1))


class OracleResampler(nn.Module):
    def __init__(self, dim: int, depth: int, dim_head: int, heads: int, num_queries: int, embedding_dim: int,
                 output_dim: int, ff_mult: float) -> None:  # fmt: skip
        super().__init__()
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) / dim**0.5)
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        inner = int(dim * ff_mult)
        self.layers = nn.ModuleList(
            nn.ModuleList([OracleAttention(dim, dim_head, heads),
                           nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(),
                                         nn.Linear(inner, dim, bias=False))])  # fmt: skip
            for _ in range(depth)
        )

    def forward(self, x: Tensor) -> Tensor:
        latents = self.latents.repeat(x.size(0), 1, 1)
        x = self.proj_in(x)
        for attn, ff in self.layers:  # type: ignore[misc]
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


def test_projector_equals_the_published_resampler_and_loads_only_through_the_pickle_policy(files: Any, fx: Any) -> None:
    import dataclasses

    state = torch.load(files.projector_bin, weights_only=True)["image_proj"]
    oracle = OracleResampler(**dataclasses.asdict(files.projector.params)).eval()
    oracle.load_state_dict(state)
    with pytest.raises(PickleRefusedError, match="diffstudio convert"):
        load_file(files.projector_bin)
    slot, from_bin = load_file(files.projector_bin, allow_pickle=True)
    converted_slot, converted = load_file(files.projector_file)
    assert slot == converted_slot == "image_proj"
    assert from_bin.params.heads == 2 and from_bin.params.depth == 2 and from_bin.params.output_dim == fx.T5_HIDDEN
    x = torch.randn(3, 1, 512, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got, again = oracle(x), from_bin(x), converted(x)
    diff = (expected - got).abs().max().item()
    print(f"Resampler max diff {diff:.2e}")
    assert got.shape == (3, 8, fx.T5_HIDDEN) and diff <= 1e-5 and torch.equal(got, again)


# ---------------------------------------------------------------------------------------------------------------
# oracle 2: facexlib's IR-SE backbone (recognition/arcface_arch.py), transcribed with configurable stage lengths
# ---------------------------------------------------------------------------------------------------------------


class OracleSE(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(c, c // 16, kernel_size=1, padding=0, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(c // 16, c, kernel_size=1, padding=0, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        return x * self.sigmoid(self.fc2(self.relu(self.fc1(self.avg_pool(x)))))


class OracleUnit(nn.Module):
    def __init__(self, cin: int, depth: int, stride: int) -> None:
        super().__init__()
        self.shortcut_layer = (nn.MaxPool2d(1, stride) if cin == depth else
                               nn.Sequential(nn.Conv2d(cin, depth, (1, 1), stride, bias=False), nn.BatchNorm2d(depth)))
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(cin), nn.Conv2d(cin, depth, (3, 3), (1, 1), 1, bias=False), nn.PReLU(depth),
            nn.Conv2d(depth, depth, (3, 3), stride, 1, bias=False), nn.BatchNorm2d(depth), OracleSE(depth))

    def forward(self, x: Tensor) -> Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class OracleFlatten(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.view(x.size(0), -1)


class OracleBackbone(nn.Module):
    def __init__(self, units: tuple[int, ...]) -> None:
        super().__init__()
        self.input_layer = nn.Sequential(nn.Conv2d(3, 64, (3, 3), 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64))
        self.output_layer = nn.Sequential(nn.BatchNorm2d(512), nn.Dropout(0.6), OracleFlatten(),
                                          nn.Linear(512 * 7 * 7, 512), nn.BatchNorm1d(512))  # fmt: skip
        blocks = []
        for cin, depth, n in zip((64, 64, 128, 256), (64, 128, 256, 512), units):
            blocks += [OracleUnit(cin, depth, 2)] + [OracleUnit(depth, depth, 1) for _ in range(n - 1)]
        self.body = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        x = self.output_layer(self.body(self.input_layer(x)))
        return torch.div(x, torch.norm(x, 2, 1, True))


def test_ir_se_arcface_equals_the_facexlib_backbone_and_loads_by_key(files: Any, tmp_path: Path) -> None:
    from diffstudio_infiniteyou.arcface import IR_SE50_UNITS, ArcFaceIRSE

    oracle = OracleBackbone((1, 1, 1, 1)).eval()
    oracle.load_state_dict(files.arcface.state_dict())  # our names are facexlib's, tensor for tensor
    slot, model = load_file(files.arcface_file)
    assert slot == "face_recognition" and model.units == (1, 1, 1, 1)
    crops = torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        expected, got = oracle(crops), model(crops)
    diff = (expected - got).abs().max().item()
    print(f"IR-SE ArcFace max diff {diff:.2e}")
    assert diff <= 1e-5 and torch.allclose(got.norm(dim=1), torch.ones(2))
    full = ArcFaceIRSE()  # the published IR-SE50 layout: 3 + 4 + 14 + 3 units, the names of its .pth
    assert ArcFaceIRSE.units_from_keys(list(full.state_dict())) == IR_SE50_UNITS
    assert set(full.state_dict()) == set(OracleBackbone(IR_SE50_UNITS).state_dict())
    torch.save(files.arcface.state_dict(), tmp_path / "recognition_arcface_ir_se50.pth")
    with pytest.raises(PickleRefusedError, match="diffstudio convert"):
        load_file(tmp_path / "recognition_arcface_ir_se50.pth")


# ---------------------------------------------------------------------------------------------------------------
# alignment and keypoints
# ---------------------------------------------------------------------------------------------------------------


def _least_squares_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """x' = a x - b y + tx, y' = b x + a y + ty solved as a linear least-squares problem (the reference)."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(src, dst):
        rows += [[x, -y, 1, 0], [y, x, 0, 1]]
        rhs += [u, v]
    a, b, tx, ty = np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)[0]
    return np.array([[a, -b, tx], [b, a, ty]])


def test_alignment_equals_the_least_squares_similarity_to_the_arcface_template() -> None:
    rng = np.random.default_rng(0)
    angle, scale = 0.3, 2.7
    rotation = scale * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    detected = ARCFACE_TEMPLATE @ rotation.T + np.array([140.0, 95.0]) + rng.normal(0, 1.5, (5, 2))
    ours = similarity_transform(detected)
    reference = _least_squares_similarity(detected, ARCFACE_TEMPLATE)
    mapped = detected @ ours[:, :2].T + ours[:, 2]
    expected = detected @ reference[:, :2].T + reference[:, 2]
    print(f"alignment max diff {np.abs(mapped - expected).max():.2e} px")
    assert np.abs(mapped - expected).max() <= 1e-4 and np.abs(ours - reference).max() <= 1e-6
    exact = similarity_transform(ARCFACE_TEMPLATE @ rotation.T + 5.0)  # noiseless: the inverse, exactly
    assert np.abs((ARCFACE_TEMPLATE @ rotation.T + 5.0) @ exact[:, :2].T + exact[:, 2] - ARCFACE_TEMPLATE).max() < 1e-9


def test_the_crop_keeps_channel_order_and_samples_bilinearly() -> None:
    image = np.zeros((400, 400, 3), np.uint8)
    image[..., 0] = 200  # a "blue" channel first, as BGR: it must stay first
    image[60:140, 80:160, 1] = 255
    angle, scale, shift = -0.2, 1.6, np.array([120.0, 120.0])
    rotation = scale * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    keypoints = ARCFACE_TEMPLATE @ rotation.T + shift
    crop = align_face(image, keypoints)
    assert crop.shape == (112, 112, 3) and (crop[..., 0] == 200).mean() > 0.9 and crop[..., 2].max() == 0
    matrix = similarity_transform(keypoints)
    inverse = np.linalg.inv(np.vstack([matrix, [0, 0, 1]]))
    gradient = np.rint(np.fromfunction(lambda y, x, c: 0.25 * x + 0.3 * y + c, (400, 400, 3))).astype(np.uint8)
    warped = warp_affine(gradient, matrix, 112)
    for x, y in ((10, 20), (55, 71), (100, 3)):  # a (nearly) linear image is reproduced by bilinear sampling
        sx, sy = inverse[:2] @ np.array([x, y, 1.0])
        assert abs(int(warped[y, x, 0]) - (0.25 * sx + 0.3 * sy)) <= 1.0


def test_keypoints_are_drawn_as_infiniteyou_draws_them() -> None:
    points = [[40, 50], [90, 50], [65, 80], [45, 110], [85, 110]]
    image = np.asarray(draw_keypoints((128, 160), points))
    assert image.shape == (160, 128, 3)
    assert tuple(image[50, 40]) == (255, 0, 0) and tuple(image[80, 65]) == (0, 0, 255)  # points: full colour
    assert tuple(image[110, 85]) == (255, 0, 255) and tuple(image[5, 5]) == (0, 0, 0)
    assert tuple(image[65, 52]) == (153, 0, 0)  # the limb from the left eye to the nose, at 60 %
    from PIL import Image

    padded = resize_and_pad(Image.new("RGB", (100, 50), (0, 0, 0)), (128, 160))  # to 128 x 64, centred on white
    assert padded.size == (128, 160) and padded.getpixel((2, 40)) == (255, 255, 255) == padded.getpixel((2, 112))
    assert padded.getpixel((2, 48)) == (0, 0, 0) == padded.getpixel((127, 111))


def test_an_image_without_a_face_is_a_typed_error() -> None:
    with pytest.raises(NoFaceError, match="no face was detected in infinityou_id_image"):
        largest_face([], "infinityou_id_image")


def test_the_face_detector_runs_when_the_face_extra_is_installed(tmp_path: Path) -> None:
    pytest.importorskip("insightface")
    pytest.importorskip("onnxruntime")
    from diffstudio_infiniteyou import FaceDetector, FaceStackError

    with pytest.raises(FaceStackError, match="antelopev2"):
        FaceDetector(tmp_path)
