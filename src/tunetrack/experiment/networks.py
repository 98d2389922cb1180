"""The networks: plain torch modules that map a batch of images to class scores (logits).

Each is built as ``Net(input_shape, num_classes, **hyperparameters)``: build() passes it the
settings its constructor names (hidden_dim, say), and a study searches the ranges in its
``search_space`` beside the training's own (search.py): a hyperparameter of one network is
searched in its studies only. Yours: write the class (a setting it takes that does not exist
yet needs a field in settings.py), and add one line to NETWORKS (or, from a file of your own,
``NETWORKS["name"] = Net``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from optuna.distributions import BaseDistribution, FloatDistribution, IntDistribution
from torch import Tensor, nn


class MLP(nn.Sequential):
    """The original pipeline's network: Flatten -> Linear(pixels, hidden_dim) -> ReLU ->
    Linear(hidden_dim, classes)."""

    search_space: dict[str, BaseDistribution] = {"hidden_dim": IntDistribution(32, 512)}

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, hidden_dim: int):
        super().__init__(
            nn.Flatten(),
            nn.Linear(math.prod(input_shape), hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, num_classes),
        )


class CNN(nn.Sequential):
    """LeNet-5's shape: two 5x5 convolutions (6 and 16 channels), each followed by ReLU and 2x2
    max pooling, then a fully connected layer of hidden_dim units and the classifier. Its
    learning rate stops at 1e-2: from 2e-2 up, it stays at chance (docs/search.md)."""

    search_space: dict[str, BaseDistribution] = {
        "hidden_dim": IntDistribution(32, 512),
        "lr": FloatDistribution(1e-4, 1e-2, log=True),
    }

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, hidden_dim: int):
        channels, height, width = input_shape
        super().__init__(
            nn.Conv2d(channels, 6, kernel_size=5, padding=2),  # 28x28 stays 28x28
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, kernel_size=5),  # 14x14 -> 10x10
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(16 * ((height // 2 - 4) // 2) * ((width // 2 - 4) // 2), hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, num_classes),
        )


NETWORKS: dict[str, type[nn.Module]] = {"mlp": MLP, "cnn": CNN}


class Standardize(nn.Module):
    """(x - mean) / std, per channel: put in front of a network, it takes pixels in [0, 1] as
    they are, and so does the model that MLflow logs: a user's picture needs no other
    preprocessing. The statistics come with the data (they are not weights to learn or save)."""

    def __init__(self, mean: float | Sequence[float], std: float | Sequence[float]):
        super().__init__()
        shape = (1, -1, 1, 1)  # one value per channel of an (N, C, H, W) batch
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(shape), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).reshape(shape), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std
