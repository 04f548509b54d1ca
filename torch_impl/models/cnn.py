"""Tutorial 001's CNN as a plain `nn.Module` (twin of `tf_ref/models/cnn.py`).

[Conv3x3 'same' relu, MaxPool2 'same'] x (32, 64, 128) -> Flatten -> Dense 256 relu -> Dropout 0.4 -> Dense 10.
Returns logits. One class serves all three Keras styles: in PyTorch there is only one way to write it.

The ReLU runs after the max pooling, on a quarter of the elements: `relu(maxpool(x))` equals `maxpool(relu(x))`
value for value and gradient for gradient (the max commutes with a monotone function and is taken at the same
position), and eager PyTorch, unlike TF's graph, cannot fuse the ReLU into the convolution (BENCHMARKS.md).
"""

from __future__ import annotations

import torch
from torch import nn

from torch_impl.init import keras_init_
from torch_impl.layers import Dropout, Linear, MaxPool2d


class CNN(nn.Module):
    def __init__(self, num_classes: int = 10, dropout: float = 0.4):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)  # 3x3 'same' at stride 1 is symmetric: plain padding=1
        self.pool1 = MaxPool2d(2, padding="same")
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.pool2 = MaxPool2d(2, padding="same")
        self.conv3 = nn.Conv2d(64, 128, 3, padding=1)
        self.pool3 = MaxPool2d(2, padding="same")  # 7 -> 4: TF pads the extra row/column at the bottom/right
        self.pool3_flat = nn.Flatten()  # NCHW order; weight transfer permutes dense4 (see parity.interchange)
        self.dense4 = Linear(4 * 4 * 128, 256)
        self.drop4 = Dropout(dropout)
        self.dense5 = Linear(256, num_classes)
        keras_init_(self)  # Keras defaults: glorot_uniform kernels, zero biases

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, 28, 28) -> (B, 10) logits
        # Keras: pool(relu(conv(x))); the same values and gradients, the ReLU on 4x fewer elements
        x = torch.relu(self.pool1(self.conv1(x)))  # (B, 32, 14, 14)
        x = torch.relu(self.pool2(self.conv2(x)))  # (B, 64, 7, 7)
        x = torch.relu(self.pool3(self.conv3(x)))  # (B, 128, 4, 4)
        x = self.pool3_flat(x)  # (B, 2048)
        x = self.drop4(torch.relu(self.dense4(x)))
        return self.dense5(x)
