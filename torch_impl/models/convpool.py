"""Tutorial 002's ConvConvPool network (twin of `tf_ref/models/convpool.py`). Returns logits."""

from __future__ import annotations

import torch
from torch import nn

from torch_impl.init import keras_init_
from torch_impl.layers import Dropout, Linear


class ConvPool(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 64, 3, padding=1)
        self.conv2 = nn.Conv2d(64, 64, 3, padding=1)
        self.pool1 = nn.AvgPool2d(2, 2)  # 'valid' 2x2/2 on an even size: PyTorch's default is TF's
        self.drop1 = Dropout(0.25)
        self.conv3 = nn.Conv2d(64, 32, 3, padding=1)
        self.conv4 = nn.Conv2d(32, 32, 3, padding=1)
        self.pool2 = nn.AvgPool2d(2, 2)
        self.drop2 = Dropout(0.25)
        self.flatten = nn.Flatten()
        self.dense1 = Linear(7 * 7 * 32, 256)
        self.drop3 = Dropout(0.5)
        self.logits = Linear(256, num_classes)
        keras_init_(self)  # tf.layers defaults are Keras's: glorot_uniform kernels, zero biases

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))  # (B, 64, 28, 28)
        x = self.drop1(self.pool1(x))  # (B, 64, 14, 14)
        x = torch.relu(self.conv4(torch.relu(self.conv3(x))))  # (B, 32, 14, 14)
        x = self.drop2(self.pool2(x))  # (B, 32, 7, 7)
        x = self.drop3(torch.relu(self.dense1(self.flatten(x))))
        return self.logits(x)
