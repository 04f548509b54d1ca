"""Tutorial 001's "best" member with BatchNorm blocks (twin of `tf_ref/models/bn_cnn.py`)."""

from __future__ import annotations

import torch
from torch import nn

from torch_impl.init import glorot_normal_
from torch_impl.layers import BatchNorm1d, BatchNorm2d, Dropout, Linear, MaxPool2d


class ConvBNRelu(nn.Module):
    """Conv (no activation) -> BatchNorm with Keras's momentum 0.99 / epsilon 1e-3 -> ReLU.

    `relu=False` leaves the ReLU to the caller: `BNCNN` applies it after the max pooling that follows the block.
    """

    def __init__(self, in_channels: int, filters: int, kernel_size: int = 3, relu: bool = True):
        super().__init__()
        self.relu = relu
        self.conv = nn.Conv2d(in_channels, filters, kernel_size, padding=kernel_size // 2)
        self.bn = BatchNorm2d(filters)
        glorot_normal_(self.conv.weight)  # kernel_initializer='glorot_normal'
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return torch.relu(x) if self.relu else x


class DenseBNRelu(nn.Module):
    def __init__(self, in_features: int, units: int):
        super().__init__()
        self.dense = Linear(in_features, units)
        self.bn = BatchNorm1d(units)
        glorot_normal_(self.dense.weight)
        nn.init.zeros_(self.dense.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.dense(x)))


class BNCNN(nn.Module):
    def __init__(self, num_classes: int = 10, dropout: float = 0.4):
        super().__init__()
        # the blocks' ReLUs run after the max pooling (see forward)
        self.conv1 = ConvBNRelu(1, 32, relu=False)
        self.pool1 = MaxPool2d(2, padding="same")
        self.conv2 = ConvBNRelu(32, 64, relu=False)
        self.pool2 = MaxPool2d(2, padding="same")
        self.conv3 = ConvBNRelu(64, 128, relu=False)
        self.pool3 = MaxPool2d(2, padding="same")
        self.pool3_flat = nn.Flatten()
        self.dense4 = DenseBNRelu(4 * 4 * 128, 256)
        self.drop4 = Dropout(dropout)
        self.dense5 = Linear(256, num_classes)
        glorot_normal_(self.dense5.weight)
        nn.init.zeros_(self.dense5.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Keras: pool(relu(bn(conv(x)))); relu(pool(.)) has the same values and gradients (the max commutes with the
        # monotone ReLU and is taken at the same position) and runs the ReLU on 4x fewer elements
        x = torch.relu(self.pool1(self.conv1(x)))  # (B, 32, 14, 14)
        x = torch.relu(self.pool2(self.conv2(x)))  # (B, 64, 7, 7)
        x = torch.relu(self.pool3(self.conv3(x)))  # (B, 128, 4, 4)
        x = self.pool3_flat(x)
        x = self.drop4(self.dense4(x))
        return self.dense5(x)
