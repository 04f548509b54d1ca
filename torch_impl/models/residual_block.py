"""Tutorial 001's residual block (twin of `tf_ref/models/residual_block.py`)."""

from __future__ import annotations

import torch
from torch import nn

from torch_impl.init import keras_init_


class Add(nn.Module):
    """`keras.layers.add` as a module, so the sum has a name (and a hook point) like the Keras layer."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


class ResidualBlock(nn.Module):
    def __init__(self, channels: int = 256, bottleneck: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, bottleneck, 1)
        self.conv2 = nn.Conv2d(bottleneck, bottleneck, 3, padding=1)
        self.conv3 = nn.Conv2d(bottleneck, channels, 1)
        self.add3 = Add()
        self.relu3 = nn.ReLU()
        keras_init_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 256, 28, 28) -> same
        net = torch.relu(self.conv1(x))
        net = torch.relu(self.conv2(net))
        return self.relu3(self.add3(self.conv3(net), x))  # skip connection
