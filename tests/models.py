"""Small real models, their data, and the training loop of the end-to-end tests."""
from __future__ import annotations

import torch
from torch import nn


class ConvNet(nn.Module):
    """Conv (no bias: a BatchNorm follows, see docs/optimizers.md on comparing), BatchNorm, two linear
    layers with biases."""

    def __init__(self, classes: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.fc1 = nn.Linear(6 * 6 * 6, 24)
        self.fc2 = nn.Linear(24, classes)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def make_model(seed: int = 0) -> ConvNet:
    torch.manual_seed(seed)
    return ConvNet()


def make_data(seed: int = 1, n: int = 32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


def param_groups(model: nn.Module, weight_decay: float, named: bool = False):
    """Two groups: weights with decay, biases and BatchNorm without."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim > 1 else no_decay).append((name, p) if named else p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def train(model: nn.Module, opt, steps: int, batches=None, scheduler=None) -> None:
    """`steps` steps of cross-entropy loss; step i trains on `batches(i)` (default: the
    same make_data() batch every step), then steps `scheduler` if there is one."""
    for i in range(steps):
        x, y = batches(i) if batches else make_data()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
