"""Fuzz the pipeline call arguments (issue 21.5-21.7, 22.11) on the embedded shapes model (FLUX.2 klein layout).

Each case draws a set of call arguments, each valid or not: prompts of odd types, NaN/Inf and huge numbers, sizes
that are zero, negative, not multiples of 16 or above the limits, seeds of every type and range, images of odd
sizes and modes (and a lazily opened 8000 x 8000 file whose pixels are cut short), diffusers aliases clashing with
their primary names, latents of wrong shapes, explicit sigmas.

Oracle (:func:`expected_failure`): the validity spec of :mod:`diffstudio.pipeline.validate` plus the family's own
rules (sizes multiple of 16, edit images of at least 16 pixels a side, an inpaint mask only with an input image,
latents of the right shape), under the small limits set on the pipeline here (32 x 32 pixels, 4 steps, 32 tokens,
4 images, 64 x 64 input pixels), so that every valid case is cheap.

Every case first goes through the checks the call runs before any compute (:func:`dry_run`); a case those
accept runs for real (1-4 steps at 16-32 pixels; the text encoder's output is memoised per prompt list so that
the loop stays fast) when the oracle says it is invalid (the family's units must refuse it, typed) and for a
budgeted number of valid cases. A valid case outside that budget is checked up to the start of compute.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from diffstudio.pipeline.diffusers_api import translate_call
from diffstudio.pipeline.validate import check_values
from diffstudio.testing import import_file
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

harness = import_file(Path(__file__).resolve().parent / "harness.py")
shapes_model = pytest.importorskip("diffstudio_shapes.model")

SUITE = "call_args"
EXAMPLES = int(os.environ.get("DIFFSTUDIO_FUZZ_EXAMPLES", "20000" if harness.LONG else "300"))
FULL_RUNS = 2000 if harness.LONG else 30  # valid cases run to the end (the others stop where compute starts)
ABSENT = object()
LIMITS = {"max_pixels": 32 * 32, "max_input_pixels": 64 * 64, "max_steps": 4, "max_sequence_length": 32, "max_batch": 4}
POOL = ["a red circle", "", "blue square, ünïcode ✓", "x " * 40]


def _png_header(path: Path, width: int, height: int) -> Path:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)))
    return path


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread: the model is tiny, and on a busy machine more threads cost 10-100x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@functools.cache
def _pipe() -> Any:
    from diffstudio_flux2 import Flux2ImagePipeline

    pipe = Flux2ImagePipeline.from_pretrained("diffstudio/shapes", torch_dtype=torch.float32, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    for name, value in LIMITS.items():
        setattr(pipe.limits, name, value)
    encoder = pipe.prompt_encoder()
    encode = encoder.encode
    memo: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    def memoised(prompts: list[str], length: int, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        parts = []
        for prompt in prompts:  # one prompt at a time, so that every list of pool prompts hits the memo
            key = (prompt, length, tuple(sorted(kwargs.items(), key=str)))
            if key not in memo:
                memo[key] = encode([prompt], length, **kwargs)
            parts.append(memo[key])
        return torch.cat([e for e, _ in parts]), torch.cat([i for _, i in parts])

    encoder.encode = memoised
    with one_thread():
        for length in (8, 16):
            pipe(POOL, height=16, width=16, num_inference_steps=1, max_sequence_length=length, output_type="latent")
    return pipe


@functools.cache
def _big_image() -> Image.Image:
    """An 8000 x 8000 PNG opened lazily: its header is read, its pixel data is cut short (decoding would fail)."""
    folder = harness.REPORT_DIR / "call-args"
    folder.mkdir(parents=True, exist_ok=True)
    return Image.open(_png_header(folder / "big.png", 8000, 8000))


class Img:
    """A PIL image to build per case (sizes and modes), shown briefly in reports."""

    def __init__(self, width: int, height: int, mode: str = "RGB", lazy_big: bool = False) -> None:
        self.width, self.height, self.mode, self.lazy_big = width, height, mode, lazy_big

    def build(self) -> Image.Image:
        if self.lazy_big:
            return _big_image()
        return Image.new(self.mode, (self.width, self.height))

    def __repr__(self) -> str:
        return f"Img({self.width}x{self.height} {self.mode}{' lazy' if self.lazy_big else ''})"


class Lat:
    """Initial latents to build per case: ``(batch, tokens, channels)``, or NaN / integer ones."""

    def __init__(self, batch: int, tokens_delta: int, kind: str) -> None:
        self.batch, self.tokens_delta, self.kind = batch, tokens_delta, kind

    def __repr__(self) -> str:
        return f"Lat(b={self.batch}, dtokens={self.tokens_delta}, {self.kind})"


def _images(sizes: list[tuple[int, int]], modes: list[str]) -> st.SearchStrategy[Img]:
    return st.builds(lambda size, mode: Img(size[0], size[1], mode), st.sampled_from(sizes), st.sampled_from(modes))


GOOD_MODES = ["RGB", "RGB", "L", "RGBA", "P", "I;16", "F", "1", "CMYK"]
GOOD_IMAGES = _images([(16, 16), (32, 16), (64, 64), (48, 32)], GOOD_MODES)
ODD_IMAGES = _images([(1, 1), (5, 3), (17, 9), (33, 20)], GOOD_MODES)  # fine as input images, too small to edit
BAD_IMAGES = st.one_of(
    _images([(0, 0), (5, 0), (0, 16), (65, 64), (4096, 2)], GOOD_MODES),
    _images([(16, 16)], ["La"]),
    st.just(Img(8000, 8000, lazy_big=True)),
)

#: Per argument: (valid values, invalid values). ABSENT among the valid ones means "may be left out".
ARGUMENTS: dict[str, tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]] = {
    "prompt": (
        st.one_of(
            st.sampled_from(POOL),
            st.sampled_from(POOL),
            st.sampled_from(POOL),
            st.lists(st.sampled_from(POOL), min_size=1, max_size=2),
            st.text(max_size=30),
        ),
        st.sampled_from([None, 123, b"a cat", 1.5, [None], [], ["a", 3], ["a"] * 5, "a\ud800", {"a": 1}]),
    ),
    "negative_prompt": (
        st.sampled_from([ABSENT, ABSENT, None, "", "blurry"]),
        st.sampled_from([["n"] * 3, 5, b"n", [None]]),
    ),
    "cfg_scale": (
        st.sampled_from([ABSENT, ABSENT, 1.0, 2.5, -1.0, 0]),
        st.sampled_from([math.nan, math.inf, "2", True]),
    ),
    "guidance_scale": (st.sampled_from([ABSENT]), st.sampled_from([2.0, math.nan])),
    "embedded_guidance": (st.sampled_from([ABSENT, 4.0, None]), st.sampled_from([math.nan, -math.inf, "4"])),
    "seed": (
        st.sampled_from([ABSENT, None, 0, 7, 2**64 - 4]),
        st.sampled_from([2**64 - 1, 2**64, -1, 1.5, True, "3", 2.0]),
    ),
    "generator": (st.sampled_from([ABSENT]), st.sampled_from(["gen", "gens", 5])),
    "height": (st.sampled_from([16, 16, 32]), st.sampled_from([ABSENT, 0, -16, 17, 16.0, True, "16", 65536, 10**12])),
    "width": (st.sampled_from([16, 16, 32]), st.sampled_from([ABSENT, 0, -16, 24, 16.0, 65536, 10**12, None])),
    "num_inference_steps": (
        st.sampled_from([ABSENT, None, 1, 1, 2, 4]),
        st.sampled_from([5, 0, -1, 1.5, 10**9, True, "2"]),
    ),
    "max_sequence_length": (st.sampled_from([8, 8, 16]), st.sampled_from([ABSENT, 0, 33, 10**6, 2.0, True])),
    "sigmas": (
        st.sampled_from([ABSENT, ABSENT, None, [1.0], [1.0, 0.5], "t2"]),
        st.sampled_from([[], [math.nan], "abc", [0.5] * 10, "t2d", [1.0, True]]),
    ),
    "denoising_strength": (st.sampled_from([ABSENT, 1.0, 0.5]), st.sampled_from([0.0, 1.5, math.nan, "1"])),
    "input_image": (
        st.one_of(st.sampled_from([ABSENT, ABSENT, None]), GOOD_IMAGES, ODD_IMAGES, st.lists(GOOD_IMAGES, max_size=1)),
        st.one_of(st.sampled_from(["x.png", 5, []]), BAD_IMAGES, st.lists(GOOD_IMAGES, min_size=3, max_size=3)),
    ),
    "edit_image": (
        st.one_of(st.sampled_from([ABSENT, ABSENT, None]), GOOD_IMAGES, st.lists(GOOD_IMAGES, min_size=1, max_size=2)),
        st.one_of(st.sampled_from(["x.png", []]), BAD_IMAGES, ODD_IMAGES, st.lists(BAD_IMAGES, min_size=1, max_size=2)),
    ),
    "edit_image_auto_resize": (st.sampled_from([ABSENT, True, False]), st.sampled_from(["yes", 1])),
    "inpaint_mask": (
        st.one_of(st.sampled_from([ABSENT, ABSENT, ABSENT, None]), GOOD_IMAGES),
        st.one_of(st.sampled_from([5]), BAD_IMAGES),
    ),
    "output_type": (st.sampled_from([ABSENT, "pil", "np", "pt", "latent"]), st.sampled_from(["jpg", None])),
    "return_dict": (st.sampled_from([ABSENT, ABSENT, True, False]), st.sampled_from(["yes", 1])),
    "num_images_per_prompt": (st.sampled_from([ABSENT, ABSENT, 1, 2]), st.sampled_from([0, -1, 1.5, 10**9, True])),
    "rand_device": (st.sampled_from([ABSENT, "cpu", torch.device("cpu")]), st.sampled_from(["cuda", "gpu", 3])),
    "latents": (
        st.one_of(
            st.sampled_from([ABSENT, ABSENT, ABSENT, None]), st.builds(Lat, st.just(1), st.just(0), st.just("ok"))
        ),
        st.one_of(
            st.sampled_from([[0.0]]),
            st.builds(Lat, st.sampled_from([1, 3]), st.sampled_from([0, 1]), st.sampled_from(["ok", "nan", "int"])),
        ),
    ),
    "guidance_scal": (st.just(ABSENT), st.just(1.0)),
    "strength": (st.just(ABSENT), st.sampled_from([0.5, 1.0, 0.0, math.nan])),
    "inpaint_blur_size": (st.sampled_from([ABSENT, None, 0, 3]), st.sampled_from([-1, 2.5, True, "3"])),
    "inpaint_blur_sigma": (st.sampled_from([ABSENT, None, 1.0]), st.sampled_from([0.0, -1.0, math.nan, "1"])),
    "edit_kv_cache": (st.sampled_from([ABSENT, False, True]), st.sampled_from(["yes", 1, None])),
    "callback_on_step_end": (st.sampled_from([ABSENT, ABSENT, "ok"]), st.sampled_from([3, "list", "badlat"])),
}


def _callback(kind: str) -> Any:
    if kind == "ok":
        return lambda pipe, step, timestep, tensors: {"latents": tensors["latents"]}
    if kind == "list":
        return lambda pipe, step, timestep, tensors: [1]
    return lambda pipe, step, timestep, tensors: {"latents": tensors["latents"][:, :0]}


@st.composite
def call_arguments(draw: st.DrawFn) -> dict[str, Any]:
    """Valid values for every argument but up to three, which get invalid ones (a quarter of cases: none)."""
    spoiled = draw(st.sets(st.sampled_from(sorted(ARGUMENTS)), max_size=3))
    return {name: draw(pair[1] if name in spoiled else pair[0]) for name, pair in ARGUMENTS.items()}


def build(drawn: dict[str, Any]) -> dict[str, Any]:
    """Turn the drawn descriptions into call arguments (images, generators, tensors)."""
    pipe = _pipe()
    kwargs: dict[str, Any] = {}
    for name, value in drawn.items():
        if value is ABSENT:
            continue
        if isinstance(value, Img):
            value = value.build()
        elif isinstance(value, list) and any(isinstance(v, Img) for v in value):
            value = [v.build() for v in value]
        elif name == "generator" and value in ("gen", "gens"):
            value = torch.Generator().manual_seed(3) if value == "gen" else [torch.Generator()]
        elif name == "callback_on_step_end" and isinstance(value, str):
            value = _callback(value)
        elif name == "sigmas" and value in ("t2", "t2d"):
            value = torch.tensor([1.0, 0.5]) if value == "t2" else torch.tensor([[1.0, 0.5]])
        elif isinstance(value, Lat):
            height, width = drawn.get("height"), drawn.get("width")
            ok = _int(height) and _int(width) and 0 < height * width <= LIMITS["max_pixels"]
            tokens = (height // 16) * (width // 16) if ok else 1
            shape = (value.batch, max(tokens, 1) + value.tokens_delta, pipe.latent_channels)
            value = torch.zeros(shape, dtype=torch.int64) if value.kind == "int" else torch.randn(shape)
            if drawn["latents"].kind == "nan":
                value[0, 0, 0] = math.nan
        kwargs[name] = value
    return kwargs


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _real_ok(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _image_ok(image: Any, *, edit: bool, auto_resize: bool) -> bool:
    if not isinstance(image, Img):
        return False
    if image.lazy_big or image.width < 1 or image.height < 1 or image.width * image.height > LIMITS["max_input_pixels"]:
        return False
    if image.mode == "La":
        return False
    if edit and (image.width < 16 or image.height < 16):
        return False
    return not (edit and not auto_resize and (image.width % 16 or image.height % 16))


def expected_failure(drawn: dict[str, Any]) -> bool | None:  # noqa: C901 - the spec, one rule per line
    """The oracle: True when the call must be refused, False when it must succeed, None when either is fine."""
    get = drawn.get
    prompt = get("prompt")
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    else:
        return True
    if any("\ud800" <= c <= "\udfff" for p in prompts for c in p):
        return True
    copies = get("num_images_per_prompt", ABSENT)
    if copies is ABSENT:
        copies = 1
    elif not _int(copies) or copies < 1:
        return True
    batch = len(prompts) * copies
    if len(prompts) > LIMITS["max_batch"] or copies > LIMITS["max_batch"] or batch > LIMITS["max_batch"]:
        return True
    negative = get("negative_prompt", ABSENT)
    if negative not in (ABSENT, None) and not isinstance(negative, str):
        if not isinstance(negative, list) or not all(isinstance(n, str) for n in negative):
            return True
        if len(negative) != len(prompts):
            return True
    if get("guidance_scal", ABSENT) is not ABSENT:
        return True
    cfg = get("cfg_scale", ABSENT)
    guidance = get("guidance_scale", ABSENT)
    if cfg is not ABSENT and guidance is not ABSENT:
        return True
    cfg = guidance if guidance is not ABSENT else cfg
    if cfg is not ABSENT and not _real_ok(cfg):
        return True
    cfg_value = 1.0 if cfg is ABSENT else float(cfg)
    embedded = get("embedded_guidance", ABSENT)
    if embedded not in (ABSENT, None) and not _real_ok(embedded):
        return True
    generator, seed = get("generator", ABSENT), get("seed", ABSENT)
    if generator is not ABSENT:
        if generator != "gen" or seed not in (ABSENT, None):
            return True
        seed = 3
    if seed not in (ABSENT, None) and (not _int(seed) or seed < 0 or seed + batch - 1 >= 2**64):
        return True
    height, width = get("height", ABSENT), get("width", ABSENT)
    height = 1024 if height is ABSENT else height
    width = 1024 if width is ABSENT else width
    for side in (height, width):
        if not _int(side) or side <= 0:
            return True
    if height * width > LIMITS["max_pixels"] or height % 16 or width % 16:
        return True
    steps = get("num_inference_steps", ABSENT)
    sigmas = get("sigmas", ABSENT)
    if steps not in (ABSENT, None) and (not _int(steps) or steps < 1 or steps > LIMITS["max_steps"]):
        return True
    if sigmas not in (ABSENT, None):
        if sigmas == "t2d" or sigmas == "abc" or not sigmas:
            return True
        if isinstance(sigmas, list) and (len(sigmas) > LIMITS["max_steps"] or not all(_real_ok(s) for s in sigmas)):
            return True
    elif steps in (ABSENT, None) and (50 if cfg_value > 1 else 4) > LIMITS["max_steps"]:
        return True
    length = get("max_sequence_length", ABSENT)
    length = 512 if length is ABSENT else length
    if not _int(length) or length < 1 or length > LIMITS["max_sequence_length"]:
        return True
    strength = get("denoising_strength", ABSENT)
    if get("strength", ABSENT) is not ABSENT:
        if strength is not ABSENT:
            return True
        strength = get("strength")
    if strength is not ABSENT and (not _real_ok(strength) or not 0 < strength <= 1):
        return True
    if strength not in (ABSENT, 1.0) and sigmas not in (ABSENT, None):
        return True  # the scheduler: explicit sigmas already say where denoising starts
    blur_size, blur_sigma = get("inpaint_blur_size", ABSENT), get("inpaint_blur_sigma", ABSENT)
    if blur_size not in (ABSENT, None) and (not _int(blur_size) or blur_size < 0):
        return True
    if blur_sigma not in (ABSENT, None) and (not _real_ok(blur_sigma) or blur_sigma <= 0):
        return True
    kv_cache = get("edit_kv_cache", ABSENT)
    if kv_cache is not ABSENT and kv_cache is not None and not isinstance(kv_cache, bool):
        return True
    if get("callback_on_step_end", ABSENT) not in (ABSENT, "ok"):
        return True
    auto = get("edit_image_auto_resize", ABSENT)
    if auto is not ABSENT and not isinstance(auto, bool):
        return True
    source = get("input_image", ABSENT)
    if source not in (ABSENT, None):
        sources = source if isinstance(source, list) else [source]
        if len(sources) not in (1, batch) or not sources:
            return True
        if not all(_image_ok(i, edit=False, auto_resize=True) for i in sources):
            return True
    edits = get("edit_image", ABSENT)
    if edits not in (ABSENT, None):
        edits = edits if isinstance(edits, list) else [edits]
        if not edits or not all(_image_ok(i, edit=True, auto_resize=auto is not False) for i in edits):
            return True
    mask = get("inpaint_mask", ABSENT)
    if mask not in (ABSENT, None):
        if source in (ABSENT, None) or not _image_ok(mask, edit=False, auto_resize=True):
            return True
    if get("output_type", ABSENT) not in (ABSENT, "pil", "np", "pt", "latent"):
        return True
    return_dict = get("return_dict", ABSENT)
    if return_dict is not ABSENT and not isinstance(return_dict, bool):
        return True
    device = get("rand_device", ABSENT)
    if device not in (ABSENT, "cpu") and not isinstance(device, torch.device):
        return True
    latents = get("latents", ABSENT)
    if latents not in (ABSENT, None):
        if not isinstance(latents, Lat) or latents.kind != "ok" or latents.tokens_delta:
            return True
        if latents.batch not in (1, batch):
            return True
    if cfg_value != 1.0 and abs(cfg_value) > 1e6:
        return None  # huge guidance may overflow: a NonFiniteOutputError is a fine answer
    return False


def dry_run(kwargs: dict[str, Any]) -> None:
    """Everything ``pipe(**kwargs)`` does before the first unit runs (argument checks and limits)."""
    from diffstudio_flux2 import Flux2ImagePipeline

    pipe = _pipe()
    named, _ = translate_call(pipe, Flux2ImagePipeline.__call__.__wrapped__, (), kwargs)
    named.pop("callback_on_step_end", None)
    named.pop("progress_bar_cmd", None)
    inputs = pipe.call_inputs(**named)
    check_values(inputs, pipe.limits)


_full_runs = [0]


@settings(max_examples=EXAMPLES)
@given(call_arguments())
def test_fuzz_call_arguments(drawn: dict[str, Any]) -> None:
    with one_thread():
        run_case(drawn)


def run_case(drawn: dict[str, Any]) -> None:
    """Classify one drawn case (see the module docstring)."""
    pipe = _pipe()
    verdict = expected_failure(drawn)
    shown = {k: v for k, v in drawn.items() if v is not ABSENT}
    kwargs = build(drawn)
    outcome, _ = harness.classify(lambda: dry_run(kwargs), should_fail=verdict, budget_s=0.5)
    if outcome == "typed" or verdict is None or (verdict is False and _full_runs[0] >= FULL_RUNS):
        # refused before compute, or a valid case outside the run budget: record the dry run's verdict
        harness.check(SUITE, lambda: dry_run(kwargs), should_fail=verdict, example=shown, budget_s=0.5)
        return
    if verdict is False:
        _full_runs[0] += 1
    harness.check(SUITE, lambda: pipe(**kwargs), should_fail=verdict, example=shown, budget_s=20.0)


DTYPES_OK = [None, torch.float32, torch.bfloat16, torch.float16, "float32", "bf16", "fp16", "torch.float64"]
DTYPES_BAD = [torch.int8, torch.complex64, "int8", "/path/to/repo", 16, b"fp16", 1.5, True]
DEVICES_OK = [None, "cpu", torch.device("cpu")] + (["cuda"] if torch.cuda.is_available() else [])
DEVICES_BAD = ["gpu", 0, "cpu:x", b"cpu", 1.5] + ([] if torch.cuda.is_available() else ["cuda", "cuda:1"])
FROM_PRETRAINED: dict[str, tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]] = {
    "repo": (st.just(ABSENT), st.sampled_from(["/no/such/folder", "./missing", "a/b/c", "~/nothing-here"])),
    "torch_dtype": (st.sampled_from([ABSENT, *DTYPES_OK]), st.sampled_from(DTYPES_BAD)),
    "device": (st.sampled_from([ABSENT, *DEVICES_OK]), st.sampled_from(DEVICES_BAD)),
    "model_configs": (st.sampled_from([ABSENT, (), []]), st.sampled_from(["model.safetensors", ["x"], 5, "one"])),
    "tokenizer_config": (st.sampled_from([ABSENT, None]), st.sampled_from(["tokenizer/", 3])),
    "vram_limit": (st.sampled_from([ABSENT, None, 0, 8.0]), st.sampled_from([-1, "8", True, math.nan, math.inf])),
    "variant": (st.just(ABSENT), st.sampled_from(["fp16", None])),
}


@st.composite
def from_pretrained_arguments(draw: st.DrawFn) -> dict[str, Any]:
    """Valid values for every argument but up to two."""
    spoiled = draw(st.sets(st.sampled_from(sorted(FROM_PRETRAINED)), max_size=2))
    return {name: draw(pair[1] if name in spoiled else pair[0]) for name, pair in FROM_PRETRAINED.items()}


@settings(max_examples=max(EXAMPLES // 3, 50))
@given(from_pretrained_arguments())
def test_fuzz_from_pretrained_arguments(drawn: dict[str, Any]) -> None:
    from diffstudio.config import ModelConfig
    from diffstudio.runtime import Runtime
    from diffstudio_flux2 import Flux2ImagePipeline

    shown = {k: v for k, v in drawn.items() if v is not ABSENT}
    kwargs = {k: v for k, v in shown.items() if k != "repo"}
    if kwargs.get("model_configs") == "one":
        kwargs["model_configs"] = ModelConfig(path="model.safetensors")
    args = [shown["repo"]] if "repo" in shown else []
    valid = {"torch_dtype": DTYPES_OK, "device": DEVICES_OK, "model_configs": [(), []], "tokenizer_config": [None]}
    invalid = "repo" in shown or "variant" in shown
    for name, accepted in valid.items():
        invalid = invalid or (name in shown and not any(shown[name] is v or shown[name] == v for v in accepted))
    limit = shown.get("vram_limit")
    invalid = invalid or not (limit is None or (_real_ok(limit) and limit >= 0))
    runtime = Runtime(env={}, load_entrypoints=False)
    harness.check(
        "from_pretrained_args",
        lambda: Flux2ImagePipeline.from_pretrained(*args, runtime=runtime, **kwargs),
        should_fail=invalid,
        example=shown,
        budget_s=2.0,
    )
