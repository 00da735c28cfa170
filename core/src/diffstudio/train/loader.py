"""Image loading in worker processes (``--dataset_num_workers``), keeping the trainer's batch order.

The trainer decides which samples each micro-step of each process sees (see :mod:`diffstudio.train.loop`);
workers only do the slow, pure part, reading and resizing the images of those samples, ahead of time. A
``torch.utils.data.DataLoader`` over this process's micro-batches, in their order, with ``batch_size=None``
returns exactly what loading in the main process would, in the same order, so numbers do not depend on the
worker count. Pipeline units (text and VAE encoding) still run in the main process, on its device.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from torch.utils.data import DataLoader, Dataset

from diffstudio.train.data import TrainingDataset


class MicroBatchSamples(Dataset[list[dict[str, Any]]]):
    """Item ``i``: the loaded samples (prompt, images, extra inputs) of micro-batch ``i``."""

    def __init__(self, dataset: TrainingDataset, batches: Sequence[Sequence[int]], with_files: bool) -> None:
        self.dataset = dataset
        self.batches = [list(b) for b in batches]
        self.with_files = with_files

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> list[dict[str, Any]]:
        return [self.dataset.load(p, with_files=self.with_files) for p in self.batches[index]]


def _unchanged(item: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return item


def loaded_batches(
    dataset: TrainingDataset, batches: Sequence[Sequence[int]], *, workers: int, with_files: bool = True
) -> Iterator[list[dict[str, Any]]]:
    """The loaded samples of each of ``batches`` in order, read by ``workers`` processes (0: here)."""
    if workers <= 0:
        for batch in batches:
            yield [dataset.load(p, with_files=with_files) for p in batch]
        return
    if not batches:
        return
    loader = DataLoader(
        MicroBatchSamples(dataset, batches, with_files),
        batch_size=None,
        shuffle=False,
        num_workers=min(workers, len(batches)),
        collate_fn=_unchanged,
    )
    yield from loader
