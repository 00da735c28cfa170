"""Parse and check the device and dtype settings users write in configs.

A device is a string that :class:`torch.device` understands (``"cpu"``, ``"cuda"``, ``"cuda:1"``,
``"mps"``, ...) or a :class:`torch.device`. The extra value ``"disk"`` means "leave the weights in the
memory-mapped file" and is only meaningful where weights rest (the offload and onload states), never where
they compute.

A dtype is a floating-point :class:`torch.dtype` or its name (``"bfloat16"``, ``"float8_e4m3fn"``, an
optional ``"torch."`` prefix, and the short forms ``bf16`` / ``fp16`` / ``fp32``). The float8 storage types
exist only in newer torch builds; naming one on a build without it is an error that says so, rather than
"unknown dtype".

On CPU the default computation dtype depends on the hardware: :func:`cpu_compute_path` reports whether bf16
runs natively (``avx512_bf16`` or AMX-BF16, read from torch's CPU capabilities or ``/proc/cpuinfo``) and why;
:func:`default_compute_dtype` picks bf16 only there (and on CUDA), float32 elsewhere. An explicit dtype always
wins.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
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


# ----------------------------------------------------------------------------------------------------------
# which CPU compute path runs (native or emulated bf16)
# ----------------------------------------------------------------------------------------------------------

#: CPU features that give torch (oneDNN) native bfloat16 arithmetic: the AVX-512 BF16 dot-product
#: instructions, or Intel AMX tiles with bf16 support. Without one of them bf16 kernels convert every
#: element to float32 and back, which on this project's reference machine (AVX2 only) made a bf16 Conv2d
#: about 90x slower than float32.
NATIVE_BF16_FLAGS: tuple[str, ...] = ("avx512_bf16", "amx_bf16")

#: Environment variable that overrides the detection: ``native`` or ``emulated`` (for tests, or for a CPU
#: whose flags are misreported). Anything else is ignored.
CPU_BF16_ENV = "DIFFSTUDIO_CPU_BF16"


@dataclass(frozen=True)
class CpuComputePath:
    """Which bfloat16 path this CPU runs, and why.

    Attributes:
        native_bf16: True when bf16 arithmetic is done in hardware (``avx512_bf16`` or AMX-BF16).
        path: ``"native-bf16"`` or ``"emulated-bf16"``.
        default_dtype: The CPU's default computation dtype name: ``"bfloat16"`` where native, else
            ``"float32"`` (bf16 there costs more than it saves).
        reason: One line naming the flags that decided it and where they were read.
        source: Where the flags came from: ``"torch.cpu"``, ``"/proc/cpuinfo"``, ``"env"`` or ``"none"``.
    """

    native_bf16: bool
    path: str
    default_dtype: str
    reason: str
    source: str

    def describe(self) -> str:
        """A one-line summary for logs: path, default dtype and reason."""
        return f"CPU {self.path} (default dtype {self.default_dtype}): {self.reason}"


def classify_cpu_flags(flags: Iterable[str], *, source: str) -> CpuComputePath:
    """Decide the CPU compute path from a set of CPU feature names (pure; testable with any flag set).

    Args:
        flags: Feature names as ``/proc/cpuinfo`` and ``torch.cpu.get_capabilities()`` spell them
            (``"avx2"``, ``"avx512_bf16"``, ``"amx_bf16"``, ...).
        source: Where the flags were read (recorded in the reason).

    Returns:
        The path: native where any of :data:`NATIVE_BF16_FLAGS` is present, else emulated.
    """
    present = {f.strip().lower() for f in flags}
    found = [f for f in NATIVE_BF16_FLAGS if f in present]
    if found:
        reason = f"{source} reports {', '.join(found)}: bf16 matmuls and convolutions run in hardware"
        return CpuComputePath(True, "native-bf16", "bfloat16", reason, source)
    best = next((f for f in ("avx512f", "avx512_f", "avx2", "avx") if f in present), None)
    have = f"only {best}" if best else "no AVX flags"
    reason = (
        f"{source} reports {have}, no {' / '.join(NATIVE_BF16_FLAGS)}: bf16 is emulated through float32 "
        f"conversions (convolutions run in float32 when bf16 is asked for)"
    )
    return CpuComputePath(False, "emulated-bf16", "float32", reason, source)


def _cpu_flags() -> tuple[frozenset[str], str]:
    """The CPU's feature names and their source: torch's own detection first, else ``/proc/cpuinfo``."""
    import torch

    capabilities = getattr(torch.cpu, "get_capabilities", None)
    if callable(capabilities):
        try:
            caps = capabilities()
            return frozenset(str(k) for k, v in caps.items() if v is True), "torch.cpu"
        except Exception:  # older builds / unusual platforms: fall through to cpuinfo
            pass
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
    except OSError:
        return frozenset(), "none"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split()), "/proc/cpuinfo"
    return frozenset(), "none"


@lru_cache(maxsize=1)
def _detected_path() -> CpuComputePath:
    flags, source = _cpu_flags()
    return classify_cpu_flags(flags, source=source)


def cpu_compute_path() -> CpuComputePath:
    """Report this machine's CPU bf16 path (cached detection; :data:`CPU_BF16_ENV` overrides it).

    Returns:
        The :class:`CpuComputePath`.
    """
    forced = os.environ.get(CPU_BF16_ENV, "").strip().lower()
    if forced in ("native", "emulated"):
        native = forced == "native"
        flags = NATIVE_BF16_FLAGS[:1] if native else ("avx2",)
        decided = classify_cpu_flags(flags, source="env")
        return replace(decided, reason=f"{CPU_BF16_ENV}={forced} (detection overridden)")
    return _detected_path()


def default_compute_dtype(device: str) -> torch.dtype:
    """The computation dtype used when none is given: bf16 on CUDA and on native-bf16 CPUs, else float32."""
    import torch

    if device.startswith("cuda"):
        return torch.bfloat16
    if device.startswith("cpu") and cpu_compute_path().native_bf16:
        return torch.bfloat16
    return torch.float32


def emulated_bf16(device: torch.device | str, dtype: torch.dtype) -> bool:
    """True when ``dtype`` is bfloat16 computed on a CPU without native bf16 (slow kernels to avoid)."""
    import torch

    kind = device.type if isinstance(device, torch.device) else str(device).partition(":")[0]
    return dtype == torch.bfloat16 and kind == "cpu" and not cpu_compute_path().native_bf16


def compute_record(device: str, dtype: torch.dtype | str) -> dict[str, Any]:
    """What an image record says about the computation: device, dtype and, on CPU, the bf16 path and why."""
    name = str(dtype).removeprefix("torch.")
    record: dict[str, Any] = {"device": device, "dtype": name}
    if device.startswith("cpu"):
        path = cpu_compute_path()
        record["cpu_path"] = path.path
        record["reason"] = path.reason
        if name == "bfloat16" and not path.native_bf16:
            record["float32_ops"] = "convolutions"
    return record


def compute_line(device: str, dtype: torch.dtype | str) -> str:
    """One line for the console: the device, the dtype and, on CPU, which bf16 path runs and why."""
    name = str(dtype).removeprefix("torch.")
    if not device.startswith("cpu"):
        return f"computing in {name} on {device}"
    path = cpu_compute_path()
    extra = " (convolutions in float32)" if name == "bfloat16" and not path.native_bf16 else ""
    return f"computing in {name}{extra} on cpu, {path.path} path: {path.reason}"
