"""The parts of a training checkpoint, in the project's own format: safetensors plus JSON, never a pickle.

Each part is one safetensors file whose facts that are not tensors sit as JSON in its ``__metadata__``
(key ``diffstudio.state``):

- ``weights.safetensors``: the parameters that train and the persistent buffers of the trained modules, by
  their state-dict names in the training objective;
- ``optimizer.safetensors``: the optimizer's per-parameter tensors as ``state.<index>.<name>``; its parameter
  groups and any values that are not tensors in the JSON;
- ``ema.safetensors``: the ``--ema_decay`` averages as ``shadow.<i>``; decay and update count in the JSON;
- ``rng-<process>.safetensors``: one process's random generators (torch CPU and CUDA, numpy, Python).

Reading checks a part against the live objects (names, counts, shapes, dtypes, the JSON's types, the step)
and returns plain values; nothing is changed until :func:`apply` runs, after every part was read. Problems
are :class:`~diffstudio.errors.CheckpointError` naming the file.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from diffstudio.errors import CheckpointError
from diffstudio.train.ema import EmaWeights
from diffstudio.train.files import parse_json, save_weights

STATE_KEY = "diffstudio.state"
WEIGHTS, OPTIMIZER, EMA = "weights.safetensors", "optimizer.safetensors", "ema.safetensors"


def rng_name(process: int) -> str:
    """File name of process ``process``'s random states."""
    return f"rng-{process}.safetensors"


@dataclass
class TrainingParts:
    """The live objects a checkpoint saves and restores.

    Attributes:
        module: The training objective (not wrapped by DDP).
        optimizer: The torch optimizer (not accelerate's wrapper).
        ema: The ``--ema_decay`` averages, if any.
        scaler: accelerate's gradient scaler (fp16 on a GPU), if any.
    """

    module: nn.Module
    optimizer: torch.optim.Optimizer
    ema: EmaWeights | None = None
    scaler: Any = None


@dataclass
class PartValues:
    """What was read from a checkpoint's parts, checked, not yet applied."""

    weights: dict[str, Tensor] = field(default_factory=dict)
    optimizer: dict[str, Any] = field(default_factory=dict)
    ema: dict[str, Any] | None = None
    rng: dict[str, Any] | None = None
    scaler: dict[str, Any] | None = None


# -- files ------------------------------------------------------------------------------------------------


def write_part(path: Path, tensors: Mapping[str, Tensor], facts: Mapping[str, Any]) -> Path:
    """Write one part: ``tensors`` and the JSON ``facts`` in the file's metadata (atomically)."""
    import json

    return save_weights(path, tensors, {STATE_KEY: json.dumps(dict(facts))})


def read_part(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read one part: its tensors and its JSON facts, after validating the safetensors header.

    Raises:
        CheckpointError: missing, not safetensors, no facts, or unreadable tensors.
    """
    from diffstudio.loading.safetensors_header import read_header

    if not path.is_file():
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete")
    try:
        header = read_header(path)
    except OSError as exc:
        raise CheckpointError(f"{path} cannot be read: {exc}") from exc
    raw = header.metadata.get(STATE_KEY)
    if raw is None:
        raise CheckpointError(f"{path} has no {STATE_KEY!r} metadata; it is not a diffstudio checkpoint part")
    facts = parse_json(raw, f"{path} ({STATE_KEY} metadata)")
    if not isinstance(facts, dict):
        raise CheckpointError(f"{path}: the {STATE_KEY!r} metadata is not a JSON object")
    try:
        from safetensors.torch import load_file

        tensors = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - whatever the reader raises, the file is unusable
        raise CheckpointError(f"{path}: the tensors cannot be read ({type(exc).__name__}: {exc})") from exc
    return tensors, facts


def _check_tensor(path: Path, name: str, saved: Tensor, like: Tensor, *, same_dtype: bool = True) -> None:
    if tuple(saved.shape) != tuple(like.shape):
        raise CheckpointError(
            f"{path}: {name} has shape {list(saved.shape)}, the run has {list(like.shape)}; the checkpoint is from "
            "another model or configuration"
        )
    if same_dtype and saved.dtype != like.dtype:
        raise CheckpointError(f"{path}: {name} is {saved.dtype}, the run has {like.dtype} (another --torch_dtype?)")
    if not same_dtype and not saved.is_floating_point():
        raise CheckpointError(f"{path}: {name} is {saved.dtype}, not a floating-point tensor")


def as_count(value: Any, path: Path, name: str, *, low: int = 0) -> int:
    """``value`` if it is an integer (not a bool) >= ``low``, else a CheckpointError naming ``path``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise CheckpointError(f"{path}: {name} must be an integer >= {low}, got {value!r}")
    return value


def as_number(value: Any, path: Path, name: str) -> float:
    """``value`` as a float if it is a finite number (not a bool), else a CheckpointError naming ``path``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CheckpointError(f"{path}: {name} must be a finite number, got {value!r}")
    return float(value)


# -- weights ----------------------------------------------------------------------------------------------


def trained_tensors(module: nn.Module) -> dict[str, Tensor]:
    """The objective's parameters that train, and the persistent buffers of its trained modules, by name."""
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    out: dict[str, Tensor] = {}
    for name, value in module.state_dict(keep_vars=True).items():
        if isinstance(value, nn.Parameter):
            if id(value) in trainable:
                out[name] = value
        elif name.split(".", 1)[0] in ("trained", "extra"):
            out[name] = value
    return out


def read_weights(path: Path, module: nn.Module) -> dict[str, Tensor]:
    """The saved trained tensors, checked against ``module``'s (same names, shapes and dtypes)."""
    tensors, facts = read_part(path)
    live = trained_tensors(module)
    missing, unexpected = sorted(set(live) - set(tensors)), sorted(set(tensors) - set(live))
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match the trained modules (missing: {missing[:3]}, unexpected: {unexpected[:3]}); "
            "the checkpoint is from another --trainable_models / LoRA configuration"
        )
    for name, saved in tensors.items():
        _check_tensor(path, name, saved, live[name])
    return tensors


# -- optimizer --------------------------------------------------------------------------------------------


def _to_json(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_to_json(v, where) for v in value]
    raise TypeError(f"{where}: {type(value).__name__} values cannot be checkpointed")


def _like(current: Any, saved: Any, path: Path, name: str) -> Any:
    """``saved`` in the type of ``current`` (tuples restored), or a CheckpointError if their kinds differ."""
    if current is None or isinstance(current, (bool, str)):
        if type(saved) is not type(current):
            raise CheckpointError(f"{path}: {name} must be {current!r}-like, got {saved!r}")
        return saved
    if isinstance(current, (int, float)):
        if isinstance(saved, bool) or not isinstance(saved, (int, float)):
            raise CheckpointError(f"{path}: {name} must be a number, got {saved!r}")
        return type(current)(saved)
    if isinstance(current, (list, tuple)):
        if not isinstance(saved, list) or len(saved) != len(current):
            raise CheckpointError(f"{path}: {name} must be a list of {len(current)}, got {saved!r}")
        items = [_like(c, s, path, f"{name}[{i}]") for i, (c, s) in enumerate(zip(current, saved))]
        return tuple(items) if isinstance(current, tuple) else items
    raise CheckpointError(f"{path}: {name} cannot be restored from JSON")


def optimizer_record(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The optimizer's state as tensors ``state.<index>.<name>`` and JSON facts."""
    state = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    values: dict[str, dict[str, Any]] = {}
    for index, entries in state["state"].items():
        for key, value in entries.items():
            if isinstance(value, Tensor):
                tensors[f"state.{index}.{key}"] = value
            else:
                values.setdefault(str(index), {})[key] = _to_json(value, f"optimizer state {index}.{key}")
    groups = [{k: _to_json(v, f"param group {k}") for k, v in group.items()} for group in state["param_groups"]]
    return tensors, {"param_groups": groups, "values": values}


def _adam_keys(optimizer: torch.optim.Optimizer) -> set[str]:
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return set()
    amsgrad = any(group.get("amsgrad") for group in optimizer.param_groups)
    return {"step", "exp_avg", "exp_avg_sq", *(("max_exp_avg_sq",) if amsgrad else ())}


def read_optimizer(path: Path, optimizer: torch.optim.Optimizer, step: int) -> dict[str, Any]:
    """A state dict for ``optimizer.load_state_dict``, checked against the live optimizer and the step."""
    tensors, facts = read_part(path)
    current = optimizer.state_dict()
    groups, values = facts.get("param_groups"), facts.get("values", {})
    if not isinstance(groups, list) or len(groups) != len(current["param_groups"]):
        raise CheckpointError(f"{path}: param_groups must be a list of {len(current['param_groups'])} groups")
    if not isinstance(values, dict):
        raise CheckpointError(f"{path}: values must be a JSON object")
    restored_groups = []
    for i, (live, saved) in enumerate(zip(current["param_groups"], groups)):
        if not isinstance(saved, dict) or set(saved) != set(live):
            raise CheckpointError(f"{path}: param group {i} must have the keys {sorted(live)}")
        restored_groups.append({k: _like(live[k], saved[k], path, f"param group {i} {k}") for k in live})
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        parts = name.split(".")
        if len(parts) != 3 or parts[0] != "state" or not parts[1].isdigit() or int(parts[1]) >= len(params):
            raise CheckpointError(f"{path}: unexpected tensor {name!r}")
        state.setdefault(int(parts[1]), {})[parts[2]] = tensor
    for index, entries in values.items():
        if not index.isdigit() or int(index) >= len(params) or not isinstance(entries, dict):
            raise CheckpointError(f"{path}: unexpected values entry {index!r}")
        for key, value in entries.items():
            if not isinstance(value, (int, float, bool, str)) and value is not None:
                raise CheckpointError(f"{path}: value {index}.{key} is not a JSON scalar")
            state.setdefault(int(index), {})[key] = value
    required = _adam_keys(optimizer)
    for index, entries in state.items():
        if required and set(entries) != required:
            raise CheckpointError(f"{path}: the state of parameter {index} must hold {sorted(required)}")
        for key, value in entries.items():
            if not isinstance(value, Tensor):
                continue
            if key == "step" or value.ndim == 0:
                if value.numel() != 1:
                    raise CheckpointError(f"{path}: state.{index}.{key} must be a scalar")
                counted = float(value)
                if key == "step" and not (0 <= counted <= step and counted == int(counted)):
                    raise CheckpointError(f"{path}: state.{index}.step is {counted}, the checkpoint is at step {step}")
            else:
                _check_tensor(path, f"state.{index}.{key}", value, params[index].detach(), same_dtype=False)
    return {"state": state, "param_groups": restored_groups}


# -- EMA --------------------------------------------------------------------------------------------------


def ema_record(ema: EmaWeights) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The averages as tensors ``shadow.<i>``; decay and update count as facts."""
    tensors = {f"shadow.{i}": s for i, s in enumerate(ema.shadow)}
    return tensors, {"decay": ema.decay, "updates": ema.updates, "count": len(ema.shadow)}


def read_ema(path: Path, ema: EmaWeights, step: int) -> dict[str, Any]:
    """A state for ``EmaWeights.load_state_dict``, checked against the live averages and the step."""
    tensors, facts = read_part(path)
    decay = as_number(facts.get("decay"), path, "decay")
    if not 0.0 < decay < 1.0:
        raise CheckpointError(f"{path}: decay must be in (0, 1), got {decay}")
    updates = as_count(facts.get("updates"), path, "updates")
    if updates > step:
        raise CheckpointError(f"{path}: {updates} EMA updates for a checkpoint at step {step}")
    names = [f"shadow.{i}" for i in range(len(ema.shadow))]
    if sorted(tensors) != sorted(names):
        raise CheckpointError(f"{path}: expected {len(names)} averages shadow.0..{len(names) - 1}")
    for name, live in zip(names, ema.shadow):
        _check_tensor(path, name, tensors[name], live)
    return {"decay": decay, "updates": updates, "shadow": [tensors[n] for n in names]}


# -- random states ----------------------------------------------------------------------------------------


def rng_record() -> tuple[dict[str, Tensor], dict[str, Any]]:
    """This process's random states: torch (CPU, CUDA) as tensors, numpy's and Python's as JSON (+ a tensor)."""
    version, internal, gauss = random.getstate()
    tensors: dict[str, Tensor] = {"torch": torch.get_rng_state()}
    facts: dict[str, Any] = {"python": [version, list(internal), gauss], "cuda": 0}
    if torch.cuda.is_available():
        states = torch.cuda.get_rng_state_all()
        tensors.update({f"cuda.{i}": s for i, s in enumerate(states)})
        facts["cuda"] = len(states)
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy comes with torch
        return tensors, facts
    algorithm, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    tensors["numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    facts["numpy"] = [str(algorithm), int(pos), int(has_gauss), float(cached)]
    return tensors, facts


def read_rng(path: Path) -> dict[str, Any]:
    """Random states that each generator accepts (tried on a throwaway generator first)."""
    tensors, facts = read_part(path)
    python = facts.get("python")
    out: dict[str, Any] = {}
    try:
        if not (isinstance(python, list) and len(python) == 3 and isinstance(python[1], list)):
            raise TypeError("python must be [version, state, gauss]")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in python[1]):
            raise TypeError("python state must be integers")
        out["python"] = (python[0], tuple(python[1]), python[2])
        random.Random().setstate(out["python"])
        if "torch" not in tensors:
            raise ValueError("no torch state")
        torch.Generator().set_state(tensors["torch"])
        out["torch"] = tensors["torch"]
        cuda = as_count(facts.get("cuda", 0), path, "cuda")
        out["cuda"] = [tensors[f"cuda.{i}"] for i in range(cuda)]
        if "numpy" in facts:
            import numpy as np

            algorithm, pos, has_gauss, cached = facts["numpy"]
            keys = tensors["numpy"].numpy()
            if keys.shape != (624,) or keys.min() < 0 or keys.max() >= 2**32:
                raise ValueError("numpy keys must be 624 values in [0, 2**32)")
            out["numpy"] = (algorithm, keys.astype(np.uint32), pos, has_gauss, cached)
            np.random.RandomState().set_state(out["numpy"])
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - every way a state can be refused
        raise CheckpointError(f"{path}: the random states are invalid ({type(exc).__name__}: {exc})") from exc
    return out


def apply_rng(states: Mapping[str, Any]) -> None:
    """Set this process's generators to ``states`` (from :func:`read_rng`)."""
    random.setstate(states["python"])
    torch.set_rng_state(states["torch"])
    if states.get("cuda") and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
    if "numpy" in states:
        import numpy as np

        np.random.set_state(states["numpy"])


# -- scaler -----------------------------------------------------------------------------------------------


def read_scaler(value: Any, path: Path) -> dict[str, Any] | None:
    """A gradient scaler's state from ``trainer_state.json`` (numbers only), or None."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: scaler must be a JSON object or null")
    for key, number in value.items():
        as_number(number, path, f"scaler {key}")
    return value


# -- all parts --------------------------------------------------------------------------------------------


def apply(values: PartValues, parts: TrainingParts) -> None:
    """Put what :func:`read_part` & co. returned into the live objects."""
    live = trained_tensors(parts.module)
    with torch.no_grad():
        for name, tensor in values.weights.items():
            live[name].copy_(tensor)
    parts.optimizer.load_state_dict(values.optimizer)
    if parts.ema is not None and values.ema is not None:
        parts.ema.load_state_dict(values.ema)
    if values.rng is not None:
        apply_rng(values.rng)
    if parts.scaler is not None and values.scaler:
        parts.scaler.load_state_dict(values.scaler)
