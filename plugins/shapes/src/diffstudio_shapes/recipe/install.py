"""Stage ``install``: copy the recipe's outputs into the package's ``weights/`` folder (atomically per file)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from diffstudio_shapes import model


def _copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.copyfile(source, temporary)
    os.replace(temporary, target)


def last_trained(root: Path) -> Path:
    """The newest ``epoch-*.safetensors`` / ``step-*.safetensors`` under ``root/train``."""
    files = sorted((root / "train").glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"no trained DiT under {root / 'train'}; run the training stage first")
    return files[-1]


def install(root: Path, dit: str | None = None, target: str | None = None) -> dict[str, str]:
    """Copy DiT, VAE, text encoder and tokenizer from ``root`` into ``target`` (default: the package)."""
    destination = Path(target) if target else model.WEIGHTS
    trained = Path(dit) if dit else last_trained(root)
    _copy(trained, destination / model.DIT_FILE)
    _copy(root / model.VAE_FILE, destination / model.VAE_FILE)
    for folder in ("text_encoder", "tokenizer"):
        for item in sorted((root / folder).iterdir()):
            if item.is_file():
                _copy(item, destination / folder / item.name)
    return {"dit": str(trained), "target": str(destination)}
