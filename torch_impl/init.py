"""Keras / TF1 weight initializers for PyTorch tensors (in place, optional ``torch.Generator``).

Fans are computed on PyTorch layouts so that they equal what Keras computes on the
transposed TF layouts: a conv weight OIHW has ``fan_in = I*kh*kw`` and ``fan_out = O*kh*kw``
(Keras: HWIO), a Linear weight ``(out, in)`` has ``fan_in = in`` (Keras: ``(in, out)``),
and a 1-D tensor ``(n,)`` has ``fan_in = fan_out = n``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# Standard deviation of a unit normal truncated to [-2, 2]; Keras divides by it in
# VarianceScaling(distribution="truncated_normal") so the truncated draw keeps the target std.
TRUNCATED_NORMAL_STD = 0.87962566103423978


def keras_fans(tensor: torch.Tensor) -> tuple[int, int]:
    """Return ``(fan_in, fan_out)`` as Keras' ``compute_fans`` would for the TF layout of ``tensor``."""
    shape = tensor.shape
    if tensor.dim() == 0:
        return 1, 1
    if tensor.dim() == 1:
        return shape[0], shape[0]
    # PyTorch puts (out, in) first and the receptive field last; Keras puts it (..., in, out).
    receptive_field = math.prod(shape[2:])
    return shape[1] * receptive_field, shape[0] * receptive_field


def _fan_avg_scale(tensor: torch.Tensor) -> float:
    fan_in, fan_out = keras_fans(tensor)
    # Keras VarianceScaling(mode="fan_avg") guards against empty fans with max(1, ...).
    return 1.0 / max(1.0, (fan_in + fan_out) / 2.0)


@torch.no_grad()
def glorot_uniform_(tensor: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Keras ``GlorotUniform`` (the Keras kernel default): U(-limit, limit), limit = sqrt(6 / (fan_in + fan_out)).

    Why not ``nn.init.xavier_uniform_``: it agrees on 2-D+ tensors but rejects 1-D ones,
    and lacks Keras' ``max(1, ...)`` guard; PyTorch layers themselves default to Kaiming-uniform.
    """
    limit = math.sqrt(3.0 * _fan_avg_scale(tensor))
    return tensor.uniform_(-limit, limit, generator=generator)


@torch.no_grad()
def glorot_normal_(tensor: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Keras ``GlorotNormal``: normal truncated at 2 std, std = sqrt(2 / (fan_in + fan_out)) / 0.8796...

    Why not ``nn.init.xavier_normal_``: Keras truncates at two standard deviations and
    inflates the std so the truncated distribution has the Glorot variance.
    """
    stddev = math.sqrt(_fan_avg_scale(tensor)) / TRUNCATED_NORMAL_STD
    return nn.init.trunc_normal_(tensor, mean=0.0, std=stddev, a=-2.0 * stddev, b=2.0 * stddev, generator=generator)


@torch.no_grad()
def tf1_xavier_uniform_(tensor: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """TF1 ``tf.contrib.layers.xavier_initializer()`` (uniform), as some tutorials apply to biases too.

    Why: PyTorch (and Keras) zero or Kaiming-initialize biases; for a 1-D shape ``(n,)``
    contrib's variance scaling takes ``fan_in = fan_out = n``, so limit = sqrt(3 / n).
    """
    fan_in, fan_out = keras_fans(tensor)
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    return tensor.uniform_(-limit, limit, generator=generator)


@torch.no_grad()
def keras_init_(module: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Re-initialize ``module`` with Keras layer defaults and return it.

    Why: PyTorch's Conv/Linear default is Kaiming-uniform weights and uniform biases;
    Keras uses Glorot-uniform kernels and zero biases.  Batch norms get gamma 1, beta 0
    and fresh moving statistics (mean 0, variance 1), as in Keras.
    """
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            glorot_uniform_(layer.weight, generator=generator)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.reset_parameters()
    return module
