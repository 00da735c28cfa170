"""A tiny FLUX.2-klein-architecture model and a 16-image shapes data set, written once per session.

The model uses the embedded shapes model's recipe code (tokenizer, frozen Qwen3 text encoder, VAE and DiT
architectures) with random weights and a much smaller DiT, saved in the official layouts: BFL single files for
the DiT and the VAE, transformers folders for the text encoder and the tokenizer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class TinyModel:
    root: Path
    data: Path

    @property
    def dit(self) -> Path:
        return self.root / "dit.safetensors"

    def model_paths_list(self) -> list[str]:
        files = [self.dit, self.root / "ae.safetensors", self.root / "text_encoder" / "model.safetensors"]
        return [str(f) for f in files]

    def model_paths(self) -> str:
        return json.dumps(self.model_paths_list())

    def options(self, output: Path, **overrides: object) -> dict[str, object]:
        """Keyword options of ``diffstudio.train.train`` for a small full fine-tune of the DiT."""
        options: dict[str, object] = {
            "dataset_base_path": str(self.data),
            "dataset_metadata_path": str(self.data / "metadata.csv"),
            "model_paths": json.loads(self.model_paths()),
            "tokenizer_path": str(self.root / "tokenizer"),
            "height": 64,
            "width": 64,
            "trainable_models": ["dit"],
            "learning_rate": 1e-3,
            "num_epochs": 2,
            "batch_size": 2,
            "output_path": str(output),
            "pipeline_args": {"max_sequence_length": 32},
        }
        options.update(overrides)
        return options

    def argv(self, output: Path, *extra: str) -> list[str]:
        """Command-line arguments of ``diffstudio train`` equal to :meth:`options`."""
        return [
            "--dataset_base_path", str(self.data), "--dataset_metadata_path", str(self.data / "metadata.csv"),
            "--model_paths", self.model_paths(), "--tokenizer_path", str(self.root / "tokenizer"),
            "--height", "64", "--width", "64", "--trainable_models", "dit", "--learning_rate", "1e-3",
            "--num_epochs", "2", "--batch_size", "2", "--output_path", str(output),
            "--pipeline_args", '{"max_sequence_length": 32}', *extra,
        ]  # fmt: skip


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    import torch
    from diffstudio_flux2 import Flux2AutoEncoder
    from diffstudio_shapes.data import write_dataset
    from diffstudio_shapes.recipe.dit import write_random_dit
    from diffstudio_shapes.recipe.sizes import DitSizes, VaeSizes
    from diffstudio_shapes.recipe.text import build_text
    from diffstudio_shapes.recipe.vae import VaeTraining, save_vae, vae_params

    root = tmp_path_factory.mktemp("tiny-flux2")
    build_text(root)
    torch.manual_seed(0)
    # 16 pixels per latent token (three downsamplings): the seed script's 1024 x 1024 run stays at 4096 tokens
    save_vae(Flux2AutoEncoder(vae_params(VaeSizes(ch_mult=(1, 1, 2, 2)))), root, {}, VaeTraining())
    sizes = DitSizes(hidden_size=32, num_heads=2, depth=1, depth_single_blocks=1)
    write_random_dit(root / "dit.safetensors", sizes=sizes)
    write_dataset(root / "data", 8, 0, 64)
    return TinyModel(root, root / "data")
