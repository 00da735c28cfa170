"""The face pipeline's deterministic parts, and the optional detector.

* :func:`similarity_transform`: the 5-point similarity (Umeyama, with scaling) that maps detected keypoints to the
  ArcFace template (InsightFace's ``norm_crop``: ``estimate_norm`` + ``warpAffine``); :func:`align_face` warps the
  image with it (bilinear, black outside) to a ``112 x 112`` crop, channel order kept (InfiniteYou feeds BGR).
* :func:`draw_keypoints`: InfiniteYou's keypoint control image (InstantID's ``draw_kps``): four limbs from the
  eyes and mouth corners to the nose as filled ellipses at 60 % colour, then a filled circle (radius 10) per point.
* :func:`resize_and_pad`: the control photo fitted into ``(W, H)`` on white, as InfiniteYou prepares it.
* :class:`FaceDetector`: InsightFace antelopev2's SCRFD (``pip install diffstudio-infiniteyou[face]``), from a
  folder the user gives; the largest face wins; detection sizes 640, then 320, then 160.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from diffstudio.errors import CheckpointError, MissingPluginError, PipelineInputError
from PIL import Image, ImageDraw

ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)
"""Where the ArcFace 112 x 112 crop puts the left eye, right eye, nose tip, left and right mouth corners (x, y)."""

KEYPOINT_COLOURS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255))
"""RGB colour of each of the 5 keypoints in the control image."""

DETECTION_SIZES = (640, 320, 160)
"""Detector input sizes tried in turn until a face is found (InfiniteYou's fallback)."""


class NoFaceError(PipelineInputError):
    """No face was found in an image that needs one (the identity photo or a keypoint control photo)."""


class FaceStackError(CheckpointError):
    """A face model (detector or recognition weights) is missing: the message says which file to pass."""


def keypoints_array(keypoints: Any, where: str) -> np.ndarray:
    """``(5, 2)`` float64 keypoints (x, y) from any nested sequence.

    Raises:
        PipelineInputError: Not 5 finite points.
    """
    try:
        points = np.asarray(keypoints, dtype=np.float64).reshape(-1, 2)
    except (TypeError, ValueError) as exc:
        raise PipelineInputError(f"{where} must be 5 (x, y) points, got {keypoints!r:.80}") from exc
    if points.shape != (5, 2) or not np.isfinite(points).all():
        raise PipelineInputError(
            f"{where} must be 5 finite (x, y) points (eyes, nose, mouth corners), got shape {points.shape}"
        )
    return points


def similarity_transform(source: np.ndarray, target: np.ndarray = ARCFACE_TEMPLATE) -> np.ndarray:
    """The least-squares similarity (rotation, uniform scale, translation) mapping ``source`` onto ``target``.

    Umeyama's closed form (1991), as ``skimage.transform.SimilarityTransform.estimate`` computes it.

    Args:
        source: Points ``(N, 2)``.
        target: Points ``(N, 2)`` (default: the ArcFace template).

    Returns:
        The ``(2, 3)`` affine matrix ``[s R | t]``.
    """
    src, dst = np.asarray(source, np.float64), np.asarray(target, np.float64)
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    covariance = dst_c.T @ src_c / len(src)
    d = np.ones(2)
    if np.linalg.det(covariance) < 0:
        d[1] = -1
    u, s, vt = np.linalg.svd(covariance)
    rank = np.linalg.matrix_rank(covariance)
    if rank == 0:
        raise PipelineInputError("the face keypoints are all the same point; they cannot be aligned")
    if rank == 1 and np.linalg.det(u) * np.linalg.det(vt) <= 0:  # degenerate (collinear) points
        rotation = u @ np.diag([1.0, -1.0]) @ vt
    elif rank == 1:
        rotation = u @ vt
    else:
        rotation = u @ np.diag(d) @ vt
    scale = (s @ d) / src_c.var(axis=0).sum()
    matrix = np.zeros((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = dst_mean - scale * rotation @ src_mean
    return matrix


def warp_affine(image: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """Bilinear warp of ``image (H, W, C)`` uint8 by the forward ``(2, 3)`` affine ``matrix`` to ``(size, size, C)``.

    Each output pixel samples the source at the inverse-mapped position; outside the image reads as 0 (black),
    as ``cv2.warpAffine`` with its default border. The result is rounded to uint8.
    """
    forward = np.vstack([matrix, [0.0, 0.0, 1.0]])
    inverse = np.linalg.inv(forward)[:2]
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    sx = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]
    sy = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]
    x0, y0 = np.floor(sx).astype(np.int64), np.floor(sy).astype(np.int64)
    fx, fy = (sx - x0)[..., None], (sy - y0)[..., None]
    src = image.astype(np.float64)
    h, w = image.shape[:2]

    def sample(yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        inside = ((xx >= 0) & (xx < w) & (yy >= 0) & (yy < h))[..., None]
        return np.where(inside, src[np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)], 0.0)

    top = sample(y0, x0) * (1 - fx) + sample(y0, x0 + 1) * fx
    bottom = sample(y0 + 1, x0) * (1 - fx) + sample(y0 + 1, x0 + 1) * fx
    return np.clip(np.rint(top * (1 - fy) + bottom * fy), 0, 255).astype(np.uint8)


def align_face(image: np.ndarray, keypoints: Any, size: int = 112) -> np.ndarray:
    """The ArcFace crop ``(size, size, C)`` uint8 of ``image (H, W, C)`` (channels kept) at ``keypoints (5, 2)``."""
    points = keypoints_array(keypoints, "the face keypoints")
    matrix = similarity_transform(points, ARCFACE_TEMPLATE * (size / 112.0))
    return warp_affine(image, matrix, size)


def crop_tensor(crop: np.ndarray) -> Any:
    """An aligned uint8 crop ``(112, 112, 3)`` -> the embedder's input ``(1, 3, 112, 112)`` in ``[-1, 1]``."""
    import torch

    return torch.from_numpy(crop.astype(np.float32)).permute(2, 0, 1)[None] / 255.0 * 2 - 1


def _ellipse_polygon(centre: tuple[int, int], axes: tuple[int, int], angle: int) -> list[tuple[int, int]]:
    """Integer polygon of an ellipse, one vertex per degree (what ``cv2.ellipse2Poly(..., 0, 360, 1)`` returns)."""
    cx, cy = centre
    a, b = axes
    rad = math.radians(angle)
    cos_a, sin_a = math.cos(rad), math.sin(rad)
    points: list[tuple[int, int]] = []
    for deg in range(0, 361):
        t = math.radians(deg)
        x, y = a * math.cos(t), b * math.sin(t)
        point = (round(cx + x * cos_a - y * sin_a), round(cy + x * sin_a + y * cos_a))
        if not points or point != points[-1]:
            points.append(point)
    return points


def draw_keypoints(size: tuple[int, int], keypoints: Any) -> Image.Image:
    """InfiniteYou's keypoint control image of ``size (W, H)``: limbs to the nose at 60 % colour, then the points.

    Args:
        size: ``(width, height)`` of the control image (the generated size).
        keypoints: 5 points (x, y): left eye, right eye, nose, left and right mouth corners.
    """
    points = keypoints_array(keypoints, "the face keypoints")
    limbs = Image.new("RGB", size, (0, 0, 0))
    pen = ImageDraw.Draw(limbs)
    for a in (0, 1, 3, 4):  # eyes and mouth corners, each joined to the nose (point 2)
        (x0, y0), (x1, y1) = points[a], points[2]
        length = math.hypot(x0 - x1, y0 - y1)
        angle = math.degrees(math.atan2(y0 - y1, x0 - x1))
        centre = (int((x0 + x1) / 2), int((y0 + y1) / 2))
        pen.polygon(_ellipse_polygon(centre, (int(length / 2), 4), int(angle)), fill=KEYPOINT_COLOURS[a])
    out = Image.fromarray((np.asarray(limbs, dtype=np.float64) * 0.6).astype(np.uint8))
    pen = ImageDraw.Draw(out)
    for (x, y), colour in zip(points, KEYPOINT_COLOURS):
        cx, cy = int(x), int(y)
        pen.ellipse((cx - 10, cy - 10, cx + 10, cy + 10), fill=colour)
    return out


def resize_and_pad(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Fit ``image`` to ``size (W, H)`` along the target's shorter side (Lanczos), centred on white."""
    width, height = size
    if width <= height:
        new = (width, int(width * image.size[1] / image.size[0]))
    else:
        new = (int(height * image.size[0] / image.size[1]), height)
    canvas = Image.new("RGB", size, (255, 255, 255))
    canvas.paste(image.convert("RGB").resize(new, Image.Resampling.LANCZOS),
                 ((width - new[0]) // 2, (height - new[1]) // 2))  # fmt: skip
    return canvas


@dataclass(frozen=True)
class Face:
    """A detected face: box ``(x0, y0, x1, y1)`` and 5 keypoints ``(5, 2)``, in pixels of the image."""

    box: tuple[float, float, float, float]
    keypoints: np.ndarray

    @property
    def area(self) -> float:
        """Box area in pixels."""
        return max(self.box[2] - self.box[0], 0.0) * max(self.box[3] - self.box[1], 0.0)


def largest_face(faces: Sequence[Face], where: str) -> Face:
    """The face with the largest box.

    Raises:
        NoFaceError: No face.
    """
    if not faces:
        raise NoFaceError(
            f"no face was detected in {where}; pass a photo with a visible face, or precomputed "
            "infinityou_id_embedding / keypoints"
        )
    return max(faces, key=lambda face: face.area)


class FaceDetector:
    """InsightFace antelopev2's SCRFD detector from a local folder (lazy; CPU through onnxruntime).

    Args:
        root: The folder that holds ``models/antelopev2/*.onnx`` (InfiniteYou ships it as
            ``supports/insightface``), or the ``antelopev2`` folder itself.

    Raises:
        MissingPluginError: insightface / onnxruntime are not installed (``pip install diffstudio-infiniteyou[face]``).
        FaceStackError: The folder has no antelopev2 detector.
    """

    def __init__(self, root: str | Path) -> None:
        folder = Path(root)
        if folder.name == "antelopev2":
            folder = folder.parent.parent
        detector = folder / "models" / "antelopev2"
        if not any(detector.glob("scrfd*.onnx")):
            raise FaceStackError(
                f"no antelopev2 face detector in {detector} (scrfd_10g_bnkps.onnx); pass the folder that holds "
                "models/antelopev2 (InfiniteYou's supports/insightface), or pass infinityou_id_embedding instead"
            )
        try:
            from insightface.app import FaceAnalysis
        except ImportError as exc:
            raise MissingPluginError("Face detection (infinityou_id_image)", "diffstudio-infiniteyou[face]") from exc
        self.apps: list[Any] = []
        for side in DETECTION_SIZES:
            app = FaceAnalysis(name="antelopev2", root=str(folder), providers=["CPUExecutionProvider"],
                               allowed_modules=["detection"])  # fmt: skip
            app.prepare(ctx_id=-1, det_size=(side, side))
            self.apps.append(app)

    def detect(self, image: Image.Image, where: str) -> Face:
        """The largest face of an RGB image (detection runs on BGR, as InsightFace expects).

        Raises:
            NoFaceError: None at any detection size.
        """
        bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
        for app in self.apps:
            found = app.get(bgr)
            if found:
                faces = [Face(tuple(float(v) for v in f["bbox"]), np.asarray(f["kps"], np.float64)) for f in found]
                return largest_face(faces, where)
        return largest_face([], where)
