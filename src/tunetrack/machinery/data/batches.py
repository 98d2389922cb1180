"""Batches for a data set that fits in memory: one indexing operation each, on the device the
tensors are on, instead of a DataLoader's per-sample work."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor


class InMemoryBatches:
    """Batches sliced out of tensors that hold a whole split: reshuffled at the start of every
    pass (every epoch) with a generator, served in order without one. Images kept as bytes
    (uint8, a quarter of float32's memory) are served as pixels in [0, 1], a batch at a time."""

    def __init__(self, images: Tensor, labels: Tensor, batch_size: int, generator: torch.Generator | None = None):
        self.images, self.labels, self.batch_size, self.generator = images, labels, batch_size, generator

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)

    @property
    def examples(self) -> int:
        return len(self.labels)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        n, size = len(self.labels), self.batch_size
        if self.generator is None:
            for start in range(0, n, size):
                yield pixels(self.images[start : start + size]), self.labels[start : start + size]
            return
        order = torch.randperm(n, generator=self.generator, device=self.generator.device)
        for start in range(0, n, size):
            yield pixels(self.images[order[start : start + size]]), self.labels[order[start : start + size]]


def pixels(images: Tensor) -> Tensor:
    """Images as float32 pixels in [0, 1]: bytes divided by 255, floats as they are."""
    return images.float().div_(255) if images.dtype == torch.uint8 else images


def examples(loader) -> int:
    """How many examples a pass of ``loader`` serves: an InMemoryBatches' or a DataLoader's
    data set's length where they say it, else counted."""
    if hasattr(loader, "examples"):
        return loader.examples
    try:
        return len(loader.dataset)
    except (AttributeError, TypeError):
        return sum(len(targets) for _, targets in loader)
