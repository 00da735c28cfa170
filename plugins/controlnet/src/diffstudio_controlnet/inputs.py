"""``ControlNetInput``: one control image for one ControlNet, as the seed's ``controlnet_inputs`` list holds.

Items of ``controlnet_inputs`` may be ``ControlNetInput`` objects or plain mappings with the same field names
(what a training metadata file's JSON column decodes to); ``image`` / ``inpaint_mask`` may be PIL images or
paths to image files.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from diffstudio.errors import PipelineInputError
from PIL import Image

UNION_MODES: dict[str, int] = {
    "canny": 0,
    "tile": 1,
    "depth": 2,
    "blur": 3,
    "pose": 4,
    "gray": 5,
    "lq": 6,
    "low_quality": 6,
}
"""InstantX FLUX.1-dev-Controlnet-Union mode ids by name (``processor_id``)."""


@dataclass
class ControlNetInput:
    """One ControlNet condition.

    Attributes:
        image: The control image (PIL, or a path). It is resized to the generated size when it differs (with a
            ``ControlImageResizedWarning``): an upscaler gets the low-resolution picture this way.
        scale: Factor on the ControlNet's residuals.
        processor_id: For Union ControlNets, the mode: a name of :data:`UNION_MODES` (``"canny"``, ``"depth"``,
            ...) or an integer id. The image is used as given (no annotator runs): pass the canny edges, the
            depth map, ... Ignored by single-purpose ControlNets.
        start: Progress (1 at the first step, 0 at the last) at which the ControlNet starts acting.
        end: Progress after which it stops (it acts while ``end <= progress <= start``).
        inpaint_mask: For inpainting ControlNets (alimama): white where the image is repainted.
        controlnet_id: Which ControlNet, when the ``controlnet`` slot holds a :class:`ControlNetGroup`.
    """

    image: Any = None
    scale: float = 1.0
    processor_id: str | int | None = None
    start: float = 1.0
    end: float = 0.0
    inpaint_mask: Any = None
    controlnet_id: int = 0

    def mode_id(self, where: str) -> int | None:
        """The Union mode id of ``processor_id`` (None when not given).

        Raises:
            PipelineInputError: An unknown mode name.
        """
        if self.processor_id is None:
            return None
        if isinstance(self.processor_id, int):
            return self.processor_id
        name = str(self.processor_id).lower()
        if name not in UNION_MODES:
            raise PipelineInputError(
                f"{where}.processor_id={self.processor_id!r} is not a Union mode; use one of "
                f"{sorted(UNION_MODES)} or an integer mode id"
            )
        return UNION_MODES[name]


def _image(value: Any, where: str, mode: str) -> Image.Image | None:
    if value is None:
        return None
    if isinstance(value, (str, Path)):
        path = Path(value)
        if not path.is_file():
            raise PipelineInputError(f"{where}: the file {path} does not exist")
        with Image.open(path) as opened:
            return opened.convert(mode)
    if not isinstance(value, Image.Image):
        raise PipelineInputError(f"{where} must be a PIL image or a path, got {type(value).__name__}")
    return value


def as_controlnet_inputs(value: Any) -> list[ControlNetInput]:
    """Normalise ``controlnet_inputs`` (a list of ``ControlNetInput`` or mappings) and open image paths.

    Raises:
        PipelineInputError: Not a list, an item of the wrong type, unknown fields, a missing image or bad numbers.
    """
    if isinstance(value, (ControlNetInput, Mapping)):
        value = [value]
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise PipelineInputError(f"controlnet_inputs must be a list of ControlNetInput, got {type(value).__name__}")
    known = {f.name for f in fields(ControlNetInput)}
    out = []
    for i, item in enumerate(value):
        where = f"controlnet_inputs[{i}]"
        if isinstance(item, Mapping):
            unknown = sorted(set(item) - known)
            if unknown:
                raise PipelineInputError(f"{where} has unknown fields {unknown}; fields: {sorted(known)}")
            item = ControlNetInput(**item)
        if not isinstance(item, ControlNetInput):
            raise PipelineInputError(f"{where} must be a ControlNetInput (or a mapping), got {type(item).__name__}")
        image = _image(item.image, f"{where}.image", "RGB")
        if image is None:
            raise PipelineInputError(f"{where}.image is missing: every ControlNet input needs a control image")
        mask = _image(item.inpaint_mask, f"{where}.inpaint_mask", "L")
        if not 0.0 <= float(item.end) <= float(item.start) <= 1.0:
            raise PipelineInputError(f"{where}: need 0 <= end <= start <= 1, got start={item.start}, end={item.end}")
        out.append(ControlNetInput(image, float(item.scale), item.processor_id, float(item.start), float(item.end),
                                   mask, int(item.controlnet_id)))  # fmt: skip
    return out
