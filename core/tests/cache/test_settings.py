"""Step-cache settings, TeaCache's decision rule on recorded numbers, coefficients files and the calibration fit."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from diffstudio.cache import (
    FLUX1_DEV,
    CacheCoefficientsError,
    CacheSpec,
    Coefficients,
    DitShape,
    StepCacheError,
    TeaCache,
    load_coefficients,
    parse_cache_spec,
    resolve_coefficients,
)
from diffstudio.cache.calibrate import fit
from diffstudio.cache.coefficients import save_coefficients
from diffstudio.cache.units import cache_spec
from diffstudio.errors import DiffstudioError
from diffstudio.jobs import JobFieldError, check_field

SHAPES = DitShape("flux2", 2, 4, 128)


def test_cache_spec_parses_both_kinds_and_off():
    assert parse_cache_spec("teacache:0.4") == CacheSpec("teacache", 0.4)
    assert parse_cache_spec(" FBCache:0.1 ") == CacheSpec("fbcache", 0.1)
    assert parse_cache_spec("off") is None and parse_cache_spec(None) is None
    assert str(CacheSpec("teacache", 0.25)) == "teacache:0.25"


@pytest.mark.parametrize(
    ("value", "message"),
    [("foo:x", "unknown cache 'foo'"), ("teacache", "give a threshold"), ("teacache:x", "not a number"),
     ("teacache:-0.1", r"\[0, "), ("fbcache:nan", "finite"), (0.4, "must be a string")],
)  # fmt: skip
def test_bad_cache_settings_are_typed_errors(value, message):
    with pytest.raises(StepCacheError, match=message) as info:
        parse_cache_spec(value)
    assert isinstance(info.value, DiffstudioError)


def test_seed_argument_threshold_checks():
    assert cache_spec(0.4, None) == CacheSpec("teacache", 0.4)
    assert cache_spec(None, None) is None
    for bad in (-0.2, float("inf"), "0.4", True):
        with pytest.raises(StepCacheError, match="tea_cache_l1_thresh"):
            cache_spec(bad, None)
    with pytest.raises(StepCacheError, match="pass one of them"):
        cache_spec(0.4, "fbcache:0.1")


def test_job_field_and_alias_accept_the_cli_syntax():
    assert check_field("step_cache", "teacache:0.40") == "teacache:0.4"
    with pytest.raises(JobFieldError, match="--cache.*unknown cache 'foo'"):
        check_field("step_cache", "foo:x", "--cache")


def test_teacache_decision_trace_on_recorded_changes():
    # f(r) = r: the accumulated change crosses 0.25 after three steps of 0.1
    cache = TeaCache(0.25, Coefficients((1.0, 0.0)), num_steps=8)
    modulated = [torch.full((1, 1, 1), 1.1**i) for i in range(8)]  # relative change 0.1 per step
    decisions = [cache.decide(m) for m in modulated]
    assert decisions == [True, False, False, True, False, False, True, True]
    assert cache.estimates[0] is None and math.isclose(cache.estimates[1], 0.1, rel_tol=1e-5)


def test_flux1_polynomial_is_the_published_one():
    assert FLUX1_DEV.polynomial == (498.651651, -283.781631, 55.8554382, -3.82021401, 0.264230861)
    assert FLUX1_DEV(0.3) == float(np.poly1d(FLUX1_DEV.polynomial)(0.3))


def test_coefficients_are_bound_to_the_dit_they_were_fitted_for(tmp_path):
    # built-in FLUX.1-dev: used for dev's shape, refused elsewhere (Flex.2: 8 double blocks; FLUX.2)
    assert resolve_coefficients(None, DitShape("flux1", 19, 38, 3072)) is FLUX1_DEV
    for other in (DitShape("flex", 8, 38, 3072), DitShape("flux2", 8, 48, 3072), SHAPES):
        with pytest.raises(CacheCoefficientsError, match="cache calibrate"):
            resolve_coefficients(None, other)
    with pytest.warns(UserWarning, match="fitted for a flux1 DiT"):
        assert resolve_coefficients("flux1-dev", SHAPES) is FLUX1_DEV  # forced by name: a warning
    # a file beside the DiT is found; a file fitted for another shape is refused
    dit = tmp_path / "model.safetensors"
    save_coefficients(Coefficients((2.0, 0.5), SHAPES, "fitted"), tmp_path / "model.teacache.json")
    assert resolve_coefficients(None, SHAPES, [str(dit)]).polynomial == (2.0, 0.5)
    with pytest.raises(CacheCoefficientsError, match="fitted for a flux2 DiT"):
        resolve_coefficients(str(tmp_path / "model.teacache.json"), DitShape("flux2", 5, 20, 3072))
    assert resolve_coefficients([1, 2, 3], SHAPES).polynomial == (1.0, 2.0, 3.0)


def test_coefficients_file_round_trip_and_bad_files(tmp_path):
    path = save_coefficients(Coefficients((1.5, -2.0, 0.25), SHAPES, "x", {"rmse": 0.01}), tmp_path / "c.json")
    loaded = load_coefficients(path)
    assert loaded.polynomial == (1.5, -2.0, 0.25) and loaded.shape == SHAPES and loaded.fit == {"rmse": 0.01}
    bad = tmp_path / "bad.json"
    fmt = "diffstudio-teacache/1"
    for body in ("{", json.dumps({"format": "other"}), json.dumps({"format": fmt, "polynomial": []}),
                 json.dumps({"format": fmt, "polynomial": [1, "a"]})):  # fmt: skip
        bad.write_text(body)
        with pytest.raises(CacheCoefficientsError):
            load_coefficients(bad)
    with pytest.raises(CacheCoefficientsError, match="cannot read"):
        load_coefficients(tmp_path / "missing.json")


def test_calibration_fit_recovers_a_known_polynomial():
    xs = np.linspace(0.01, 0.5, 40)
    truth = (3.0, -1.0, 0.5, 0.02)
    polynomial, rmse = fit([(float(x), float(np.polyval(truth, x))) for x in xs], degree=3)
    assert np.allclose(polynomial, truth, atol=1e-8) and rmse < 1e-10
    with pytest.raises(StepCacheError, match="needs 5"):
        fit([(0.1, 0.2)] * 3, degree=4)


@pytest.mark.parametrize("value", ["foo:x", "teacache:-1", "teacache"])
def test_bad_cache_flag_is_a_one_line_error_before_anything_loads(value, tmp_path, capsys):
    from diffstudio.cli import EXIT_ERROR, main

    code = main(["run", "a red circle", "--cache", value, "--dry-run", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == EXIT_ERROR and "--cache" in err and len(err.strip().splitlines()) == 1


def test_cache_flag_is_part_of_the_recorded_job_and_its_hash(tmp_path):
    from diffstudio.run_api import run

    plain = run("a red circle", out=tmp_path, dry_run=True)
    cached = run("a red circle", out=tmp_path, dry_run=True, step_cache="teacache:0.4")
    assert plain[0]["hash"] != cached[0]["hash"]


def test_run_cache_flag_end_to_end_reports_computed_steps_and_replays(tmp_path, capsys):
    pytest.importorskip("diffstudio_shapes")
    from diffstudio.cli import main
    from diffstudio.outputs import read_image_metadata

    argv = ["run", "a red circle on a blue background", "--steps", "4", "--seed", "3", "--out", str(tmp_path)]
    assert main([*argv, "--cache", "teacache:1000", "--format", "json"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (row["step_cache"], row["steps"], row["computed_steps"]) == ("teacache:1000", 4, 2)  # first and last
    _, record = read_image_metadata(row["path"])
    assert record["job"]["step_cache"] == "teacache:1000" and record["extra"]["step_cache"]["computed_steps"] == 2
    assert main(["run", "--from", row["path"], "--out", str(tmp_path / "again"), "--format", "json"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["hash"] == row["hash"] and again["computed_steps"] == 2
