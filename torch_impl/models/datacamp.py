"""Tutorial 004's CNN (twin of `tf_ref/models/datacamp.py`, which is written with raw `tf.Variable`s).

The idiomatic port uses layers; what it keeps from the tutorial is the init: TF1's `xavier_initializer()` on
weights AND biases. `dropout=True` gives `datacamp_dropout` (0.25, 0.25, 0.4 after the pools, 0.3 after fc1: the rates of
the DataCamp Keras tutorial that tutorial 004 points to for this exercise). The ReLUs of the convolutions run after
the max pooling, as in `torch_impl.models.cnn` (same values and gradients, a quarter of the work).
"""

from __future__ import annotations

import torch
from torch import nn

from torch_impl.init import glorot_uniform_, tf1_xavier_uniform_
from torch_impl.layers import Dropout, Linear, MaxPool2d


class DataCampCNN(nn.Module):
    def __init__(self, dropout: bool = False, num_classes: int = 10):
        super().__init__()
        self.dropout = dropout
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.pool1 = MaxPool2d(2, padding="same")
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.pool2 = MaxPool2d(2, padding="same")
        self.conv3 = nn.Conv2d(64, 128, 3, padding=1)
        self.pool3 = MaxPool2d(2, padding="same")  # 7 -> 4
        self.flatten = nn.Flatten()
        self.fc1 = Linear(4 * 4 * 128, 128)
        self.out = Linear(128, num_classes)
        if dropout:
            self.drop1, self.drop2, self.drop3 = Dropout(0.25), Dropout(0.25), Dropout(0.4)
            self.drop4 = Dropout(0.3)
        for layer in (self.conv1, self.conv2, self.conv3, self.fc1, self.out):
            glorot_uniform_(layer.weight)  # xavier_initializer() = glorot uniform for a kernel
            tf1_xavier_uniform_(layer.bias)  # ... and the tutorial applies it to the biases too

    def _drop(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, name)(x) if self.dropout else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._drop("drop1", torch.relu(self.pool1(self.conv1(x))))  # (B, 32, 14, 14)
        x = self._drop("drop2", torch.relu(self.pool2(self.conv2(x))))  # (B, 64, 7, 7)
        x = self._drop("drop3", torch.relu(self.pool3(self.conv3(x))))  # (B, 128, 4, 4)
        x = self._drop("drop4", torch.relu(self.fc1(self.flatten(x))))
        return self.out(x)
