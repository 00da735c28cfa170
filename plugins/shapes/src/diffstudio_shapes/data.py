"""The procedural shapes data set: specs, captions, rendering, the held-out split and the on-disk writer.

Every image shows one filled shape of one palette colour on a plain background of another palette colour. A
:class:`ShapeSpec` holds the words of the caption and the exact geometry; geometry is stored as fractions of the
image side, so one spec renders at any resolution (``spec.pixels(size)`` gives pixel values). Where a shape goes
and how large it is follows a layout (:mod:`diffstudio_shapes.layouts`: ``anchored`` by default, ``scattered``).

Everything here is deterministic: spec ``i`` of ``sample_specs(count, seed, ...)`` depends only on the seed, the
layout, the split, the shape list, the rates and ``i`` (not on ``count``), so a larger data set extends a smaller
one.
No torch here: this module must stay importable without it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from diffstudio.errors import ConfigError
from PIL import Image, ImageDraw

from diffstudio_shapes.geometry import unit_outline
from diffstudio_shapes.layouts import (
    DEFAULT_ROTATION_JITTERS,
    LAYOUTS,
    MAX_POSITION_JITTER,
    POSITION_JITTER,
    SEED_PREFIXES,
    place,
)

#: Shapes of the base data set (what the embedded model is trained on).
BASE_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
#: Concepts kept out of the base data (used to test teaching the model a new concept, e.g. with a LoRA).
NEW_SHAPES: tuple[str, ...] = ("zigzag",)
ALL_SHAPES: tuple[str, ...] = BASE_SHAPES + NEW_SHAPES

#: Named colours with fixed sRGB values; the order is part of the held-out rule (indices), never reorder.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (30, 70, 220),
    "yellow": (245, 220, 30),
    "purple": (140, 50, 190),
    "orange": (250, 130, 10),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)

SIZE_WORDS: tuple[str, ...] = ("small", "large")
POSITION_WORDS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right", "center")
SPLITS: tuple[str, ...] = ("train", "heldout")


_CAPTION_RE = re.compile(
    r"^an? (?:(?P<size>small|large) )?(?P<colour>[a-z]+) (?P<shape>[a-z]+)"
    r"(?: (?:at the (?P<quadrant>top left|top right|bottom left|bottom right)|in the (?P<center>center)))?"
    r" on an? (?P<background>[a-z]+) background$"
)


@dataclass(frozen=True)
class CaptionParts:
    """The words of a caption (what :func:`parse_caption` returns and :func:`~diffstudio_shapes.analyse.score` reads).

    Attributes:
        shape: One of :data:`ALL_SHAPES`.
        colour: The shape's palette colour name.
        background: The background's palette colour name.
        size: ``"small"``, ``"large"`` or None (not named).
        position: One of :data:`POSITION_WORDS` or None (not named).
    """

    shape: str
    colour: str
    background: str
    size: str | None = None
    position: str | None = None


@dataclass(frozen=True)
class ShapeSpec:
    """One image of the data set: caption words plus exact geometry.

    Attributes:
        shape: One of :data:`ALL_SHAPES`.
        colour: The shape's palette colour name.
        background: The background's palette colour name (never the shape's).
        size: ``"small"``, ``"large"`` or None (not in the caption; the radius is then random).
        position: One of :data:`POSITION_WORDS` or None (not in the caption; the centre is then random).
        cx: Centre x as a fraction of the width (0 left, 1 right); the area centroid of the drawn shape.
        cy: Centre y as a fraction of the height (0 top, 1 bottom).
        radius: Fraction of the side: circle radius, square half-side, triangle and star circumradius,
            zigzag half-length.
        rotation: Degrees, clockwise on screen (0 for circles; triangles and stars point up at 0).
    """

    shape: str
    colour: str
    background: str
    size: str | None = None
    position: str | None = None
    cx: float = 0.5
    cy: float = 0.5
    radius: float = 0.25
    rotation: float = 0.0

    def __post_init__(self) -> None:
        if self.shape not in ALL_SHAPES:
            raise ConfigError(f"Unknown shape {self.shape!r}; expected one of {', '.join(ALL_SHAPES)}.")
        for field, value in (("colour", self.colour), ("background", self.background)):
            if value not in PALETTE:
                raise ConfigError(f"Unknown {field} {value!r}; expected one of {', '.join(COLOURS)}.")
        if self.colour == self.background:
            raise ConfigError(f"The shape colour and the background are both {self.colour!r}; they must differ.")
        if self.size is not None and self.size not in SIZE_WORDS:
            raise ConfigError(f"Unknown size word {self.size!r}; expected small, large or None.")
        if self.position is not None and self.position not in POSITION_WORDS:
            raise ConfigError(f"Unknown position {self.position!r}; expected one of {', '.join(POSITION_WORDS)}.")
        if not 0.0 < self.radius < 0.5:
            raise ConfigError(f"radius must be a fraction of the side in (0, 0.5), got {self.radius}.")

    @property
    def caption(self) -> str:
        """The prompt of this image (see :func:`caption`)."""
        return caption(self)

    @property
    def parts(self) -> CaptionParts:
        """The caption words alone."""
        return CaptionParts(self.shape, self.colour, self.background, self.size, self.position)

    def pixels(self, size: int) -> tuple[float, float, float]:
        """Return ``(cx, cy, radius)`` in pixels of a ``size`` x ``size`` image."""
        return self.cx * size, self.cy * size, self.radius * size

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (``ShapeSpec(**d)`` rebuilds it)."""
        return asdict(self)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(spec: ShapeSpec | CaptionParts) -> str:
    """Return the caption of a spec.

    Grammar (fixed): ``ART [SIZE ]COLOUR SHAPE[ at the QUADRANT| in the center] on ART BACKGROUND background``,
    ``ART`` being ``an`` before a vowel and ``a`` otherwise, e.g. "a small red circle at the top left on a blue
    background", "an orange star on a white background".

    Args:
        spec: The spec (or bare caption words).

    Returns:
        The caption text.
    """
    noun = f"{spec.size} {spec.colour}" if spec.size else spec.colour
    text = f"{_article(noun)} {noun} {spec.shape}"
    if spec.position == "center":
        text += " in the center"
    elif spec.position:
        text += f" at the {spec.position}"
    return f"{text} on {_article(spec.background)} {spec.background} background"


def parse_caption(text: str) -> CaptionParts:
    """Parse a caption written by :func:`caption`.

    Args:
        text: The caption.

    Returns:
        Its words.

    Raises:
        ConfigError: The text does not follow the grammar or names unknown words.
    """
    match = _CAPTION_RE.match(text.strip())
    if match is None:
        raise ConfigError(f"Not a shapes caption: {text!r} (expected e.g. 'a small red circle on a blue background').")
    parts = CaptionParts(
        shape=match["shape"],
        colour=match["colour"],
        background=match["background"],
        size=match["size"],
        position=match["quadrant"] or match["center"],
    )
    ShapeSpec(parts.shape, parts.colour, parts.background, parts.size, parts.position)  # validates the words
    if caption(parts) != text.strip():
        raise ConfigError(f"Not a shapes caption: {text!r} (article mismatch; expected {caption(parts)!r}).")
    return parts


# -- held-out split -------------------------------------------------------------------------------------------


def is_heldout(shape: str, colour: str, background: str) -> bool:
    """Whether the (shape, colour, background) combination belongs to the held-out split.

    Rule: with ``s``, ``c``, ``b`` the indices in :data:`ALL_SHAPES` and :data:`COLOURS`, the combination is
    held out iff ``(s + c + 2 * b) % 8 == 0``. For each shape exactly one shape colour per background is held
    out (7 of the 56 colour pairs), and every (shape, colour), (shape, background) and (colour, background) pair
    of a held-out combination still occurs in training, so the held-out captions test composition only.
    """
    s, c, b = ALL_SHAPES.index(shape), COLOURS.index(colour), COLOURS.index(background)
    return (s + c + 2 * b) % len(COLOURS) == 0


def combinations(shapes: Sequence[str] = BASE_SHAPES, split: str = "train") -> list[tuple[str, str, str]]:
    """All (shape, colour, background) combinations of a split, in a fixed order.

    Args:
        shapes: Shapes to include.
        split: ``"train"`` or ``"heldout"``.

    Returns:
        The combinations.
    """
    _check_split(split)
    _check_shapes(shapes)
    want = split == "heldout"
    return [
        (shape, colour, background)
        for shape in shapes
        for colour in COLOURS
        for background in COLOURS
        if colour != background and is_heldout(shape, colour, background) == want
    ]


def all_captions(shapes: Sequence[str] = BASE_SHAPES, split: str = "heldout") -> list[CaptionParts]:
    """Every distinct caption of a split: its combinations x (no size, small, large) x (no position, 5 positions).

    For the base shapes the held-out split has 28 x 3 x 6 = 504 captions, none of which occurs in training;
    evaluate a model on all of them (or a fixed subset) with :func:`~diffstudio_shapes.analyse.score`.

    Args:
        shapes: Shapes to include.
        split: ``"train"`` or ``"heldout"``.

    Returns:
        The caption words, in a fixed order.
    """
    return [
        CaptionParts(shape, colour, background, size, position)
        for shape, colour, background in combinations(shapes, split)
        for size in (None, *SIZE_WORDS)
        for position in (None, *POSITION_WORDS)
    ]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ConfigError(f"Unknown split {split!r}; expected 'train' or 'heldout'.")


def _check_shapes(shapes: Sequence[str]) -> None:
    if isinstance(shapes, str) or not shapes:
        raise ConfigError(f"shapes must be a non-empty sequence of names, got {shapes!r}.")
    unknown = [s for s in shapes if s not in ALL_SHAPES]
    if unknown:
        raise ConfigError(f"Unknown shape(s) {unknown}; expected names from {', '.join(ALL_SHAPES)}.")


# -- geometry -------------------------------------------------------------------------------------------------


def outline(spec: ShapeSpec, size: int) -> list[tuple[float, float]]:
    """The spec's outline in pixel coordinates of a ``size`` x ``size`` image (pixel ``i`` spans ``[i, i+1)``)."""
    cx, cy, r = spec.pixels(size)
    return [(cx + r * x, cy + r * y) for x, y in unit_outline(spec.shape, spec.rotation)]


# -- rendering ------------------------------------------------------------------------------------------------


def render(spec: ShapeSpec, size: int, *, supersample: int = 4) -> Image.Image:
    """Draw a spec as an RGB image, anti-aliased by drawing ``supersample`` times larger and box-averaging down.

    Args:
        spec: What to draw.
        size: Width and height in pixels.
        supersample: Oversampling factor per axis (1 gives hard, aliased edges).

    Returns:
        A ``size`` x ``size`` RGB image.
    """
    if size < 8 or supersample < 1:
        raise ConfigError(f"render needs size >= 8 and supersample >= 1, got {size} and {supersample}.")
    big = size * supersample
    image = Image.new("RGB", (big, big), PALETTE[spec.background])
    draw = ImageDraw.Draw(image)
    fill = PALETTE[spec.colour]
    # PIL puts pixel centres on integer coordinates; ours sit at i + 0.5.
    if spec.shape == "circle":
        cx, cy, r = spec.pixels(big)
        draw.ellipse([cx - r - 0.5, cy - r - 0.5, cx + r - 0.5, cy + r - 0.5], fill=fill)
    else:
        draw.polygon([(x - 0.5, y - 0.5) for x, y in outline(spec, big)], fill=fill)
    if supersample == 1:
        return image
    return image.resize((size, size), Image.Resampling.BOX)


# -- sampling -------------------------------------------------------------------------------------------------


def _uniform(rng: random.Random, low: float, high: float) -> float:
    return low + (high - low) * rng.random()


def _pick(rng: random.Random, options: Sequence[Any]) -> Any:
    return options[min(int(rng.random() * len(options)), len(options) - 1)]


def _sample_one(
    rng: random.Random,
    combos: Sequence[tuple[str, str, str]],
    position_rate: float,
    size_rate: float,
    rotation_jitter: float,
    layout: str,
    position_jitter: float,
) -> ShapeSpec:
    # Fixed draw order: every draw happens whatever the rates, so rates change words, not the stream.
    shape, colour, background = _pick(rng, combos)
    size_word: str | None = _pick(rng, SIZE_WORDS)
    position: str | None = _pick(rng, POSITION_WORDS)
    if rng.random() >= size_rate:
        size_word = None
    if rng.random() >= position_rate:
        position = None
    rotation = 0.0 if shape == "circle" else _uniform(rng, -rotation_jitter, rotation_jitter)
    draws = (rng.random(), rng.random(), rng.random())
    cx, cy, radius = place(layout, shape, size_word, position, rotation, draws, position_jitter)
    return ShapeSpec(shape, colour, background, size_word, position, cx, cy, radius, rotation)


def _rotation_of(layout: str, rotation_jitter: float | None) -> float:
    """Check ``layout`` and return the rotation range to use (``rotation_jitter`` or the layout's default)."""
    if layout not in LAYOUTS:
        raise ConfigError(f"Unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}.")
    return DEFAULT_ROTATION_JITTERS[layout] if rotation_jitter is None else rotation_jitter


def _position_jitter_of(layout: str, position_jitter: float | None) -> float:
    """Check ``position_jitter`` against ``layout`` and return the value to use (the layout's default if None)."""
    if position_jitter is None:
        return POSITION_JITTER
    if layout != "anchored":
        raise ConfigError(
            f"position_jitter applies to the anchored layout only, not {layout!r}; leave it out for {layout!r}."
        )
    if not 0.0 <= position_jitter <= MAX_POSITION_JITTER:
        raise ConfigError(
            f"position_jitter must be in [0, {MAX_POSITION_JITTER}] (fraction of the side), got {position_jitter}."
        )
    return position_jitter


def sample_specs(
    count: int,
    seed: int,
    *,
    shapes: Sequence[str] = BASE_SHAPES,
    split: str = "train",
    position_rate: float = 0.5,
    size_rate: float = 0.5,
    rotation_jitter: float | None = None,
    layout: str = "anchored",
    position_jitter: float | None = None,
) -> list[ShapeSpec]:
    """Draw ``count`` specs deterministically.

    Spec ``i`` depends only on ``(seed, split, shapes, i)`` and the rates, not on ``count`` (each index has its own
    generator seeded from a string), and is stable across platforms and Python versions.

    Args:
        count: Number of specs.
        seed: Base seed.
        shapes: Shapes to draw from (uniform over the split's (shape, colour, background) combinations).
        split: ``"train"`` (combinations outside the held-out rule) or ``"heldout"`` (see :func:`is_heldout`).
        position_rate: Probability that a caption names a position.
        size_rate: Probability that a caption names a size.
        rotation_jitter: Shapes other than circles are rotated uniformly within +-this many degrees (default: the
            layout's, 0 for ``anchored`` and 10 for ``scattered``).
        layout: ``"anchored"`` (fixed anchors and narrow radius ranges, see :mod:`diffstudio_shapes.layouts`) or
            ``"scattered"`` (data set generator v1's placement).
        position_jitter: ``anchored`` only: how far a centre may move from its anchor along each axis
            (default :data:`~diffstudio_shapes.layouts.POSITION_JITTER`). The draws do not depend on it, so
            spec ``i`` keeps its words and only its centre moves.

    Returns:
        The specs.
    """
    rotation_jitter = _rotation_of(layout, rotation_jitter)
    jitter = _position_jitter_of(layout, position_jitter)
    if count < 0:
        raise ConfigError(f"count must be >= 0, got {count}.")
    for name, rate in (("position_rate", position_rate), ("size_rate", size_rate)):
        if not 0.0 <= rate <= 1.0:
            raise ConfigError(f"{name} must be in [0, 1], got {rate}.")
    if not 0.0 <= rotation_jitter <= 45.0:
        raise ConfigError(f"rotation_jitter must be in [0, 45] degrees, got {rotation_jitter}.")
    combos = combinations(shapes, split)
    key = f"{SEED_PREFIXES[layout]}/{seed}/{split}/{'+'.join(shapes)}"
    return [
        _sample_one(random.Random(f"{key}/{i}"), combos, position_rate, size_rate, rotation_jitter, layout, jitter)
        for i in range(count)
    ]


# -- writing --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetReport:
    """What :func:`write_dataset` did.

    Attributes:
        folder: The data set folder.
        count: Images listed in ``metadata.csv``.
        written: Images drawn by this call.
        skipped: Images already present and kept.
    """

    folder: Path
    count: int
    written: int
    skipped: int

    @property
    def metadata(self) -> Path:
        """The ``metadata.csv`` file."""
        return self.folder / "metadata.csv"


def _atomic_write_bytes(path: Path, data: bytes, *, sync: bool = True) -> bool:
    """Write ``data`` to ``path`` through a temporary name and a rename; skip when the content is unchanged.

    ``sync=False`` skips the fsync (images: a killed process still never leaves a partial file under the final
    name, and fsyncing every small PNG would dominate the run time).
    """
    if path.is_file() and path.read_bytes() == data:
        return False
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(temp, "wb") as handle:
        handle.write(data)
        if sync:
            handle.flush()
            os.fsync(handle.fileno())
    os.replace(temp, path)
    return True


def write_dataset(
    folder: str | os.PathLike[str],
    count: int,
    seed: int,
    size: int,
    *,
    shapes: Sequence[str] = BASE_SHAPES,
    split: str = "train",
    position_rate: float = 0.5,
    size_rate: float = 0.5,
    rotation_jitter: float | None = None,
    layout: str = "anchored",
    position_jitter: float | None = None,
) -> DatasetReport:
    """Write a data set in the DiffSynth layout: ``images/NNNNN.png`` plus ``metadata.csv`` (``image,prompt``).

    Also writes ``specs.jsonl`` (one spec per line, with its image and prompt, for evaluation) and
    ``dataset.json`` (the arguments). Every file goes to a temporary name and is renamed into place. Re-running
    with the same arguments draws only the images that are missing; a larger ``count`` extends the set. A folder
    written with other arguments (seed, size, split, shapes, rates) is refused.

    Args:
        folder: Output folder (created).
        count: Number of images.
        seed: Base seed (see :func:`sample_specs`).
        size: Image side in pixels.
        shapes: Shapes to draw from.
        split: ``"train"`` or ``"heldout"``.
        position_rate: Probability that a caption names a position.
        size_rate: Probability that a caption names a size.
        rotation_jitter: Rotation range in degrees for shapes other than circles (default: the layout's).
        layout: ``"anchored"`` or ``"scattered"`` (see :func:`sample_specs`); the manifest's ``generator``
            names it (``diffstudio-shapes/v2`` or ``/v1``).
        position_jitter: ``anchored`` only: the largest move of a centre from its anchor (see
            :func:`sample_specs`); recorded in the manifest when it is not the default.

    Returns:
        What was written.

    Raises:
        ConfigError: Invalid arguments, or the folder holds a data set made with other arguments.
    """
    if size < 16:
        raise ConfigError(f"size must be at least 16 pixels, got {size}.")
    rotation_jitter = _rotation_of(layout, rotation_jitter)  # the manifest records the value used
    jitter = _position_jitter_of(layout, position_jitter)
    root = Path(folder)
    images = root / "images"
    settings: dict[str, Any] = {
        "generator": SEED_PREFIXES[layout],
        "seed": seed,
        "size": size,
        "split": split,
        "shapes": list(shapes),
        "position_rate": position_rate,
        "size_rate": size_rate,
        "rotation_jitter": rotation_jitter,
    }
    if jitter != POSITION_JITTER:  # folders written before the option existed stay readable
        settings["position_jitter"] = jitter
    specs = sample_specs(
        count,
        seed,
        shapes=shapes,
        split=split,
        position_rate=position_rate,
        size_rate=size_rate,
        rotation_jitter=rotation_jitter,
        layout=layout,
        position_jitter=jitter,
    )
    manifest_path = root / "dataset.json"
    if manifest_path.is_file():
        try:
            previous = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{manifest_path} is unreadable ({exc}); delete the folder or choose another.") from exc
        previous.pop("count", None)
        if previous != settings:
            changed = sorted(k for k in settings.keys() | previous.keys() if previous.get(k) != settings.get(k))
            raise ConfigError(
                f"{root} holds a shapes data set written with other arguments ({', '.join(changed)} differ); "
                "choose another folder or delete it."
            )
    images.mkdir(parents=True, exist_ok=True)
    # The arguments go first, so that a run cut short still guards the folder against other arguments.
    _atomic_write_bytes(manifest_path, (json.dumps({**settings, "count": count}, indent=2) + "\n").encode("utf-8"))
    for stale in images.glob(".*.tmp-*"):
        stale.unlink(missing_ok=True)
    width = max(5, len(str(max(count - 1, 0))))
    written = skipped = 0
    rows: list[tuple[str, str]] = []
    lines: list[str] = []
    for index, spec in enumerate(specs):
        name = f"images/{index:0{width}d}.png"
        target = root / name
        if target.is_file() and target.stat().st_size > 0:
            skipped += 1
        else:
            buffer = io.BytesIO()
            render(spec, size).save(buffer, format="PNG")
            _atomic_write_bytes(target, buffer.getvalue(), sync=False)
            written += 1
        rows.append((name, spec.caption))
        lines.append(json.dumps({"image": name, "prompt": spec.caption, **spec.to_json()}))
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(("image", "prompt"))
    writer.writerows(rows)
    _atomic_write_bytes(root / "specs.jsonl", "".join(f"{line}\n" for line in lines).encode("utf-8"))
    _atomic_write_bytes(root / "metadata.csv", text.getvalue().encode("utf-8"))
    return DatasetReport(root, count, written, skipped)


def read_specs(folder: str | os.PathLike[str]) -> list[ShapeSpec]:
    """Read the specs of a data set written by :func:`write_dataset` (from its ``specs.jsonl``)."""
    specs = []
    fields = set(ShapeSpec.__dataclass_fields__)
    with open(Path(folder) / "specs.jsonl", encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                record = json.loads(line)
                specs.append(ShapeSpec(**{k: v for k, v in record.items() if k in fields}))
    return specs
