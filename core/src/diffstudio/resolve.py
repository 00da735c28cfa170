"""Turn a :class:`~diffstudio.config.ModelConfig` into local files, offline first.

Probe order (the first place where the pattern matches at least one file wins):

1. ``path``: a file, a list of files, a folder (the pattern applies inside it) or a glob. When ``path`` is set
   nothing else is probed.
2. ``local_model_path``: ``{local_model_path}/{model_id}``, then the folder itself.
3. Embedded models registered by installed packages (``embedded[model_id]``).
4. The Hugging Face hub cache: ``HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
   ``$XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub``. In it,
   ``models--{org}--{name}/refs/{revision or main}`` holds a commit whose files are in ``snapshots/{commit}``;
   a revision that is a commit sha (or a prefix of at least 7 hex digits) selects ``snapshots/{sha}``
   directly. With no revision and no ``refs/main``, the newest snapshot is used.
5. The ModelScope cache: ``MODELSCOPE_CACHE``, else ``~/.cache/modelscope/hub``; layouts
   ``models/{org}/{name}``, legacy ``{org}/{name}``, and ``models/{org}--{name}/snapshots/*``. ModelScope
   writes ``.`` in names as ``___``; both spellings are tried. The first two layouts record no revision, so
   they are skipped when ``revision`` is pinned.
6. Plain downloads: ``$DIFFSTUDIO_MODEL_BASE_PATH/{model_id}``, then ``./models/{model_id}`` (DiffSynth's
   default download folder).

``origin_file_pattern``: None, ``""`` or ``"./"`` is the whole repository and ``"sub/"`` a sub-folder (both
give ``is_folder=True``: tokenizers are loaded from a folder); anything else is a glob relative to the
repository root, and a list is the sorted union of its globs. Files inside hidden folders (``.cache``,
download temp folders) never match.

Only when nothing is found is a download considered, and only if ``skip_download`` is False, neither
``HF_HUB_OFFLINE`` nor ``DIFFSTUDIO_OFFLINE`` is set, and the ``huggingface_hub`` (or ``modelscope``) client
is installed. Every failure, a failed download included, is a
:class:`~diffstudio.errors.ModelNotFoundError` listing each path tried, in order.
"""

from __future__ import annotations

import glob
import importlib
import importlib.util
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffstudio.config import ModelConfig
from diffstudio.errors import ModelNotFoundError

_TRUE = {"1", "true", "yes", "on"}
_HEX = re.compile(r"[0-9a-f]{7,64}")
_GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class ResolvedModel:
    """Where a config's files are.

    Attributes:
        files: The matching files, sorted (for a folder pattern: every file in the folder).
        root: The folder the pattern was applied to (the repository snapshot, or the given folder).
        is_folder: The pattern named a folder (``"tokenizer/"``) or the whole repository.
        origin: Where the files were found: ``"path"``, ``"local"``, ``"embedded"``, ``"hf-cache"``,
            ``"modelscope-cache"``, ``"base-path"``, ``"local-dir"``, ``"download-huggingface"``,
            ``"download-modelscope"``.
        revision: The commit of a Hugging Face snapshot (or ModelScope snapshot name), when known.
        subfolder: For a folder pattern, the folder relative to ``root`` (``""`` for the whole repository).
    """

    files: tuple[Path, ...]
    root: Path
    is_folder: bool
    origin: str
    revision: str | None = None
    subfolder: str = ""

    @property
    def folder(self) -> Path:
        """The folder a folder pattern names (``root / subfolder``); ``root`` otherwise."""
        return self.root / self.subfolder if self.subfolder else self.root


# ----------------------------------------------------------------------------------------------------------
# patterns
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Pattern:
    """A parsed ``origin_file_pattern``: globs, or one folder (``""`` is the whole repository)."""

    items: tuple[str, ...]
    folder: str | None

    @classmethod
    def parse(cls, pattern: str | Sequence[str] | None) -> _Pattern:
        if pattern is None or isinstance(pattern, str):
            text = (pattern or "").replace("\\", "/")
            if text in ("", ".", "./"):
                return cls((), "")
            if text.endswith("/"):
                return cls((), text.strip("/").removeprefix("./"))
            return cls((text.removeprefix("./"),), None)
        items = tuple(p.replace("\\", "/").removeprefix("./") for p in pattern)
        if any(item in ("", ".") for item in items):  # one entry takes everything
            return cls((), "")
        return cls(items, None)

    def text(self) -> str:
        """The pattern as shown in messages."""
        if self.folder is not None:
            return f"{self.folder}/" if self.folder else ""
        return ", ".join(self.items)

    def allow_patterns(self) -> list[str] | None:
        """The pattern as hub ``allow_patterns`` (fnmatch, where ``*`` also crosses ``/``)."""
        if self.folder == "":
            return None
        if self.folder is not None:
            return [f"{self.folder}/*"]
        return [p[:-1] + "*" if p.endswith("/") else p for p in self.items]

    def match(self, root: Path) -> list[Path]:
        """Return the files under ``root`` the pattern selects (empty when there are none)."""
        if not root.is_dir():
            return []
        if self.folder is not None:
            return _walk_files(root / self.folder if self.folder else root)
        found: set[Path] = set()
        for item in self.items:
            if item.endswith("/"):
                found.update(_walk_files(root / item.rstrip("/")))
                continue
            wants_hidden = item.rsplit("/", 1)[-1].startswith(".")
            for path in root.glob(item):
                hidden_file = path.name.startswith(".") and not wants_hidden
                if path.is_file() and not hidden_file and not _in_hidden_folder(path.relative_to(root)):
                    found.add(path)
        return sorted(found)


def _in_hidden_folder(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts[:-1])


def _walk_files(folder: Path) -> list[Path]:
    """Every file under ``folder`` (links to files included), skipping hidden files and folders; sorted.

    Hidden entries are client bookkeeping (``.cache/``, ``.mdl``, ``._____temp/``), never model files.
    """
    if not folder.is_dir():
        return []
    files: list[Path] = []
    for current, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        base = Path(current)
        files.extend(base / n for n in names if not n.startswith(".") and (base / n).is_file())
    return sorted(files)


# ----------------------------------------------------------------------------------------------------------
# places
# ----------------------------------------------------------------------------------------------------------


def is_offline(env: Mapping[str, str] | None = None) -> bool:
    """True when ``HF_HUB_OFFLINE`` or ``DIFFSTUDIO_OFFLINE`` is set to a true value (no network at all)."""
    env = os.environ if env is None else env
    names = ("HF_HUB_OFFLINE", "DIFFSTUDIO_OFFLINE")
    return any(env.get(name, "").strip().lower() in _TRUE for name in names)


def _env_path(env: Mapping[str, str], name: str) -> Path | None:
    value = env.get(name)
    return Path(value).expanduser() if value else None


def hf_hub_cache(env: Mapping[str, str] | None = None) -> Path:
    """Return the Hugging Face hub cache folder, chosen as ``huggingface_hub`` chooses it."""
    env = os.environ if env is None else env
    explicit = _env_path(env, "HF_HUB_CACHE") or _env_path(env, "HUGGINGFACE_HUB_CACHE")
    if explicit is not None:
        return explicit
    home = _env_path(env, "HF_HOME")
    if home is not None:
        return home / "hub"
    xdg = _env_path(env, "XDG_CACHE_HOME")
    return (xdg if xdg is not None else Path.home() / ".cache") / "huggingface" / "hub"


def modelscope_cache(env: Mapping[str, str] | None = None) -> Path:
    """Return the ModelScope cache folder (``MODELSCOPE_CACHE``, default ``~/.cache/modelscope/hub``)."""
    env = os.environ if env is None else env
    explicit = _env_path(env, "MODELSCOPE_CACHE")
    return explicit if explicit is not None else Path.home() / ".cache" / "modelscope" / "hub"


@dataclass(frozen=True)
class _Probe:
    """One place to look. A probe with a ``note`` is only recorded in the list of paths tried."""

    origin: str
    root: Path
    revision: str | None = None
    note: str = ""


def _by_mtime(folders: Sequence[Path]) -> list[Path]:
    """Newest first (ties by name) so that an unpinned lookup picks the latest snapshot."""

    def key(path: Path) -> tuple[float, str]:
        try:
            return (-path.stat().st_mtime, path.name)
        except OSError:
            return (0.0, path.name)

    return sorted(folders, key=key)


def _hf_probes(model_id: str, revision: str | None, hub: Path) -> Iterator[_Probe]:
    repo = hub / f"models--{model_id.replace('/', '--')}"
    if not repo.is_dir():
        yield _Probe("hf-cache", repo, note="not in the cache")
        return
    snapshots = repo / "snapshots"
    ref = repo / "refs" / (revision or "main")
    if ref.is_file():
        commit = ref.read_text(encoding="utf-8").strip()
        yield _Probe("hf-cache", snapshots / commit, commit)
        return
    if revision is not None and _HEX.fullmatch(revision.lower()):
        matches = sorted(snapshots.glob(f"{revision.lower()}*")) if snapshots.is_dir() else []
        if not matches:
            yield _Probe("hf-cache", snapshots / revision, note="no such snapshot")
        for folder in matches:
            yield _Probe("hf-cache", folder, folder.name)
        return
    yield _Probe("hf-cache", ref, note="no such ref")
    if revision is None and snapshots.is_dir():
        for folder in _by_mtime([p for p in snapshots.iterdir() if p.is_dir()]):
            yield _Probe("hf-cache", folder, folder.name)


def _modelscope_names(model_id: str) -> list[str]:
    """``org/name`` as ModelScope stores it (``.`` in the name written as ``___``), then as given."""
    org, _, name = model_id.rpartition("/")
    masked = f"{org}/{name.replace('.', '___')}" if org else name.replace(".", "___")
    return [masked, model_id] if masked != model_id else [model_id]


def _modelscope_probes(model_id: str, revision: str | None, cache: Path) -> Iterator[_Probe]:
    names = _modelscope_names(model_id)
    for layout in ("models/{id}", "{id}"):
        for name in names:
            root = cache / layout.format(id=name)
            if revision is not None:
                note = f"skipped: records no revision, {revision!r} pinned"
                yield _Probe("modelscope-cache", root, note=note)
            else:
                yield _Probe("modelscope-cache", root)
    for name in names:
        snapshots = cache / "models" / name.replace("/", "--") / "snapshots"
        if revision is not None:
            yield _Probe("modelscope-cache", snapshots / revision, revision)
            continue
        found = [p for p in snapshots.iterdir() if p.is_dir()] if snapshots.is_dir() else []
        if not found:
            yield _Probe("modelscope-cache", snapshots / "*", note="no snapshot")
        master = [p for p in found if p.name == "master"]
        for folder in master + _by_mtime([p for p in found if p.name != "master"]):
            yield _Probe("modelscope-cache", folder, folder.name)


def _probes(
    config: ModelConfig, model_id: str, embedded: Mapping[str, Path], env: Mapping[str, str]
) -> Iterator[_Probe]:
    if config.local_model_path is not None:
        local = Path(config.local_model_path).expanduser().absolute()
        yield _Probe("local", local / model_id)
        yield _Probe("local", local)
    if model_id in embedded:
        yield _Probe("embedded", Path(embedded[model_id]))
    yield from _hf_probes(model_id, config.revision, hf_hub_cache(env))
    yield from _modelscope_probes(model_id, config.revision, modelscope_cache(env))
    base = _env_path(env, "DIFFSTUDIO_MODEL_BASE_PATH")
    if base is not None:
        yield _Probe("base-path", base.absolute() / model_id)
    yield _Probe("local-dir", Path.cwd() / "models" / model_id)


def _shown(probe: _Probe, pattern: _Pattern, result: str) -> str:
    if probe.note:
        return f"{probe.root}  [{probe.origin}: {probe.note}]"
    return f"{probe.root / pattern.text() if pattern.text() else probe.root}  [{probe.origin}: {result}]"


# ----------------------------------------------------------------------------------------------------------
# explicit paths
# ----------------------------------------------------------------------------------------------------------


def _resolve_path(config: ModelConfig, pattern: _Pattern) -> ResolvedModel:
    assert config.path is not None
    entries = config.path if isinstance(config.path, list) else [config.path]
    single = len(entries) == 1
    files: list[Path] = []
    tried: list[str] = []
    missing: list[str] = []
    for entry in entries:
        given = Path(os.fspath(entry)).expanduser()
        if given.is_file():
            files.append(given)
            tried.append(f"{given}  [path: file]")
        elif given.is_dir():
            matched = pattern.match(given)
            tried.append(f"{given / pattern.text() if pattern.text() else given}  [path: folder]")
            if matched and single:
                return ResolvedModel(
                    files=tuple(matched),
                    root=given,
                    is_folder=pattern.folder is not None,
                    origin="path",
                    subfolder=pattern.folder or "",
                )
            if not matched:
                missing.append(str(given))
            files.extend(matched)
        elif _GLOB_CHARS.search(str(given)):
            matched = sorted(Path(p) for p in glob.glob(str(given), recursive=True) if Path(p).is_file())
            tried.append(f"{given}  [path: glob, {len(matched)} file(s)]")
            if not matched:
                missing.append(str(given))
            files.extend(matched)
        else:
            tried.append(f"{given}  [path: does not exist]")
            missing.append(str(given))
    if missing or not files:
        raise ModelNotFoundError(
            f"the files of ModelConfig(path=...) ({', '.join(missing) or config.describe()})",
            tried,
            "Check the path: it must be an existing file, a list of files, a folder (the "
            "origin_file_pattern applies inside it) or a glob that matches at least one file.",
        )
    unique = sorted(set(files), key=files.index)
    root = Path(os.path.commonpath([str(f.absolute().parent) for f in unique]))
    return ResolvedModel(files=tuple(unique), root=root, is_folder=False, origin="path")


# ----------------------------------------------------------------------------------------------------------
# downloads
# ----------------------------------------------------------------------------------------------------------


def _download_source(config: ModelConfig, env: Mapping[str, str]) -> tuple[str | None, str]:
    """Return (client to use, or None with the reason why not)."""
    if config.skip_download:
        return None, "skip_download=True"
    if is_offline(env):
        return None, "offline mode (HF_HUB_OFFLINE / DIFFSTUDIO_OFFLINE is set)"
    wanted = [config.download_source] if config.download_source else ["huggingface", "modelscope"]
    modules = {"huggingface": "huggingface_hub", "modelscope": "modelscope"}
    for source in wanted:
        if source is not None and importlib.util.find_spec(modules[source]) is not None:
            return source, ""
    missing = " / ".join(modules[s] for s in wanted if s is not None)
    return None, f"no download client is installed ({missing}; pip install 'diffstudio-core[hub]')"


def _download(config: ModelConfig, model_id: str, pattern: _Pattern, source: str, hub: Path) -> Path:
    """Download the pattern's files with the client's ``snapshot_download``; return the local root."""
    local_dir = str(Path(config.local_model_path).expanduser() / model_id) if config.local_model_path else None
    allow = pattern.allow_patterns()
    client: Any
    if source == "huggingface":
        client = importlib.import_module("huggingface_hub")
        kwargs: dict[str, Any] = {
            "repo_id": model_id,
            "revision": config.revision,
            "allow_patterns": allow,
            "local_files_only": False,
        }
        if local_dir is not None:
            kwargs["local_dir"] = local_dir
        else:
            kwargs["cache_dir"] = str(hub)
        return Path(client.snapshot_download(**kwargs))
    client = importlib.import_module("modelscope")
    kwargs = {"revision": config.revision, "allow_file_pattern": allow}
    if local_dir is not None:
        kwargs["local_dir"] = local_dir
    return Path(client.snapshot_download(model_id, **kwargs))


def _hint(model_id: str, pattern: _Pattern, why_no_download: str) -> str:
    include = " ".join(f"--include '{p}'" for p in pattern.allow_patterns() or [])
    lines = [
        "To provide the files, do one of:",
        "  - pass ModelConfig(path=...) with the file(s), folder or glob;",
        f"  - download them: hf download {model_id} {include}".rstrip()
        + f"  (or: modelscope download --model {model_id});",
        "  - put them under local_model_path=... or $DIFFSTUDIO_MODEL_BASE_PATH as <folder>/"
        f"{model_id}/{pattern.text()}.",
    ]
    if why_no_download:
        lines.append(f"No download was attempted: {why_no_download}.")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------------------------------------


def resolve_files(
    config: ModelConfig,
    *,
    embedded: Mapping[str, Path] | None = None,
    env: Mapping[str, str] | None = None,
) -> ResolvedModel:
    """Find the files a config names, offline first (see the module docstring for the order).

    Args:
        config: The model config.
        embedded: Models shipped in installed packages: ``{model_id: folder}``.
        env: Environment to read cache locations and offline switches from (default ``os.environ``).

    Returns:
        The files, the folder they were matched in, and where that folder is.

    Raises:
        ModelNotFoundError: Nothing matched and no download was possible, or the download failed. The
            message lists every path tried, in order, and how to provide the files.
    """
    env = os.environ if env is None else env
    pattern = _Pattern.parse(config.origin_file_pattern)
    if config.path is not None:
        return _resolve_path(config, pattern)
    model_id = config.model_id
    assert model_id is not None  # ModelConfig guarantees path or model_id
    tried: list[str] = []
    for probe in _probes(config, model_id, embedded or {}, env):
        if probe.note:
            tried.append(_shown(probe, pattern, ""))
            continue
        files = pattern.match(probe.root)
        if files:
            return ResolvedModel(
                files=tuple(files),
                root=probe.root,
                is_folder=pattern.folder is not None,
                origin=probe.origin,
                revision=probe.revision,
                subfolder=pattern.folder or "",
            )
        tried.append(_shown(probe, pattern, "no match" if probe.root.is_dir() else "missing"))
    what = config.describe()
    if embedded and model_id in embedded:
        raise ModelNotFoundError(
            what,
            tried,
            f"{model_id!r} is an embedded model and is never downloaded; check origin_file_pattern "
            f"against the files in {embedded[model_id]}.",
        )
    source, why_not = _download_source(config, env)
    if source is None:
        raise ModelNotFoundError(what, tried, _hint(model_id, pattern, why_not))
    try:
        root = _download(config, model_id, pattern, source, hf_hub_cache(env))
    except Exception as exc:  # any client or network failure becomes the typed error
        detail = f"{type(exc).__name__}: {exc}".strip()
        hint = _hint(model_id, pattern, "") + f"\nDownloading from {source} failed: {detail[:500]}"
        raise ModelNotFoundError(what, [*tried, f"download from {source}  [failed]"], hint) from exc
    files = pattern.match(root)
    if not files:
        tried.append(f"{root / pattern.text()}  [download-{source}: no match after download]")
        raise ModelNotFoundError(what, tried, _hint(model_id, pattern, ""))
    return ResolvedModel(
        files=tuple(files),
        root=root,
        is_folder=pattern.folder is not None,
        origin=f"download-{source}",
        revision=config.revision,
        subfolder=pattern.folder or "",
    )
