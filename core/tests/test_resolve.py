"""Offline resolution of ModelConfig files from paths, local folders, embedded models and hub caches."""

from __future__ import annotations

import hashlib
import os
import socket
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from diffstudio.config import ModelConfig
from diffstudio.errors import ModelNotFoundError
from diffstudio.resolve import ResolvedModel, hf_hub_cache, modelscope_cache, resolve_files

MODEL_ID = "org/Name.2-x"
MASKED = "Name___2-x"
SHARDS = (
    "transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
    "transformer/diffusion_pytorch_model-00002-of-00002.safetensors",
)
FILES: dict[str, bytes] = {
    SHARDS[0]: b"shard one",
    SHARDS[1]: b"shard two",
    "transformer/config.json": b"{}",
    "transformer/diffusion_pytorch_model.safetensors.index.json": b"{}",
    "tokenizer/tokenizer.json": b'{"version": "1.0"}',
    "tokenizer/tokenizer_config.json": b"{}",
    "model_index.json": b"{}",
}
COMMIT_A = "a" * 40
COMMIT_B = "b1" * 20


@pytest.fixture
def net(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[list[Any]]:
    """Isolate every location resolve_files reads, force offline mode, and forbid any network use."""
    attempts: list[Any] = []

    def refuse(*args: Any, **kwargs: Any) -> Any:
        attempts.append(args)
        raise OSError("network access is disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    home = tmp_path / "home"
    work = tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    for name in (
        "HF_HUB_CACHE",
        "HUGGINGFACE_HUB_CACHE",
        "HF_HOME",
        "XDG_CACHE_HOME",
        "MODELSCOPE_CACHE",
        "DIFFSTUDIO_MODEL_BASE_PATH",
        "DIFFSTUDIO_OFFLINE",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield attempts
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        assert attempts == [], "offline resolution touched the network"


def write_tree(root: Path, files: Mapping[str, bytes]) -> Path:
    for rel, data in files.items():
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return root


def make_hf_repo(
    hub: Path,
    model_id: str,
    files: Mapping[str, bytes],
    commit: str = COMMIT_A,
    refs: tuple[str, ...] = ("main",),
) -> Path:
    """Build a hub-cache repository as huggingface_hub writes it: blobs, snapshot symlinks, refs."""
    repo = hub / f"models--{model_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for rel, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


def check_transformer(resolved: ResolvedModel, root: Path, origin: str) -> None:
    assert resolved.origin == origin
    assert resolved.root == root
    assert resolved.is_folder is False
    assert resolved.files == tuple(root / s for s in SHARDS)
    assert [f.read_bytes() for f in resolved.files] == [FILES[s] for s in SHARDS]


def check_tokenizer(resolved: ResolvedModel, root: Path) -> None:
    assert resolved.is_folder is True
    assert resolved.folder == root / "tokenizer"
    assert [f.name for f in resolved.files] == ["tokenizer.json", "tokenizer_config.json"]


TRANSFORMER = ModelConfig(model_id=MODEL_ID, origin_file_pattern="transformer/*.safetensors")
TOKENIZER = ModelConfig(model_id=MODEL_ID, origin_file_pattern="tokenizer/")


# ---------------------------------------------------------------------------------------------------------
# Hugging Face cache
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["HF_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME", "default"])
def test_hf_cache_locations(
    net: list[Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, where: str
) -> None:
    if where == "HF_HUB_CACHE":
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hubcache"))
        hub = tmp_path / "hubcache"
    elif where == "HF_HOME":
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hfhome"))
        hub = tmp_path / "hfhome" / "hub"
    elif where == "XDG_CACHE_HOME":
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        hub = tmp_path / "xdg" / "huggingface" / "hub"
    else:
        hub = tmp_path / "home" / ".cache" / "huggingface" / "hub"
    assert hf_hub_cache() == hub
    snapshot = make_hf_repo(hub, MODEL_ID, FILES)
    resolved = resolve_files(TRANSFORMER)
    check_transformer(resolved, snapshot, "hf-cache")
    assert resolved.revision == COMMIT_A
    assert all(f.is_symlink() for f in resolved.files)
    check_tokenizer(resolve_files(TOKENIZER), snapshot)


def test_hf_hub_cache_beats_hf_home(net: list[Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "b"))
    make_hf_repo(tmp_path / "b" / "hub", MODEL_ID, FILES)
    with pytest.raises(ModelNotFoundError):
        resolve_files(TRANSFORMER)
    snapshot = make_hf_repo(tmp_path / "a", MODEL_ID, FILES)
    assert resolve_files(TRANSFORMER).root == snapshot


def test_revision_pinned(net: list[Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    old = dict(FILES, **{SHARDS[0]: b"old one"})
    make_hf_repo(hub, MODEL_ID, old, commit=COMMIT_B, refs=("v1",))
    new = make_hf_repo(hub, MODEL_ID, FILES, commit=COMMIT_A, refs=("main",))
    assert resolve_files(TRANSFORMER).root == new
    by_tag = resolve_files(ModelConfig(model_id=MODEL_ID, origin_file_pattern=SHARDS[0], revision="v1"))
    assert by_tag.revision == COMMIT_B and by_tag.files[0].read_bytes() == b"old one"
    by_sha = resolve_files(ModelConfig(model_id=MODEL_ID, origin_file_pattern=SHARDS[0], revision=COMMIT_B))
    assert by_sha.root.name == COMMIT_B and by_sha.files[0].read_bytes() == b"old one"
    by_prefix = resolve_files(
        ModelConfig(model_id=MODEL_ID, origin_file_pattern=SHARDS[0], revision="b1b1b1b")
    )
    assert by_prefix.root.name == COMMIT_B
    with pytest.raises(ModelNotFoundError) as info:
        resolve_files(ModelConfig(model_id=MODEL_ID, origin_file_pattern=SHARDS[0], revision="c" * 40))
    assert str(hub / f"models--org--Name.2-x/snapshots/{'c' * 40}") in str(info.value)


def test_pinned_revision_skips_flat_modelscope_layouts(
    net: list[Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "ms"))
    write_tree(tmp_path / "ms" / "models" / "org" / MASKED, FILES)
    assert resolve_files(TRANSFORMER).origin == "modelscope-cache"
    with pytest.raises(ModelNotFoundError) as info:
        resolve_files(ModelConfig(model_id=MODEL_ID, origin_file_pattern="transformer/*", revision="v2"))
    assert "records no revision" in str(info.value)


def test_without_refs_main_the_newest_snapshot_is_used(
    net: list[Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    hub = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    older = make_hf_repo(hub, MODEL_ID, FILES, commit=COMMIT_B, refs=())
    newer = make_hf_repo(hub, MODEL_ID, FILES, commit=COMMIT_A, refs=())
    past = time.time() - 3600
    os.utime(older, (past, past))
    assert resolve_files(TRANSFORMER).root == newer


# ---------------------------------------------------------------------------------------------------------
# ModelScope cache
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layout",
    [
        f"models/org/{MASKED}",
        "models/org/Name.2-x",
        f"org/{MASKED}",
        "org/Name.2-x",
        "models/org--Name.2-x/snapshots/master",
        f"models/org--{MASKED}/snapshots/master",
    ],
)
@pytest.mark.parametrize("explicit", [True, False])
def test_modelscope_layouts(
    net: list[Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, layout: str, explicit: bool
) -> None:
    if explicit:
        cache = tmp_path / "mscache"
        monkeypatch.setenv("MODELSCOPE_CACHE", str(cache))
    else:
        cache = tmp_path / "home" / ".cache" / "modelscope" / "hub"
    assert modelscope_cache() == cache
    root = write_tree(cache / layout, FILES)
    write_tree(root, {".mdl": b"x", "._____temp/transformer/partial.safetensors": b"x"})
    check_transformer(resolve_files(TRANSFORMER), root, "modelscope-cache")
    check_tokenizer(resolve_files(TOKENIZER), root)
    whole = resolve_files(ModelConfig(model_id=MODEL_ID))
    assert whole.is_folder and whole.folder == root and len(whole.files) == len(FILES)


# ---------------------------------------------------------------------------------------------------------
# local folders, embedded models, order
# ---------------------------------------------------------------------------------------------------------


def test_local_model_path_with_and_without_model_id(net: list[Any], tmp_path: Path) -> None:
    nested = write_tree(tmp_path / "dl" / MODEL_ID, FILES)
    config = ModelConfig(
        model_id=MODEL_ID,
        origin_file_pattern="transformer/*.safetensors",
        local_model_path=str(tmp_path / "dl"),
    )
    check_transformer(resolve_files(config), nested, "local")
    flat = write_tree(tmp_path / "flat", FILES)
    config = ModelConfig(model_id=MODEL_ID, origin_file_pattern="tokenizer/", local_model_path=str(flat))
    check_tokenizer(resolve_files(config), flat)


def test_embedded_model(net: list[Any], tmp_path: Path) -> None:
    root = write_tree(tmp_path / "package_data" / "shapes", FILES)
    config = ModelConfig(model_id="diffstudio/shapes", origin_file_pattern="transformer/*.safetensors")
    check_transformer(resolve_files(config, embedded={"diffstudio/shapes": root}), root, "embedded")
    bad = ModelConfig(model_id="diffstudio/shapes", origin_file_pattern="vae/*.safetensors")
    with pytest.raises(ModelNotFoundError, match="embedded model and is never downloaded"):
        resolve_files(bad, embedded={"diffstudio/shapes": root})


def test_base_path_and_cwd_models(net: list[Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    in_cwd = write_tree(tmp_path / "work" / "models" / MODEL_ID, FILES)
    check_transformer(resolve_files(TRANSFORMER), in_cwd, "local-dir")
    base = write_tree(tmp_path / "base" / MODEL_ID, FILES)
    monkeypatch.setenv("DIFFSTUDIO_MODEL_BASE_PATH", str(tmp_path / "base"))
    check_transformer(resolve_files(TRANSFORMER), base, "base-path")


def test_probe_order(net: list[Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "ms"))
    write_tree(tmp_path / "work" / "models" / MODEL_ID, FILES)
    assert resolve_files(TRANSFORMER).origin == "local-dir"
    write_tree(tmp_path / "ms" / "models" / "org" / MASKED, FILES)
    assert resolve_files(TRANSFORMER).origin == "modelscope-cache"
    make_hf_repo(tmp_path / "hub", MODEL_ID, FILES)
    assert resolve_files(TRANSFORMER).origin == "hf-cache"
    embedded = {MODEL_ID: write_tree(tmp_path / "emb", FILES)}
    assert resolve_files(TRANSFORMER, embedded=embedded).origin == "embedded"
    local = ModelConfig(
        model_id=MODEL_ID,
        origin_file_pattern="transformer/*.safetensors",
        local_model_path=str(write_tree(tmp_path / "loc", FILES)),
    )
    assert resolve_files(local, embedded=embedded).origin == "local"


def test_a_root_counts_only_when_the_pattern_matches(
    net: list[Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    make_hf_repo(tmp_path / "hub", MODEL_ID, {"tokenizer/tokenizer.json": b"{}"})
    cwd_copy = write_tree(tmp_path / "work" / "models" / MODEL_ID, FILES)
    check_transformer(resolve_files(TRANSFORMER), cwd_copy, "local-dir")


def test_pattern_forms(net: list[Any], tmp_path: Path) -> None:
    root = write_tree(tmp_path / "work" / "models" / MODEL_ID, FILES)
    write_tree(root, {".cache/huggingface/download/x.safetensors": b"meta", ".gitattributes": b""})
    union = resolve_files(ModelConfig(model_id=MODEL_ID, origin_file_pattern=["tokenizer/*.json", "*.json"]))
    assert union.files == tuple(
        sorted(root / p for p in FILES if p.endswith(".json") and "transformer" not in p)
    )
    for whole in (None, "", "./"):
        resolved = resolve_files(ModelConfig(model_id=MODEL_ID, origin_file_pattern=whole))
        assert resolved.is_folder and resolved.folder == root
        assert resolved.files == tuple(sorted(root / p for p in FILES))
    nested = resolve_files(ModelConfig(model_id=MODEL_ID, origin_file_pattern="**/*.safetensors"))
    assert nested.files == tuple(root / s for s in SHARDS)
    mixed = resolve_files(
        ModelConfig(model_id=MODEL_ID, origin_file_pattern=["tokenizer/", "model_index.json"])
    )
    assert not mixed.is_folder
    assert mixed.files == (
        root / "model_index.json",
        *(root / p for p in FILES if p.startswith("tokenizer/")),
    )
    listed_whole = resolve_files(ModelConfig(model_id=MODEL_ID, origin_file_pattern=["./", "x"]))
    assert listed_whole.is_folder and len(listed_whole.files) == len(FILES)


# ---------------------------------------------------------------------------------------------------------
# explicit paths
# ---------------------------------------------------------------------------------------------------------


def test_explicit_paths(net: list[Any], tmp_path: Path) -> None:
    root = write_tree(tmp_path / "files", FILES)
    single = resolve_files(ModelConfig(path=root / SHARDS[0]))
    assert single.files == (root / SHARDS[0],) and single.origin == "path" and not single.is_folder
    listed = resolve_files(ModelConfig(path=[str(root / SHARDS[1]), root / SHARDS[0]]))
    assert listed.files == (root / SHARDS[1], root / SHARDS[0]) and listed.root == root / "transformer"
    globbed = resolve_files(ModelConfig(path=str(root / "transformer" / "*.safetensors")))
    assert globbed.files == tuple(root / s for s in SHARDS)
    folder = resolve_files(ModelConfig(path=root / "tokenizer"))
    assert folder.is_folder and folder.folder == root / "tokenizer" and len(folder.files) == 2
    inside = resolve_files(ModelConfig(path=root, origin_file_pattern="transformer/*.safetensors"))
    check_transformer(inside, root, "path")


def test_explicit_path_errors_name_the_path(net: list[Any], tmp_path: Path) -> None:
    root = write_tree(tmp_path / "files", FILES)
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(ModelNotFoundError) as info:
        resolve_files(ModelConfig(path=[root / SHARDS[0], missing]))
    assert str(missing) in str(info.value) and "does not exist" in str(info.value)
    with pytest.raises(ModelNotFoundError, match="glob"):
        resolve_files(ModelConfig(path=str(root / "*.gguf")))
    with pytest.raises(ModelNotFoundError):
        resolve_files(ModelConfig(path=root, origin_file_pattern="vae/*.safetensors"))


# ---------------------------------------------------------------------------------------------------------
# not found, offline, downloads
# ---------------------------------------------------------------------------------------------------------


def test_missing_model_lists_every_path_in_order(
    net: list[Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "ms"))
    monkeypatch.setenv("DIFFSTUDIO_MODEL_BASE_PATH", str(tmp_path / "base"))
    config = ModelConfig(
        model_id=MODEL_ID,
        origin_file_pattern="transformer/*.safetensors",
        local_model_path=str(tmp_path / "loc"),
    )
    with pytest.raises(ModelNotFoundError) as info:
        resolve_files(config, embedded={MODEL_ID: tmp_path / "emb"})
    expected = [
        tmp_path / "loc" / MODEL_ID,
        tmp_path / "loc",
        tmp_path / "emb",
        tmp_path / "hub" / "models--org--Name.2-x",
        tmp_path / "ms" / "models" / "org" / MASKED,
        tmp_path / "ms" / "models" / "org" / "Name.2-x",
        tmp_path / "ms" / "org" / MASKED,
        tmp_path / "ms" / "org" / "Name.2-x",
        tmp_path / "ms" / "models" / f"org--{MASKED}" / "snapshots",
        tmp_path / "ms" / "models" / "org--Name.2-x" / "snapshots",
        tmp_path / "base" / MODEL_ID,
        tmp_path / "work" / "models" / MODEL_ID,
    ]
    tried = info.value.tried
    assert len(tried) == len(expected)
    for line, path in zip(tried, expected):
        assert line.startswith(str(path)), (line, path)
    with pytest.raises(ModelNotFoundError) as info:
        resolve_files(config)
    message = str(info.value)
    assert "ModelConfig(path=" in message and "hf download org/Name.2-x" in message
    assert "offline" in message


def test_embedded_id_is_never_downloaded(
    net: list[Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(ModelNotFoundError):
        resolve_files(TRANSFORMER, embedded={MODEL_ID: tmp_path / "empty"})
    assert net == []


@pytest.mark.parametrize("switch", ["HF_HUB_OFFLINE", "DIFFSTUDIO_OFFLINE", "skip_download"])
def test_no_download_when_offline_or_skipped(
    net: list[Any], monkeypatch: pytest.MonkeyPatch, switch: str
) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE")
    config = TRANSFORMER
    if switch == "skip_download":
        config = ModelConfig(model_id=MODEL_ID, origin_file_pattern="transformer/*", skip_download=True)
    else:
        monkeypatch.setenv(switch, "1")
    with pytest.raises(ModelNotFoundError) as info:
        resolve_files(config)
    assert "No download was attempted" in str(info.value)
    assert ("skip_download" if switch == "skip_download" else "offline") in str(info.value)
    assert net == []


def test_network_failure_becomes_model_not_found(net: list[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("huggingface_hub")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    # huggingface_hub reads HF_HUB_OFFLINE once at import; a CI shell may have set it before the import.
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(ModelNotFoundError) as info:
        resolve_files(TRANSFORMER)
    assert "Downloading from huggingface failed" in str(info.value)
    assert info.value.tried[-1].startswith("download from huggingface")
    assert net, "the download should have tried (and been refused) network access"


def test_download_arguments(net: list[Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The real client cannot reach the hub here; check what resolve_files asks it for and uses."""
    hub_module = pytest.importorskip("huggingface_hub")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    calls: list[dict[str, Any]] = []

    def snapshot_download(**kwargs: Any) -> str:
        calls.append(kwargs)
        return str(make_hf_repo(Path(kwargs["cache_dir"]), kwargs["repo_id"], FILES))

    monkeypatch.setattr(hub_module, "snapshot_download", snapshot_download)
    resolved = resolve_files(TOKENIZER)
    assert calls == [
        {
            "repo_id": MODEL_ID,
            "revision": None,
            "allow_patterns": ["tokenizer/*"],
            "local_files_only": False,
            "cache_dir": str(tmp_path / "hub"),
        }
    ]
    assert resolved.origin == "download-huggingface"
    check_tokenizer(resolved, tmp_path / "hub" / "models--org--Name.2-x" / "snapshots" / COMMIT_A)
    assert resolve_files(TOKENIZER).origin == "hf-cache"  # the next call finds the cache
    assert len(calls) == 1
