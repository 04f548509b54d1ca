"""Tutorial 003's model E, reconstructed (twin of `tf_ref/models/inception.py`; see its docstring)."""

from __future__ import annotations

import torch
from torch import nn

from torch_impl.init import keras_init_
from torch_impl.layers import Conv2d, Linear, LocalResponseNorm, MaxPool2d
from torch_impl.models.lenet import LRN_PARAMS, SoftmaxClassifier

FILTERS = (8, 16, 4, 4, 12, 2)


class InceptionBlock(nn.Module):
    """filters = [1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool proj]; branches concatenated on channels."""

    def __init__(self, in_channels: int, filters=FILTERS):
        super().__init__()
        if len(filters) != 6:
            raise ValueError(f"InceptionBlock needs 6 filter counts, got {len(filters)}: {filters}")
        f1, f3r, f3, f5r, f5, fp = filters
        self.b1_1x1 = nn.Conv2d(in_channels, f1, 1)
        self.b2_reduce = nn.Conv2d(in_channels, f3r, 1)
        self.b2_3x3 = nn.Conv2d(f3r, f3, 3, padding=1)
        self.b3_reduce = nn.Conv2d(in_channels, f5r, 1)
        self.b3_5x5 = nn.Conv2d(f5r, f5, 5, padding=2)
        self.b4_pool = MaxPool2d(3, stride=1, padding="same")  # pads with -inf, never with zeros
        self.b4_proj = nn.Conv2d(in_channels, fp, 1)
        self.out_channels = f1 + f3 + f5 + fp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [
            torch.relu(self.b1_1x1(x)),
            torch.relu(self.b2_3x3(torch.relu(self.b2_reduce(x)))),
            torch.relu(self.b3_5x5(torch.relu(self.b3_reduce(x)))),
            torch.relu(self.b4_proj(self.b4_pool(x))),
        ]
        return torch.cat(branches, dim=1)  # channel order = TF's concat on the last axis


class InceptionE(SoftmaxClassifier):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = Conv2d(1, 8, 5, stride=2, padding="same")
        self.pool1 = nn.AvgPool2d(2, 2)
        self.lrn1 = LocalResponseNorm(**LRN_PARAMS)
        self.inception1 = InceptionBlock(8)
        self.pool2 = nn.AvgPool2d(3, 2)
        self.lrn2 = LocalResponseNorm(**LRN_PARAMS)
        self.inception2 = InceptionBlock(self.inception1.out_channels)
        self.conv4 = nn.Conv2d(self.inception2.out_channels, 128, 3)
        self.conv5 = nn.Conv2d(128, 32, 1)
        self.flatten = nn.Flatten()
        self.dense = Linear(32, num_classes)
        keras_init_(self)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = self.lrn1(self.pool1(torch.relu(self.conv1(x))))  # (B, 8, 7, 7)
        x = self.lrn2(self.pool2(self.inception1(x)))  # (B, 26, 3, 3)
        x = self.inception2(x)  # (B, 26, 3, 3)
        x = torch.relu(self.conv5(torch.relu(self.conv4(x))))  # (B, 32, 1, 1)
        return self.dense(self.flatten(x))
