"""``diffstudio nexus-gen-convert``: split a decoder file into safetensors that ``from_pretrained`` loads.

``diffstudio nexus-gen-convert edit_decoder.bin out/ --allow-pickle`` writes ``out/edit_decoder-dit.safetensors`` (the
FLUX.1 DiT in BFL names, claimed by the FLUX.1 family like any BFL DiT) and ``out/edit_decoder-merger.safetensors``
(``embedding_merger.*``; ``-adapter`` and ``adapter.*`` for the generation decoder), each written to a temporary
name and renamed. A ``.bin`` is read only with ``--allow-pickle`` (core's pickle policy:
``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import argparse
import os
import secrets
from pathlib import Path
from typing import Any

HELP = (
    "split a Nexus-Gen decoder (.bin or .safetensors) into a BFL FLUX.1 DiT and its head, as safetensors; or load it "
    "directly with diffstudio_nexus_gen.load_decoder(pipe, file, allow_pickle=True)"
)
"""One line for ``diffstudio --help``; core's refusal of a pickle given to ``from_pretrained`` quotes it too."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``SOURCE OUTPUT_FOLDER [--allow-pickle]``."""
    parser.add_argument("source", help="generation_decoder.bin or edit_decoder.bin (or a safetensors copy)")
    parser.add_argument("output", help="folder for <stem>-dit.safetensors and <stem>-adapter|merger.safetensors")
    parser.add_argument(
        "--allow-pickle", action="store_true",
        help="unpickle a .bin with torch.load(weights_only=True) (pickles can run code: only files you trust)",
    )  # fmt: skip


def _save(tensors: dict[str, Any], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    temp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(temp), metadata=metadata)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def convert_decoder_file(
    source: str | os.PathLike[str], output: str | os.PathLike[str], *, allow_pickle: bool = False
) -> tuple[Path, Path]:
    """Split one decoder file into ``(<stem>-dit.safetensors, <stem>-adapter|merger.safetensors)`` in ``output``.

    Raises:
        PickleRefusedError: A ``.bin`` without ``allow_pickle=True``.
        NexusGenCheckpointError: Not a Nexus-Gen decoder.
    """
    from diffstudio_nexus_gen.convert import head_kind
    from diffstudio_nexus_gen.loaders import read_decoder

    dit, head, checkpoint = read_decoder(source, allow_pickle=allow_pickle)
    with checkpoint:
        folder = Path(output)
        folder.mkdir(parents=True, exist_ok=True)
        stem = Path(source).stem
        kind = head_kind(set(head))
        dit_path = folder / f"{stem}-dit.safetensors"
        head_path = folder / f"{stem}-{'adapter' if kind == 'generation' else 'merger'}.safetensors"
        origin = {"diffstudio.converted_from": Path(source).name}
        _save(dit, dit_path, {**origin, "format": "pt"})
        _save(head, head_path, {**origin, "format": "pt"})
    return dit_path, head_path


def run(args: argparse.Namespace, runtime: Any) -> int:
    """Convert and print the two paths."""
    dit_path, head_path = convert_decoder_file(args.source, args.output, allow_pickle=bool(args.allow_pickle))
    print(dit_path)
    print(head_path)
    return 0
