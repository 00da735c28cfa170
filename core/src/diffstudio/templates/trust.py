"""The one trust rule for template code.

A template reaches diffstudio in one of three ways:

1. **installed package** (``register_templates`` through the ``diffstudio`` entry point): trusted, because the
   user installed it with pip like any other library;
2. **data-only folder** (``template.json`` + safetensors naming a registered class): runs no code at all;
3. **seed-format folder** (``model.py`` + weights, as DiffSynth publishes them): ``model.py`` is arbitrary Python.
   It is executed only when the caller passes ``trust_code=True`` (``--trust-code``) for that call; otherwise
   :class:`~diffstudio.errors.UntrustedCodeError` names the file, says why and how to inspect it. There is never
   an interactive prompt. ``DIFFSTUDIO_DISABLE_REMOTE_CODE=1`` refuses such code even when trusted. When code
   runs, its SHA-256 is logged (logger ``diffstudio.templates``), and a ``code_sha256`` pin refuses code that
   changed.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from pathlib import Path

from diffstudio.errors import CodeHashMismatchError, RemoteCodeDisabledError, UntrustedCodeError

logger = logging.getLogger("diffstudio.templates")

DISABLE_ENV = "DIFFSTUDIO_DISABLE_REMOTE_CODE"
_TRUE = {"1", "true", "yes", "on"}

__all__ = ["DISABLE_ENV", "check_code_allowed", "code_sha256_of", "remote_code_disabled"]


def code_sha256_of(path: str | os.PathLike[str]) -> str:
    """SHA-256 (hex) of a code file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def remote_code_disabled(env: Mapping[str, str] | None = None) -> bool:
    """True when ``DIFFSTUDIO_DISABLE_REMOTE_CODE`` is set to a true value."""
    env = os.environ if env is None else env
    return env.get(DISABLE_ENV, "").strip().lower() in _TRUE


def check_code_allowed(
    code_file: Path,
    *,
    trust_code: bool,
    code_sha256: str | None = None,
    env: Mapping[str, str] | None = None,
) -> str:
    """Decide whether ``code_file`` may be executed; return its SHA-256 when it may.

    Nothing is imported or executed here: the file is only read to hash it.

    Args:
        code_file: The template's ``model.py``.
        trust_code: The caller's explicit, per-call opt-in.
        code_sha256: A pinned SHA-256 (hex); the code must match it exactly.
        env: Environment for ``DIFFSTUDIO_DISABLE_REMOTE_CODE`` (default ``os.environ``).

    Raises:
        RemoteCodeDisabledError: The kill switch is set (checked first, so it wins over ``trust_code``).
        UntrustedCodeError: ``trust_code`` is False.
        CodeHashMismatchError: The file's hash differs from ``code_sha256``.
    """
    digest = code_sha256_of(code_file)
    folder = code_file.parent
    inspect_hint = (
        f"Inspect it first: `diffstudio template inspect {folder}` prints the file and its SHA-256 without "
        f"running it (or open {code_file} in an editor)."
    )
    if remote_code_disabled(env):
        raise RemoteCodeDisabledError(
            f"The template folder {folder} ships Python code ({code_file.name}, sha256 {digest}), and "
            f"{DISABLE_ENV}=1 forbids running template code, even with trust_code=True. Use an installed template "
            f"package or a data-only template (template.json + safetensors, written by `diffstudio template "
            f"export`), or unset {DISABLE_ENV}. {inspect_hint}"
        )
    if not trust_code:
        raise UntrustedCodeError(
            f"Refusing to run {code_file} (sha256 {digest}). This template folder is in the seed format: loading "
            f"it means executing that Python file with your permissions, and a file downloaded from a model hub "
            f"can do anything your user can. {inspect_hint} If you trust it, pass trust_code=True (command line: "
            f"--trust-code), ideally with code_sha256='{digest}' (--code-sha256 {digest}) so that changed code is "
            f"refused. Safer still: ask the author for a data-only template or an installable template package."
        )
    if code_sha256 is not None and digest != code_sha256.strip().lower():
        raise CodeHashMismatchError(
            f"{code_file} has sha256 {digest}, but code_sha256 pins {code_sha256.strip().lower()}: the code changed "
            f"since it was reviewed. Inspect it again (`diffstudio template inspect {folder}`) and update the pin."
        )
    logger.warning("diffstudio: executing template code %s (sha256 %s), trusted by the caller", code_file, digest)
    return digest
