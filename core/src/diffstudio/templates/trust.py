"""The one trust rule for template code.

A template reaches diffstudio in one of three ways:

1. **installed package** (``register_templates`` through the ``diffstudio`` entry point): trusted, because the
   user installed it with pip like any other library;
2. **data-only folder** (``template.json`` + safetensors naming a registered class): runs no code at all;
3. **seed-format folder** (``model.py`` + weights, as DiffSynth publishes them): ``model.py`` is arbitrary Python.
   It is executed only when the caller passes ``trust_code=True`` (``--trust-code``) for that call; otherwise
   :class:`~diffstudio.errors.UntrustedCodeError` names the file, says why and how to inspect it. There is never
   an interactive prompt.

Fail-closed rules:

* ``trust_code`` must be a real ``bool`` (``type(x) is bool``): ``"no"``, ``1`` or ``None`` from a JSON config are a
  :class:`~diffstudio.errors.TrustFlagError`, never "truthy". A ``code_sha256`` pin must be a string (or None).
* ``DIFFSTUDIO_DISABLE_REMOTE_CODE``: ``1``/``true``/``yes``/``on`` refuse template code even when trusted;
  unset, empty, ``0``/``false``/``no``/``off`` leave the per-call rule alone; **any other value also refuses**
  (with a warning naming the value), so a typo never turns the kill switch off.
* ``model.py`` is read once; those bytes are hashed (logged, compared with the pin) and exactly those bytes are
  compiled and executed in a fresh module. Cached bytecode (``__pycache__/*.pyc``) is never used and none is
  written; bytecode files in a template folder are ignored and reported (:func:`bytecode_files`).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from diffstudio.errors import CodeHashMismatchError, RemoteCodeDisabledError, TrustFlagError, UntrustedCodeError

logger = logging.getLogger("diffstudio.templates")

DISABLE_ENV = "DIFFSTUDIO_DISABLE_REMOTE_CODE"
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})
_BYTECODE_SUFFIXES = (".pyc", ".pyo")

__all__ = [
    "DISABLE_ENV",
    "TrustedCode",
    "bytecode_files",
    "check_code_allowed",
    "check_trust_flag",
    "code_sha256_of",
    "remote_code_disabled",
    "require_pin",
    "trusted_code",
]


@dataclass(frozen=True)
class TrustedCode:
    """The exact bytes of a ``model.py`` that may run, and their SHA-256.

    Attributes:
        path: The file they were read from (for messages and ``__file__``).
        source: The bytes that were hashed; the only bytes that are compiled and executed.
        sha256: Their SHA-256 (hex).
    """

    path: Path
    source: bytes
    sha256: str


def code_sha256_of(path: str | os.PathLike[str]) -> str:
    """SHA-256 (hex) of a code file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def check_trust_flag(value: object, name: str = "trust_code") -> bool:
    """Return ``value`` when it is a real ``bool``; else raise :class:`~diffstudio.errors.TrustFlagError`.

    A string such as ``"no"`` (e.g. from a JSON config) is truthy in Python; treating it as a yes would run code the
    caller meant to refuse, so only ``True`` and ``False`` are accepted.
    """
    if type(value) is not bool:
        raise TrustFlagError(
            f"{name}={value!r} ({type(value).__name__}) is not a boolean; pass {name}=True or {name}=False "
            f"(command line: --trust-code or nothing). Nothing was executed."
        )
    return value


def require_pin(value: object, name: str = "code_sha256") -> str | None:
    """Return a ``code_sha256`` pin (a string or None); another type is a :class:`~diffstudio.errors.TrustFlagError`."""
    if value is not None and not isinstance(value, str):
        raise TrustFlagError(
            f"{name}={value!r} ({type(value).__name__}) is not a SHA-256 string; pass the 64 hex digits that "
            f"`diffstudio template inspect FOLDER` prints, or None. Nothing was executed."
        )
    return value


def remote_code_disabled(env: Mapping[str, str] | None = None) -> bool:
    """True when ``DIFFSTUDIO_DISABLE_REMOTE_CODE`` forbids template code.

    ``1``/``true``/``yes``/``on`` disable it; unset, empty and ``0``/``false``/``no``/``off`` do not; any other value
    disables it too (fail closed) and logs a warning naming the value.
    """
    env = os.environ if env is None else env
    raw = env.get(DISABLE_ENV)
    value = "" if raw is None else str(raw).strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    logger.warning(
        "diffstudio: %s=%r is not one of 1/true/yes/on or 0/false/no/off; template code stays disabled "
        "(fail closed). Set it to 0 to allow trusted template code.",
        DISABLE_ENV,
        raw,
    )
    return True


def bytecode_files(folder: str | os.PathLike[str]) -> list[Path]:
    """Cached bytecode in a template folder: ``__pycache__`` folders and ``*.pyc`` / ``*.pyo`` files, sorted.

    diffstudio never executes them (``model.py`` is compiled from its hashed source); they are reported because
    another tool importing the folder would run them instead of the reviewed source. Symbolic links are not
    followed.
    """
    root = Path(folder)
    found: list[Path] = []
    for current, dirs, files in os.walk(root):
        base = Path(current)
        found.extend(base / d for d in dirs if d == "__pycache__")
        found.extend(base / f for f in files if f.endswith(_BYTECODE_SUFFIXES))
    return sorted(found)


def trusted_code(
    code_file: Path,
    *,
    trust_code: bool,
    code_sha256: str | None = None,
    env: Mapping[str, str] | None = None,
) -> TrustedCode:
    """Decide whether ``code_file`` may be executed; return the exact bytes that may run.

    The file is read once; the returned bytes are the ones hashed, compared with the pin and logged. Nothing is
    imported or executed here.

    Args:
        code_file: The template's ``model.py``.
        trust_code: The caller's explicit, per-call opt-in (a ``bool``).
        code_sha256: A pinned SHA-256 (hex); the code must match it exactly.
        env: Environment for ``DIFFSTUDIO_DISABLE_REMOTE_CODE`` (default ``os.environ``).

    Raises:
        TrustFlagError: ``trust_code`` is not a bool or ``code_sha256`` not a string (checked first).
        RemoteCodeDisabledError: The kill switch is set (checked before ``trust_code``, so it wins).
        UntrustedCodeError: ``trust_code`` is False.
        CodeHashMismatchError: The file's hash differs from ``code_sha256``.
    """
    check_trust_flag(trust_code)
    require_pin(code_sha256)
    source = code_file.read_bytes()
    digest = hashlib.sha256(source).hexdigest()
    folder = code_file.parent
    inspect_hint = (
        f"Inspect it first: `diffstudio template inspect {folder}` prints the file and its SHA-256 without "
        f"running it (or open {code_file} in an editor)."
    )
    if remote_code_disabled(env):
        shown = (env if env is not None else os.environ).get(DISABLE_ENV, "")
        raise RemoteCodeDisabledError(
            f"The template folder {folder} ships Python code ({code_file.name}, sha256 {digest}), and "
            f"{DISABLE_ENV}={shown} forbids running template code, even with trust_code=True (only unset, empty, "
            f"0, false, no or off allow it). Use an installed template package or a data-only template "
            f"(template.json + safetensors, written by `diffstudio template export`), or unset {DISABLE_ENV}. "
            f"{inspect_hint}"
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
    stale = bytecode_files(folder)
    if stale:
        logger.warning(
            "diffstudio: %s holds cached bytecode (%s); it is ignored: only the reviewed source of %s runs",
            folder,
            ", ".join(str(p.relative_to(folder)) for p in stale[:5]),
            code_file.name,
        )
    logger.warning("diffstudio: executing template code %s (sha256 %s), trusted by the caller", code_file, digest)
    return TrustedCode(code_file, source, digest)


def check_code_allowed(
    code_file: Path,
    *,
    trust_code: bool,
    code_sha256: str | None = None,
    env: Mapping[str, str] | None = None,
) -> str:
    """Decide whether ``code_file`` may be executed; return its SHA-256 when it may (see :func:`trusted_code`).

    Callers that go on to execute the file must use :func:`trusted_code` and run the bytes it returns: reading the
    file a second time could run other bytes than those checked.
    """
    return trusted_code(code_file, trust_code=trust_code, code_sha256=code_sha256, env=env).sha256
