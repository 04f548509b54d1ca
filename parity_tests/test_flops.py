"""`torch_impl.flops`: the FLOPs `parity bench` divides by (its "GFLOP/s" and "of matmul" columns)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from parity.catalog import TRAINABLE_MODEL_NAMES, get_spec
from torch_impl.flops import flops_per_image, matmul_gflops


def _counted_by_hand(model_name: str) -> float:
    """2 FLOPs per multiply-add of every convolution and dense layer, from the shapes each layer produces."""
    from torch_impl.models import build_member, model_logits

    spec, member = get_spec(model_name), build_member(model_name, seed=0)
    total = []

    def conv(module, inputs, output):
        kh, kw = module.kernel_size
        total.append(2 * output[0].numel() * (module.in_channels // module.groups) * kh * kw)

    def dense(module, inputs, output):
        total.append(2 * module.in_features * module.out_features)

    for module in member.modules():
        if isinstance(module, nn.Conv2d):
            module.register_forward_hook(conv)
        elif isinstance(module, nn.Linear):
            module.register_forward_hook(dense)
    with torch.no_grad():
        model_logits(member, torch.rand(1, spec.input_shape[2], *spec.input_shape[:2]))
    assert total, f"{model_name}: no convolution or dense layer found"
    return float(sum(total)) * spec.members


@pytest.mark.parametrize("name", TRAINABLE_MODEL_NAMES)
def test_forward_flops_match_a_count_by_hand(name):
    assert flops_per_image(name, train=False) == _counted_by_hand(name)


@pytest.mark.parametrize("name", ["cnn", "lenet_d", "datacamp", "cnn_ensemble3"])
def test_a_training_step_costs_two_to_three_forwards(name):
    """The backward pass computes a weight gradient and an input gradient per layer (2x the forward), except the
    first layer's input gradient, which nothing needs."""
    forward, train = flops_per_image(name, train=False), flops_per_image(name, train=True)
    assert 2 * forward < train <= 3 * forward, (forward, train)


def test_matmul_rate_is_measured():
    rate = matmul_gflops("cpu", torch.float32, size=256, repeats=2)
    assert 0.1 < rate < 1e5, rate


def test_tensorflow_matmul_rate_is_measured(tf):
    """`tf_ref.flops` (the bench's other reference rate) times a multiply whose result it waits for."""
    from tf_ref.flops import matmul_gflops as tf_matmul_gflops

    rate = tf_matmul_gflops("float32", size=256, repeats=2)
    assert 0.1 < rate < 1e5, rate
