"""Fuzz the template loaders: generated template folders, trust flags and kill-switch values (issue 21).

Each case writes a folder (a random ``template.json`` or none, a ``model.py`` or none, weights that are valid,
broken or missing, path-traversal names, a symbolic link out of the folder, a malicious ``__pycache__`` bytecode
file) and loads it through one public entry (``load_template``, ``load_template_model``,
``load_template_data_processor``, ``TemplatePipeline.from_pretrained`` / ``TemplatePipeline``) with a random
``trust_code`` value (booleans and the look-alikes a JSON config produces), a random pin and a random
``DIFFSTUDIO_DISABLE_REMOTE_CODE`` value.

Cases: the hypothesis profile's (300 per test in CI, 20000 with ``DIFFSTUDIO_FUZZ=long``).

Oracle: ``model.py`` writes ``ran-code.txt`` beside the folder when it runs, the bytecode writes ``ran-pyc.txt``.
The bytecode never runs; ``model.py`` runs only when trust is the boolean True, the kill switch is off (unset,
empty, 0/false/no/off) and the pin, if any, matches; such refusals must be typed. Every other refusal must be
typed too (``harness.check``).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import py_compile
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from diffstudio.errors import TrustFlagError
from diffstudio.runtime import Runtime
from diffstudio.templates import (
    TemplatePipeline,
    load_template,
    load_template_data_processor,
    load_template_model,
)
from diffstudio.testing import import_file
from diffstudio_template_sdk.testing import toy_templates_plugin
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file

harness = import_file(Path(__file__).resolve().parent / "harness.py")

RUNTIME = Runtime(env={}, load_entrypoints=False, plugins=[toy_templates_plugin])
DISABLE = "DIFFSTUDIO_DISABLE_REMOTE_CODE"
ALLOWING = frozenset({"", "0", "false", "no", "off"})

# model.py variants: every one that can run writes the marker first (the source is the same in every case, so the
# executed modules share one digest). Only the first is a complete template.
CODE_HEAD = (
    'from pathlib import Path\nPath(__file__).resolve().parent.parent.joinpath("ran-code.txt").write_text("x")\n'
)
CODE_BODY = """
import torch


class Toy(torch.nn.Module):
    def __init__(self, tokens=4, channels=3):
        super().__init__()
        self.base = torch.nn.Parameter(torch.zeros(1, tokens, channels))

    @torch.no_grad()
    def process_inputs(self, scale=1.0, pipe=None, **kwargs):
        return {"scale": torch.tensor(float(scale))}

    def forward(self, scale, pipe=None, **kwargs):
        return {"latents": self.base * scale}


TEMPLATE_MODEL = Toy
"""
CODE_TAILS = [
    'TEMPLATE_MODEL_PATH = "model.safetensors"\n',
    "TEMPLATE_MODEL_PATH = None\n",
    'TEMPLATE_MODEL_PATH = "../outside.safetensors"\n',
    'TEMPLATE_MODEL_PATH = ["model.safetensors", "/etc/passwd"]\n',
    "TEMPLATE_MODEL_PATH = 5\n",
    "TEMPLATE_MODEL_CONFIG = [1, 2]\n",
    'TEMPLATE_MODEL_CONFIG = {"tokens": "many"}\n',
    "TEMPLATE_DIT_GEOMETRY = {'heads': 2}\n",
    "raise RuntimeError('model.py fails at import')\n",
    "del TEMPLATE_MODEL\n",
    "def broken(:\n",
]
EVIL = 'from pathlib import Path\nPath(__file__).resolve().parent.parent.joinpath("ran-pyc.txt").write_text("x")\n'

JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 80) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
WEIGHT_NAMES = st.sampled_from(
    ["model.safetensors", "../outside.safetensors", "/etc/passwd", "sub/../../outside.safetensors", "",
     "missing.safetensors", "model.bin", "link.safetensors", ".", "weights\x00.safetensors"]  # fmt: skip
)
GEOMETRY = st.one_of(
    st.none(),
    st.fixed_dictionaries({k: st.integers(-1, 70) | st.text(max_size=2) | st.booleans()
                           for k in ("double_blocks", "single_blocks", "heads", "head_dim")}),  # fmt: skip
    JSONISH,
)
TEMPLATE_JSON = st.one_of(
    st.fixed_dictionaries(
        {
            "format": st.sampled_from(["diffstudio-template", "other"]) | JSONISH,
            "template": st.sampled_from(["toy/scale", "toy/kv", "no/such"]) | JSONISH,
        },
        optional={
            "format_version": st.sampled_from([1, 2, "1", None, 0, -1]),
            "config": st.fixed_dictionaries(
                {}, optional={"tokens": st.integers(-2, 70) | JSONISH, "channels": st.integers(-2, 70) | JSONISH,
                              "key": st.sampled_from(["latents", "kv_cache"]) | JSONISH}  # fmt: skip
            ) | JSONISH,
            "weights": WEIGHT_NAMES | st.lists(WEIGHT_NAMES, max_size=3) | JSONISH,
            "dit_geometry": GEOMETRY,
            "target_model": JSONISH,
            "description": JSONISH,
        },
    ),
    JSONISH,
)
# Repeated entries weight the draw towards cases where code may run, so that both sides of the oracle are exercised.
TRUST = st.sampled_from([True] * 10 + [False, "no", "yes", "false", "", 1, 0, None, 1.0, [True]])
ENV_TEXT = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=6)
KILL = st.one_of(st.sampled_from([None] * 4 + ["", "0", "off", "NO", "1", "2", "true", " yes ", "on", "enable"]),
                 ENV_TEXT)  # fmt: skip
PIN = st.sampled_from([None] * 4 + ["right", "right", "RIGHT ", "wrong", 123, b"x"])
ENTRY = st.sampled_from(["load_template", "load_template_model", "data_processor", "pipeline", "pipeline_init"])


@contextlib.contextmanager
def _environ(value: str | None) -> Iterator[None]:
    """Set the kill switch in ``os.environ`` for the entries that read it there."""
    old = os.environ.get(DISABLE)
    if value is None:
        os.environ.pop(DISABLE, None)
    else:
        os.environ[DISABLE] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(DISABLE, None)
        else:
            os.environ[DISABLE] = old


def _write_weights(path: Path, kind: str) -> None:
    if kind == "toy":  # fits both the code template and toy/scale with tokens=4, channels=3
        save_file({"base": torch.zeros(1, 4, 3), "direction": torch.zeros(1, 4, 3)}, str(path))
    elif kind == "code":
        save_file({"base": torch.zeros(1, 4, 3)}, str(path))
    elif kind == "truncated":
        save_file({"base": torch.zeros(1, 4, 3)}, str(path))
        path.write_bytes(path.read_bytes()[:-5])
    elif kind == "garbage":
        path.write_bytes(b"\xff" * 9)


VALID_DATA = st.fixed_dictionaries(
    {"format": st.just("diffstudio-template"), "template": st.just("toy/scale"),
     "config": st.just({"tokens": 4, "channels": 3})},
    optional={"weights": st.sampled_from(["model.safetensors"] * 3 + ["../outside.safetensors", "link.safetensors",
                                                                       "/etc/passwd", "sub/../../outside.safetensors"]),
              "dit_geometry": GEOMETRY, "format_version": st.just(1), "target_model": JSONISH},
)  # fmt: skip


@st.composite
def template_case(draw: st.DrawFn) -> dict[str, Any]:
    """A folder description: a complete seed-format folder, a data-only one, or anything (a third each)."""
    scenario = draw(st.sampled_from(["code", "data", "random"]))
    if scenario == "code":
        parts = {"json": None, "code": draw(st.sampled_from([0, 0, 0, *range(len(CODE_TAILS))])),
                 "weights": draw(st.sampled_from(["code", "code", "code", "toy", "truncated", "garbage", "none"]))}
    elif scenario == "data":
        parts = {"json": draw(VALID_DATA), "code": draw(st.sampled_from([None, 0])),
                 "weights": draw(st.sampled_from(["toy", "toy", "code", "truncated", "none"]))}
    else:
        parts = {"json": draw(st.sampled_from([None, None, "{not json", "[" * 5000]) | TEMPLATE_JSON),
                 "code": draw(st.sampled_from([None, 0, *range(len(CODE_TAILS))])),
                 "weights": draw(st.sampled_from(["toy", "code", "truncated", "garbage", "none"]))}  # fmt: skip
    return {
        **parts,
        "pyc": draw(st.booleans()),
        "stray_pyc": draw(st.booleans()),
        "link": draw(st.booleans()),
        "trust": draw(TRUST),
        "kill": draw(KILL),
        "pin": draw(PIN),
        "entry": draw(ENTRY),
    }


def _build(root: Path, case: dict[str, Any]) -> tuple[Path, str | None]:
    """Write the case's folder under ``root``; return it and model.py's digest (None without model.py)."""
    folder = root / "template"
    folder.mkdir()
    save_file({"base": torch.zeros(1, 4, 3), "direction": torch.zeros(1, 4, 3)}, str(root / "outside.safetensors"))
    if case["json"] is not None:
        text = case["json"] if isinstance(case["json"], str) and case["json"][:1] in "{[" else json.dumps(case["json"])
        (folder / "template.json").write_text(text)
    digest = None
    if case["code"] is not None:
        source = (CODE_HEAD + CODE_BODY + CODE_TAILS[case["code"]]).encode()
        (folder / "model.py").write_bytes(source)
        digest = hashlib.sha256(source).hexdigest()
        if case["pyc"]:  # what the import system would run instead of model.py
            evil = root / "evil.py"
            evil.write_text(EVIL + CODE_BODY + CODE_TAILS[0])
            target = importlib.util.cache_from_source(str(folder / "model.py"))
            py_compile.compile(str(evil), cfile=target, doraise=True,
                               invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)  # fmt: skip
    if case["stray_pyc"]:
        (folder / "helper.pyc").write_bytes(b"\x00" * 16)
    if case["weights"] != "none":
        _write_weights(folder / "model.safetensors", case["weights"])
    if case["link"]:
        (folder / "link.safetensors").symlink_to(root / "outside.safetensors")
    return folder, digest


def _entry(case: dict[str, Any], folder: Path, pin: object) -> Callable[[], object]:
    trust = case["trust"]
    env = {} if case["kill"] is None else {DISABLE: case["kill"]}
    entries: dict[str, Callable[[], object]] = {
        "load_template": lambda: load_template(folder, runtime=RUNTIME, trust_code=trust, code_sha256=pin, env=env),
        "load_template_model": lambda: load_template_model(str(folder), trust_code=trust, code_sha256=pin,
                                                           runtime=RUNTIME),  # fmt: skip
        "data_processor": lambda: load_template_data_processor(str(folder), trust_code=trust, code_sha256=pin,
                                                               runtime=RUNTIME),  # fmt: skip
        "pipeline": lambda: TemplatePipeline.from_pretrained(device="cpu", model_configs=[str(folder)],
                                                             trust_code=trust, code_sha256=pin, runtime=RUNTIME),
        "pipeline_init": lambda: TemplatePipeline([str(folder)], trust_code=trust, code_sha256=pin,  # type: ignore[list-item]
                                                  runtime=RUNTIME).templates,  # fmt: skip
    }
    call = entries[case["entry"]]
    if case["entry"] == "load_template":
        return call

    def with_environment() -> object:
        with _environ(case["kill"]):
            return call()

    return with_environment


@given(case=template_case())
def test_fuzz_template_folders_never_run_untrusted_code(case: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory(prefix="fuzz-template-") as tmp:
        root = Path(tmp)
        folder, digest = _build(root, case)
        pin: object = {"right": digest, "RIGHT ": (digest or "").upper() + " ", "wrong": "0" * 64}.get(
            case["pin"], case["pin"]
        ) if isinstance(case["pin"], str) else case["pin"]  # fmt: skip
        flags_ok = type(case["trust"]) is bool and (pin is None or isinstance(pin, str))
        is_data = (folder / "template.json").is_file()
        is_code = not is_data and digest is not None
        kill_off = case["kill"] is None or case["kill"].strip().lower() in ALLOWING
        pin_ok = pin is None or (isinstance(pin, str) and pin.strip().lower() == digest)
        may_run = flags_ok and is_code and case["trust"] is True and kill_off and pin_ok
        must_fail = not flags_ok or not (is_data or is_code) or (is_code and not may_run)
        outcome = harness.check(
            "templates",
            _entry(case, folder, pin),
            should_fail=True if must_fail else None,
            example={k: v for k, v in case.items() if k != "json"} | {"json": repr(case["json"])[:200]},
        )
        assert not (root / "ran-pyc.txt").exists(), f"cached bytecode ran: {case}"
        if not may_run:
            assert not (root / "ran-code.txt").exists(), f"untrusted code ran ({outcome}): {case}"


@given(flag=st.one_of(st.text(max_size=5), st.integers(), st.none(), st.floats(allow_nan=False), st.booleans(),
                      st.lists(st.booleans(), max_size=2)),  # fmt: skip
       entry=ENTRY)
def test_fuzz_trust_flags_must_be_booleans(flag: object, entry: str) -> None:
    """An installed template with any trust value: booleans load, anything else is a TrustFlagError."""
    calls: dict[str, Callable[[], object]] = {
        "load_template": lambda: load_template("toy/scale", runtime=RUNTIME, trust_code=flag),
        "load_template_model": lambda: load_template_model("toy/scale", trust_code=flag, runtime=RUNTIME),
        "data_processor": lambda: load_template_data_processor("toy/scale", trust_code=flag, runtime=RUNTIME),
        "pipeline": lambda: TemplatePipeline.from_pretrained(device="cpu", model_configs=["toy/scale"],
                                                             trust_code=flag, runtime=RUNTIME),  # fmt: skip
        "pipeline_init": lambda: TemplatePipeline([load_template("toy/scale", runtime=RUNTIME)], trust_code=flag,
                                                  runtime=RUNTIME),  # fmt: skip
    }
    is_bool = type(flag) is bool
    harness.check("templates", calls[entry], should_fail=not is_bool, example=(entry, flag))
    if not is_bool:
        try:
            calls[entry]()
        except TrustFlagError as exc:
            assert "trust_code" in str(exc)
        else:  # pragma: no cover - harness.check already failed
            raise AssertionError(f"{flag!r} accepted")
