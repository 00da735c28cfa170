"""Size limits checked before a checkpoint's header is parsed, and how to change them.

A safetensors header is JSON, so its size decides how long parsing takes and how much memory it needs: a
90 MB header of 1.35 million entries took a minute and 1.8 GB to open before these limits. Both limits are
checked on the raw bytes, before anything proportional to them is allocated:

``DIFFSTUDIO_MAX_HEADER_BYTES`` (default 100,000,000, the safetensors format's own limit)
    The largest JSON header accepted, in bytes. Lower it to refuse large headers sooner; values above the
    default are allowed but such files are not valid safetensors for other readers.
``DIFFSTUDIO_MAX_TENSORS`` (default 200,000)
    The most JSON objects (tensor entries, plus ``__metadata__`` and the enclosing object) one header may
    hold. The largest published single files hold a few thousand tensors; raise it for a file that really
    holds more.

A value that is not a positive integer is a :class:`~diffstudio.errors.ConfigError` naming the variable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from diffstudio.errors import ConfigError

__all__ = [
    "DEFAULT_MAX_HEADER_BYTES",
    "DEFAULT_MAX_TENSORS",
    "ENV_MAX_HEADER_BYTES",
    "ENV_MAX_TENSORS",
    "HeaderLimits",
    "header_limits",
]

DEFAULT_MAX_HEADER_BYTES = 100_000_000
"""Default of ``DIFFSTUDIO_MAX_HEADER_BYTES`` (the limit of the reference safetensors reader)."""
DEFAULT_MAX_TENSORS = 200_000
"""Default of ``DIFFSTUDIO_MAX_TENSORS``."""
ENV_MAX_HEADER_BYTES = "DIFFSTUDIO_MAX_HEADER_BYTES"
ENV_MAX_TENSORS = "DIFFSTUDIO_MAX_TENSORS"


@dataclass(frozen=True)
class HeaderLimits:
    """The limits in force.

    Attributes:
        max_header_bytes: Largest JSON header, in bytes.
        max_tensors: Most JSON objects in one header.
    """

    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    max_tensors: int = DEFAULT_MAX_TENSORS


def _positive(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip().replace("_", "")
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise ConfigError(
            f"{name}={os.environ[name]!r} is not a positive whole number; unset it for the default ({default:_}) "
            f"or set a number such as {name}={default}."
        )
    return value


def header_limits() -> HeaderLimits:
    """Read the limits from the environment (each call, so a test or a long-lived process can change them).

    Raises:
        ConfigError: a variable is set to something other than a positive whole number.
    """
    return HeaderLimits(
        max_header_bytes=_positive(ENV_MAX_HEADER_BYTES, DEFAULT_MAX_HEADER_BYTES),
        max_tensors=_positive(ENV_MAX_TENSORS, DEFAULT_MAX_TENSORS),
    )
