"""Tutorial 003's LeNet-like models A-D (twin of `tf_ref/models/lenet.py`).

`forward` returns probabilities, as the tutorial's `Dense(10, activation="softmax")` does; `logits` returns
what comes before the softmax, and the training loss is computed from it (log-softmax + NLL), which is what
Keras does internally for a softmax output, for numerical stability.
"""

from __future__ import annotations

import torch
from torch import nn

from torch_impl.init import keras_init_
from torch_impl.layers import Conv2d, Dropout, Linear, LocalResponseNorm

LRN_PARAMS = dict(depth_radius=2, bias=1.0, alpha=0.00002, beta=0.75)


class SoftmaxClassifier(nn.Module):
    """Base for models whose tutorial output is a softmax: subclasses implement `logits`."""

    output = "softmax"

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(x), dim=-1)


class LeNet(SoftmaxClassifier):
    """`variant`: "a" plain, "b" + dropout .45, "c" + local response normalization after each pool."""

    def __init__(self, variant: str = "a", num_classes: int = 10):
        super().__init__()
        if variant not in ("a", "b", "c"):
            raise ValueError(f"unknown LeNet variant {variant!r}; choose one of: a, b, c (d is LeNetD)")
        self.variant = variant
        self.conv1 = Conv2d(1, 8, 5, stride=2, padding="same")  # 28 -> 14, TF pads 1 top/left and 2 bottom/right
        self.pool1 = nn.AvgPool2d(2, 2)  # 'valid'
        self.lrn1 = LocalResponseNorm(**LRN_PARAMS) if variant == "c" else None
        self.conv2 = Conv2d(8, 16, 3, padding="same")
        self.pool2 = nn.AvgPool2d(3, 2)  # 'valid': 7 -> 3
        self.lrn2 = LocalResponseNorm(**LRN_PARAMS) if variant == "c" else None
        self.conv3 = Conv2d(16, 64, 2, padding="same")  # even kernel: TF pads only bottom/right
        self.conv4 = nn.Conv2d(64, 128, 3)  # 'valid': 3 -> 1
        self.drop1 = Dropout(0.45) if variant == "b" else None
        self.conv5 = nn.Conv2d(128, 32, 1)
        self.drop2 = Dropout(0.45) if variant == "b" else None
        self.flatten = nn.Flatten()
        self.dense = Linear(32, num_classes)
        keras_init_(self)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(torch.relu(self.conv1(x)))  # (B, 8, 7, 7)
        if self.lrn1 is not None:
            x = self.lrn1(x)
        x = self.pool2(torch.relu(self.conv2(x)))  # (B, 16, 3, 3)
        if self.lrn2 is not None:
            x = self.lrn2(x)
        x = torch.relu(self.conv3(x))  # (B, 64, 3, 3)
        x = torch.relu(self.conv4(x))  # (B, 128, 1, 1)
        if self.drop1 is not None:
            x = self.drop1(x)
        x = torch.relu(self.conv5(x))  # (B, 32, 1, 1)
        if self.drop2 is not None:
            x = self.drop2(x)
        return self.dense(self.flatten(x))


class LeNetD(SoftmaxClassifier):
    """Model D: deeper, with local response normalization."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = Conv2d(1, 8, 5, stride=2, padding="same")
        self.conv2 = Conv2d(8, 16, 5, padding="same")
        self.pool1 = nn.AvgPool2d(2, 2)
        self.lrn1 = LocalResponseNorm(**LRN_PARAMS)
        self.conv3 = Conv2d(16, 32, 3, padding="same")
        self.conv4 = Conv2d(32, 32, 3, padding="same")
        self.pool2 = nn.AvgPool2d(3, 2)
        self.lrn2 = LocalResponseNorm(**LRN_PARAMS)
        self.conv5 = Conv2d(32, 64, 2, padding="same")
        self.conv6 = Conv2d(64, 64, 2, padding="same")
        self.conv7 = nn.Conv2d(64, 128, 3)
        self.conv8 = nn.Conv2d(128, 32, 1)
        self.flatten = nn.Flatten()
        self.dense = Linear(32, num_classes)
        keras_init_(self)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))  # (B, 16, 14, 14)
        x = self.lrn1(self.pool1(x))  # (B, 16, 7, 7)
        x = torch.relu(self.conv4(torch.relu(self.conv3(x))))  # (B, 32, 7, 7)
        x = self.lrn2(self.pool2(x))  # (B, 32, 3, 3)
        x = torch.relu(self.conv6(torch.relu(self.conv5(x))))  # (B, 64, 3, 3)
        x = torch.relu(self.conv8(torch.relu(self.conv7(x))))  # (B, 32, 1, 1)
        return self.dense(self.flatten(x))
