"""One identify -> pipeline -> load path (issue 20.6): each checkpoint is identified once and closed when dropped.

A spy plugin answers ``load_model`` with no claim and records every checkpoint it is asked about, through pluggy
like every family; before the fix ``run --model X`` identified the first checkpoint twice and left one open.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from diffstudio import hookimpl
from diffstudio.runtime import Runtime
from diffstudio_shapes import model as shapes

pytestmark = pytest.mark.skipif(not shapes.installed(), reason="the embedded shapes weights are not installed")


class IdentifySpy:
    """Records each (config, checkpoint) the families are asked to claim."""

    def __init__(self) -> None:
        self.asked: list[tuple[Any, Any]] = []

    @hookimpl
    def load_model(self, checkpoint: Any, config: Any) -> None:
        self.asked.append((config, checkpoint))


def _runtime() -> tuple[Runtime, IdentifySpy]:
    runtime = Runtime(env={})
    spy = IdentifySpy()
    runtime.register(spy, name="identify-spy")
    return runtime, spy


def _open(checkpoint: Any) -> bool:
    return bool(checkpoint._storages)  # memory maps still held by the Checkpoint view


def test_run_model_files_identify_each_checkpoint_once_and_close_it() -> None:
    from diffstudio.run_api import load_pipeline

    runtime, spy = _runtime()
    files = shapes.model_files()
    pipe, _ = load_pipeline(runtime, files, tokenizer=[str(shapes.WEIGHTS / "tokenizer")], device="cpu")
    asked = [str(Path(c.path).name) for c, _ in spy.asked]
    assert sorted(asked) == sorted(Path(f).name for f in files), asked  # once each (the first was asked twice)
    assert not [c.path for c, checkpoint in spy.asked if _open(checkpoint)]
    assert {"dit", "vae", "text_encoder"} <= set(pipe.loaded)


def test_training_identifies_each_managed_entry_once() -> None:
    from diffstudio.train import TrainConfig
    from diffstudio.train.models import load_training_pipeline

    runtime, spy = _runtime()
    dit, vae, text = shapes.model_files()
    config = TrainConfig(
        model_paths=[dit, {"path": vae, "offload_device": "cpu"}, text], fp8_models=["text_encoder"],
        tokenizer_path=str(shapes.WEIGHTS / "tokenizer"), trainable_models=["dit"],
    )  # fmt: skip
    pipe = load_training_pipeline(config, runtime, "cpu")
    assert len(spy.asked) == 3, [c.describe() for c, _ in spy.asked]  # was 7: the first thrice, the others twice
    assert not [c.describe() for c, checkpoint in spy.asked if _open(checkpoint)]
    assert pipe.loaded["vae"].strategy.report().offload.startswith("cpu/")


def test_identified_closes_what_nobody_took() -> None:
    from diffstudio.config import ModelConfig
    from diffstudio.identify import identified, identify

    runtime, spy = _runtime()
    dit, vae, _ = shapes.model_files()
    first, second = ModelConfig(path=dit), ModelConfig(path=vae)
    with identified(runtime, [first, second]) as found:
        taken, claim = identify(runtime, first)
        assert taken is found[0].checkpoint and claim.component == "dit"
        taken.tensor(next(iter(taken.keys())))  # maps its file
    assert len(spy.asked) == 2
    assert _open(taken) and not _open(found[1].checkpoint)  # the caller owns what it took
    taken.close()


def test_wrong_family_names_the_pipeline_that_serves_it() -> None:
    pytest.importorskip("diffstudio_flux1")
    from diffstudio.config import ModelConfig
    from diffstudio.pipeline.base import WrongFamilyError
    from diffstudio_flux1.pipeline import FluxImagePipeline

    with pytest.raises(WrongFamilyError, match=r"Use the flux2 pipeline for it \('flux2': Flux2ImagePipeline"):
        FluxImagePipeline.from_pretrained(device="cpu", model_configs=[ModelConfig(path=shapes.model_files()[0])])
