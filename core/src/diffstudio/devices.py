"""Parse and check the device and dtype settings users write in configs.

A device is a string that :class:`torch.device` understands (``"cpu"``, ``"cuda"``, ``"cuda:1"``,
``"mps"``, ...) or a :class:`torch.device`. The extra value ``"disk"`` means "leave the weights in the
memory-mapped file" and is only meaningful where weights rest (the offload and onload states), never where
they compute.

A dtype is a floating-point :class:`torch.dtype` or its name (``"bfloat16"``, ``"float8_e4m3fn"``, an
optional ``"torch."`` prefix, and the short forms ``bf16`` / ``fp16`` / ``fp32``). The float8 storage types
exist only in newer torch builds; naming one on a build without it is an error that says so, rather than
"unknown dtype".
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from diffstudio.errors import ConfigError

if TYPE_CHECKING:
    import torch

#: The device value that keeps weights on disk (memory-mapped) instead of in RAM.
DISK = "disk"

#: Float8 dtype names torch has introduced over time (not every build has all of them).
FP8_DTYPE_NAMES: tuple[str, ...] = (
    "float8_e4m3fn",
    "float8_e4m3fnuz",
    "float8_e5m2",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
)

#: Canonical names of the non-fp8 floating dtypes accepted everywhere.
BASE_DTYPE_NAMES: tuple[str, ...] = ("float16", "bfloat16", "float32", "float64")

#: Short forms and torch's own aliases, mapped to the canonical name.
DTYPE_ALIASES: dict[str, str] = {
    "bf16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
    "fp32": "float32",
    "float": "float32",
    "fp64": "float64",
    "double": "float64",
}

_DEVICE_EXAMPLES = "'cpu', 'cuda', 'cuda:N', 'mps', 'xpu', 'meta' (anything torch.device() accepts)"


def accepted_dtype_names() -> list[str]:
    """Return the dtype names this torch build accepts (canonical names first, then aliases)."""
    import torch

    candidates = BASE_DTYPE_NAMES + FP8_DTYPE_NAMES
    names = [n for n in candidates if isinstance(getattr(torch, n, None), torch.dtype)]
    return names + sorted(DTYPE_ALIASES)


def parse_device(value: object, *, name: str, allow_disk: bool = False) -> str:
    """Check one device setting and return it as a normalised string.

    Args:
        value: A device string or :class:`torch.device`.
        name: The setting's name, used in the error message (e.g. ``"offload_device"``).
        allow_disk: Whether ``"disk"`` is accepted (offload and onload states only).

    Returns:
        ``str(torch.device(value))`` (``"cuda"``, ``"cuda:1"``, ...), or ``"disk"``.

    Raises:
        ConfigError: The value is not a device (the message names the setting, the value and what is
            accepted).
    """
    import torch

    accepted = _DEVICE_EXAMPLES + (", or 'disk'" if allow_disk else "")
    if isinstance(value, torch.device):
        return str(value)
    if not isinstance(value, str):
        raise ConfigError(
            f"{name}={value!r} is a {type(value).__name__}, not a device; accepted: {accepted}, or a torch.device"
        )
    if value == DISK:
        if allow_disk:
            return DISK
        raise ConfigError(
            f"{name}='disk' is not allowed: weights can rest on disk (offload_device / onload_device) "
            f"but are prepared and computed on a real device; accepted: {_DEVICE_EXAMPLES}"
        )
    try:
        return str(torch.device(value))
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"{name}={value!r} is not a known device; accepted: {accepted}") from None


def parse_dtype(value: object, *, name: str) -> torch.dtype:
    """Check one dtype setting and return the :class:`torch.dtype`.

    Args:
        value: A floating-point :class:`torch.dtype` or its name (see the module docstring).
        name: The setting's name, used in the error message (e.g. ``"offload_dtype"``).

    Returns:
        The dtype.

    Raises:
        ConfigError: Unknown or non-floating dtype, or a float8 type this torch build does not have.
    """
    import torch

    if isinstance(value, torch.dtype):
        if not value.is_floating_point:
            raise ConfigError(
                f"{name}={value} is not a floating-point dtype; accepted: {', '.join(accepted_dtype_names())}"
            )
        return value
    if not isinstance(value, str):
        raise ConfigError(
            f"{name}={value!r} is a {type(value).__name__}, not a dtype; accepted: "
            f"{', '.join(accepted_dtype_names())}, or a torch.dtype"
        )
    key = value.strip().lower().removeprefix("torch.")
    key = DTYPE_ALIASES.get(key, key)
    if key in FP8_DTYPE_NAMES and not isinstance(getattr(torch, key, None), torch.dtype):
        raise ConfigError(
            f"{name}={value!r}: this torch build ({torch.__version__}) has no {key} type. Upgrade torch "
            f"(float8 storage types arrived in torch 2.1) or use one of: {', '.join(accepted_dtype_names())}"
        )
    found: Any = getattr(torch, key, None) if key in BASE_DTYPE_NAMES + FP8_DTYPE_NAMES else None
    if not isinstance(found, torch.dtype):
        raise ConfigError(f"{name}={value!r} is not a known dtype; accepted: {', '.join(accepted_dtype_names())}")
    return found


def is_fp8(dtype: torch.dtype) -> bool:
    """True when ``dtype`` is one of torch's float8 storage types."""
    return str(dtype).removeprefix("torch.") in FP8_DTYPE_NAMES


def check_device_available(device: str, name: str = "device") -> str:
    """Check that this machine can use ``device`` (a string from :func:`parse_device`); return it unchanged.

    ``"cuda"`` on a torch build or machine without CUDA, ``"cuda:3"`` on a machine with fewer GPUs, and
    ``"mps"`` / ``"xpu"`` where those are absent are refused here, before any weight is loaded.

    Raises:
        ConfigError: The device is not usable here (the message names the setting and what is available).
    """
    import torch

    kind, _, index = device.partition(":")
    if kind in ("cpu", "meta", DISK):
        return device
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(
                f"{name}={device!r}: this torch build or machine has no usable CUDA device "
                f"(torch {torch.__version__}, torch.cuda.is_available() is False); use {name}='cpu'"
            )
        if index and int(index) >= count:
            raise ConfigError(f"{name}={device!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
        return device
    backend = getattr(torch, kind, None) if kind != "mps" else getattr(torch.backends, "mps", None)
    available = getattr(backend, "is_available", None)
    if callable(available) and not available():
        raise ConfigError(f"{name}={device!r}: the {kind} backend is not available here; use {name}='cpu'")
    return device
