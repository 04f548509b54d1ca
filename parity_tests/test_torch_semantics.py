"""The TF-semantics building blocks in torch_impl, checked against direct computations and TensorFlow.

Direct-computation tests need only numpy and torch.  Tests marked ``tf`` also compare with
TensorFlow/Keras through the conftest ``tf`` fixture, which skips them where TensorFlow is not installed.
"""

from __future__ import annotations

import math
import os
import platform
import subprocess
import sys

import numpy as np
import pytest
import torch

# Loaded before TensorFlow on purpose: torch optimizers load torch._dynamo (and with it libtriton)
# lazily, and libtriton segfaults when it is first loaded into a process that already holds TensorFlow.
import torch._dynamo
import torch.nn.functional as F
from torch import nn

from torch_impl.init import (
    TRUNCATED_NORMAL_STD,
    glorot_normal_,
    glorot_uniform_,
    keras_fans,
    keras_init_,
    tf1_xavier_uniform_,
)
from torch_impl.layers import (
    AvgPool2d,
    BatchNorm1d,
    BatchNorm2d,
    Conv2d,
    Dropout,
    Linear,
    LocalResponseNorm,
    MaxPool2d,
    _native_max_pool_padding,
    _same_pads_2d,
    nhwc_flatten_permutation,
    tf_same_padding,
)
from torch_impl.optim import ExponentialDecay, KerasAdam, KerasRMSprop, exponential_decay_lambda

# ----------------------------------------------------------------------------------------------
# helpers


@pytest.fixture
def keras(tf):
    """Keras 3 on the TensorFlow backend; skipped without TensorFlow (``tf`` is the conftest fixture)."""
    import keras

    return keras


def assert_close(got, expected, atol: float, what: str) -> None:
    """Assert max |got - expected| <= atol, saying what was expected and what was got."""
    got, expected = np.asarray(got, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert got.shape == expected.shape, f"{what}: expected shape {expected.shape}, got {got.shape}"
    diff = float(np.max(np.abs(got - expected))) if got.size else 0.0
    assert diff <= atol, f"{what}: expected agreement within {atol:.1e}, got max abs diff {diff:.3e}"


def assert_rel_close(got, expected, rtol: float, what: str) -> None:
    """Assert max |got - expected| / max|expected| <= rtol."""
    got, expected = np.asarray(got, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert got.shape == expected.shape, f"{what}: expected shape {expected.shape}, got {got.shape}"
    diff = float(np.max(np.abs(got - expected)))
    scale = float(np.max(np.abs(expected)))
    assert diff <= rtol * scale, (
        f"{what}: expected relative agreement within {rtol:.1e}, got max abs diff {diff:.3e} (scale {scale:.3e})"
    )


def assert_differs(got, other, atol: float, what: str) -> None:
    """Assert the two differ by more than atol somewhere (used to show a PyTorch default is a trap)."""
    diff = float(np.max(np.abs(np.asarray(got, dtype=np.float64) - np.asarray(other, dtype=np.float64))))
    assert diff > atol, f"{what}: expected a difference above {atol:.1e}, got max abs diff {diff:.3e}"


def nchw_to_nhwc(x: torch.Tensor) -> np.ndarray:
    return x.detach().permute(0, 2, 3, 1).numpy()


def nhwc_to_nchw(y) -> np.ndarray:
    return np.transpose(np.asarray(y), (0, 3, 1, 2))


def np_rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def np_conv2d(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int, pads: tuple[int, int, int, int]):
    """Cross-correlation on NCHW with explicit (top, bottom, left, right) zero padding."""
    top, bottom, left, right = pads
    xp = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    kh, kw = w.shape[2:]
    out_h = (xp.shape[2] - kh) // stride + 1
    out_w = (xp.shape[3] - kw) // stride + 1
    out = np.zeros((x.shape[0], w.shape[0], out_h, out_w))
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, :, i : i + stride * (out_h - 1) + 1 : stride, j : j + stride * (out_w - 1) + 1 : stride]
            out += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j])
    return out + b[None, :, None, None]


def np_pool_same(x: np.ndarray, k: int, s: int, reduce) -> np.ndarray:
    """TF 'SAME' pooling by hand: each window reduces over the real pixels it covers only."""
    h, w = x.shape[2:]
    top, _ = tf_same_padding(h, k, s)
    left, _ = tf_same_padding(w, k, s)
    out = np.zeros(x.shape[:2] + (math.ceil(h / s), math.ceil(w / s)))
    for i in range(out.shape[2]):
        for j in range(out.shape[3]):
            r0, c0 = i * s - top, j * s - left
            window = x[:, :, max(r0, 0) : min(r0 + k, h), max(c0, 0) : min(c0 + k, w)]
            out[:, :, i, j] = reduce(window, axis=(2, 3))
    return out


# ----------------------------------------------------------------------------------------------
# 'same' padding and Conv2d

# (size, kernel, stride, dilation) -> (before, after), worked out by hand from TF's rule.
SAME_PADDING_CASES = {
    (7, 2, 2, 1): (0, 1),
    (8, 2, 2, 1): (0, 0),
    (7, 4, 2, 1): (1, 2),
    (8, 4, 2, 1): (1, 1),
    (7, 5, 2, 1): (2, 2),
    (8, 5, 2, 1): (1, 2),
    (28, 5, 2, 1): (1, 2),
    (28, 5, 1, 1): (2, 2),
    (6, 4, 1, 1): (1, 2),
    (5, 3, 1, 2): (2, 2),
    (1, 5, 3, 1): (2, 2),
    (10, 1, 3, 1): (0, 0),
}


@pytest.mark.parametrize(("case", "expected"), SAME_PADDING_CASES.items())
def test_tf_same_padding_table(case, expected):
    size, kernel, stride, dilation = case
    got = tf_same_padding(size, kernel, stride, dilation)
    assert got == expected, f"tf_same_padding{case}: expected {expected}, got {got}"
    out = (size + sum(got) - ((kernel - 1) * dilation + 1)) // stride + 1
    assert out == math.ceil(size / stride), (
        f"'same' output size for {case}: expected {math.ceil(size / stride)}, got {out}"
    )


CONV_CASES = [(7, 2, 2), (8, 2, 2), (7, 4, 2), (8, 4, 2), (7, 5, 2), (8, 5, 2), (9, 3, 1), (6, 4, 1), (6, 2, 1)]


def _conv_and_input(size: int, kernel: int, stride: int, padding: str) -> tuple[Conv2d, torch.Tensor]:
    torch.manual_seed(size * 100 + kernel * 10 + stride)
    conv = Conv2d(3, 4, kernel, stride=stride, padding=padding).double()
    x = torch.randn(2, 3, size, size + 1, dtype=torch.float64)  # non-square to catch H/W mix-ups
    return conv, x


@pytest.mark.parametrize(("size", "kernel", "stride"), CONV_CASES)
@pytest.mark.parametrize("padding", ["same", "valid"])
def test_conv2d_matches_direct(size, kernel, stride, padding):
    conv, x = _conv_and_input(size, kernel, stride, padding)
    if padding == "same":
        pads = tf_same_padding(size, kernel, stride) + tf_same_padding(size + 1, kernel, stride)
    else:
        pads = (0, 0, 0, 0)
    expected = np_conv2d(x.numpy(), conv.weight.detach().numpy(), conv.bias.detach().numpy(), stride, pads)
    assert_close(conv(x).detach().numpy(), expected, 1e-12, f"Conv2d {padding} k={kernel} s={stride} on {size}")


def test_conv2d_fast_path_is_native_symmetric_padding():
    conv = Conv2d(3, 4, 5, padding="same")
    assert conv.padding == (2, 2), f"expected native padding (2, 2) for 5x5/1 'same', got {conv.padding}"
    assert Conv2d(3, 4, 4, padding="same").padding == (0, 0), "even kernels must take the asymmetric path"
    assert set(conv.state_dict()) == {"weight", "bias"}, "state_dict must stay that of a plain nn.Conv2d"


@pytest.mark.tf
@pytest.mark.parametrize(("size", "kernel", "stride"), CONV_CASES)
@pytest.mark.parametrize("padding", ["same", "valid"])
def test_conv2d_matches_tf(tf, size, kernel, stride, padding):
    conv, x = _conv_and_input(size, kernel, stride, padding)
    w_hwio = conv.weight.detach().permute(2, 3, 1, 0).numpy()
    y = tf.nn.conv2d(nchw_to_nhwc(x), w_hwio, strides=stride, padding=padding.upper()) + conv.bias.detach().numpy()
    assert_close(conv(x).detach().numpy(), nhwc_to_nchw(y), 1e-12, f"Conv2d {padding} k={kernel} s={stride} vs TF")


# ----------------------------------------------------------------------------------------------
# pooling

# (size, kernel, stride): includes 7 -> 4 with 2x2/2 and windows hanging over both borders.
SAME_POOL_CASES = [(7, 2, 2), (7, 3, 2), (5, 3, 1), (6, 4, 1), (9, 2, 2), (8, 3, 3)]


def _pool_input(size: int, negative: bool = False) -> torch.Tensor:
    x = torch.from_numpy(np_rng(size).normal(size=(2, 3, size, size)))
    # All-negative inputs: zero padding would then win the max, -inf padding must not.
    return -x.abs() - 0.1 if negative else x


@pytest.mark.parametrize(("size", "kernel", "stride"), SAME_POOL_CASES)
def test_max_pool_same_matches_direct(size, kernel, stride):
    x = _pool_input(size, negative=True)
    got = MaxPool2d(kernel, stride, padding="same")(x).numpy()
    assert got.shape[-1] == math.ceil(size / stride), (
        f"expected output size {math.ceil(size / stride)}, got {got.shape}"
    )
    assert_close(got, np_pool_same(x.numpy(), kernel, stride, np.max), 0.0, f"max pool same k={kernel} s={stride}")


@pytest.mark.parametrize(("size", "kernel", "stride"), SAME_POOL_CASES)
def test_avg_pool_same_matches_direct(size, kernel, stride):
    x = _pool_input(size)
    got = AvgPool2d(kernel, stride, padding="same")(x).numpy()
    expected = np_pool_same(x.numpy(), kernel, stride, np.mean)
    assert_close(got, expected, 1e-12, f"avg pool same k={kernel} s={stride} on {size}")


@pytest.mark.parametrize(("size", "kernel", "stride"), SAME_POOL_CASES + [(28, 2, 2), (14, 3, 1), (28, 3, 1), (4, 2, 3)])
def test_max_pool_same_without_a_padded_copy_matches_the_padded_pool(size, kernel, stride):
    """Where `F.max_pool2d`'s own padding / ceil mode gives TF's 'same' windows (7 -> 4 at 2x2/2, 3x3/1), MaxPool2d
    uses it instead of copying the input into a -inf padded tensor: the same values and input gradients, ties
    included (the first maximum of a window gets the gradient)."""
    g = torch.Generator().manual_seed(size * 100 + kernel * 10 + stride)
    x = torch.randint(-3, 4, (2, 3, size, size), generator=g).double()  # few levels: many tied maxima
    pool = MaxPool2d(kernel, stride, padding="same")
    native = _native_max_pool_padding(x.shape[-2:], pool.kernel_size, pool.stride,
                                      _same_pads_2d(size, size, pool.kernel_size, pool.stride))
    outs = []
    for forward in (pool, lambda t: F.max_pool2d(F.pad(t, _same_pads_2d(size, size, pool.kernel_size, pool.stride),
                                                       value=-math.inf), kernel, stride)):
        leaf = x.clone().requires_grad_(True)
        out = forward(leaf)
        out.backward(torch.arange(out.numel(), dtype=out.dtype).reshape(out.shape))
        outs.append((out.detach(), leaf.grad))
    assert outs[0][0].shape[-1] == math.ceil(size / stride)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    if (size, kernel, stride) in ((7, 2, 2), (14, 3, 1), (28, 3, 1), (9, 2, 2)):  # the models' cases take the fast path
        assert native is not None, f"{size} {kernel}/{stride}: expected torch's own padding to serve"


def test_max_pool_same_7_to_4_default_stride():
    x = _pool_input(7, negative=True)
    got = MaxPool2d(2, padding="same")(x)
    assert got.shape == (2, 3, 4, 4), f"expected (2, 3, 4, 4), got {tuple(got.shape)}"
    # The last row/column windows hold a single real row/column: they must return it, not a padded 0.
    assert_close(got[:, :, 3, 3].numpy(), x[:, :, 6, 6].numpy(), 0.0, "corner window of 7 -> 4 max pool")


@pytest.mark.parametrize("size", [28, 7])
def test_relu_after_max_pool_equals_keras_order_values_and_gradients(size):
    """The port's `relu(maxpool(x))` (cnn, bn_cnn, datacamp, the vectorized ensemble) is Keras's `maxpool(relu(x))`
    exactly: the same values and the same input gradient, with ties inside windows (the first maximum gets the
    gradient in both), windows whose maximum is 0 or negative (no gradient in both), and the -inf 'same' padding."""
    g = torch.Generator().manual_seed(0)
    # few distinct levels: many windows hold tied maxima, zeros and all-negative values
    x = (torch.randint(-3, 4, (4, 5, size, size), generator=g).double() / 2).contiguous(
        memory_format=torch.channels_last)
    grad_out = torch.randn(4, 5, math.ceil(size / 2), math.ceil(size / 2), generator=g, dtype=torch.float64)
    pool = MaxPool2d(2, padding="same")
    results = []
    for forward in (lambda t: torch.relu(pool(t)), lambda t: pool(torch.relu(t))):
        leaf = x.clone().requires_grad_(True)
        out = forward(leaf)
        out.backward(grad_out)
        results.append((out.detach(), leaf.grad))
    (port, port_grad), (keras, keras_grad) = results
    assert (x == 0).any() and (keras == 0).any() and (port_grad != 0).any(), "the input must exercise every case"
    assert torch.equal(port, keras)
    assert torch.equal(port_grad, keras_grad), (port_grad - keras_grad).abs().max()
    # why only the max pools are reordered: an average does not commute with the ReLU (the LeNets keep Keras's order)
    assert not torch.equal(torch.relu(AvgPool2d(2, padding="same")(x)), AvgPool2d(2, padding="same")(torch.relu(x)))


def test_avg_pool_valid_3s2_on_7():
    x = _pool_input(7)
    got = AvgPool2d(3, 2)(x)
    assert got.shape == (2, 3, 3, 3), f"expected (2, 3, 3, 3), got {tuple(got.shape)}"
    expected = np.array([[x.numpy()[:, :, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3].mean(axis=(2, 3)) for j in range(3)]
                         for i in range(3)]).transpose(2, 3, 0, 1)  # fmt: skip
    assert_close(got.numpy(), expected, 1e-12, "avg pool valid 3/2 on 7")


@pytest.mark.tf
@pytest.mark.parametrize(("size", "kernel", "stride"), SAME_POOL_CASES)
def test_pools_same_match_tf(tf, size, kernel, stride):
    # float32: TF's 'SAME' max pool returns float32 even for float64 input, so compare in the dtype models use.
    x = _pool_input(size, negative=True).float()
    want_max = tf.nn.max_pool2d(nchw_to_nhwc(x), kernel, stride, "SAME")
    want_avg = tf.nn.avg_pool2d(nchw_to_nhwc(x), kernel, stride, "SAME")
    assert_close(MaxPool2d(kernel, stride, "same")(x).numpy(), nhwc_to_nchw(want_max), 0.0, "max pool same vs TF")
    assert_close(AvgPool2d(kernel, stride, "same")(x).numpy(), nhwc_to_nchw(want_avg), 1e-6, "avg pool same vs TF")


@pytest.mark.tf
def test_avg_pool_valid_matches_tf(tf):
    x = _pool_input(7)
    want = tf.nn.avg_pool2d(nchw_to_nhwc(x), 3, 2, "VALID")
    assert_close(AvgPool2d(3, 2)(x).numpy(), nhwc_to_nchw(want), 1e-12, "avg pool valid 3/2 on 7 vs TF")


# ----------------------------------------------------------------------------------------------
# local response normalization

LRN_CASES = [
    {"depth_radius": 2, "bias": 1.0, "alpha": 2e-5, "beta": 0.75},  # the tutorial's parameters
    {"depth_radius": 2, "bias": 1.0, "alpha": 0.5, "beta": 0.75},  # large alpha: normalization really bites
    {"depth_radius": 5, "bias": 2.0, "alpha": 0.1, "beta": 0.5},  # window wider than some channel edges
]


def _lrn_input() -> torch.Tensor:
    return torch.from_numpy(np_rng(3).normal(size=(2, 8, 5, 4)).astype(np.float32))


def np_lrn(x: np.ndarray, depth_radius: int, bias: float, alpha: float, beta: float) -> np.ndarray:
    out = np.empty_like(x, dtype=np.float64)
    channels = x.shape[1]
    for c in range(channels):
        window = x[:, max(c - depth_radius, 0) : min(c + depth_radius + 1, channels)].astype(np.float64)
        out[:, c] = x[:, c] / (bias + alpha * (window**2).sum(axis=1)) ** beta
    return out


@pytest.mark.parametrize("params", LRN_CASES)
def test_lrn_matches_direct(params):
    x = _lrn_input()
    assert_close(LocalResponseNorm(**params)(x).numpy(), np_lrn(x.numpy(), **params), 1e-6, f"LRN {params}")


def test_torch_lrn_with_naive_params_differs():
    x, params = _lrn_input(), LRN_CASES[1]
    ours = LocalResponseNorm(**params)(x).numpy()
    size = 2 * params["depth_radius"] + 1
    naive = nn.LocalResponseNorm(size, alpha=params["alpha"], beta=params["beta"], k=params["bias"])(x).numpy()
    assert_differs(ours, naive, 1e-2, "nn.LocalResponseNorm(alpha=alpha) (it divides alpha by the window size)")
    mapped = nn.LocalResponseNorm(size, alpha=params["alpha"] * size, beta=params["beta"], k=params["bias"])(x)
    assert_close(mapped.numpy(), ours, 1e-6, "nn.LocalResponseNorm(alpha=alpha * size) vs ours")


@pytest.mark.tf
@pytest.mark.parametrize("params", LRN_CASES)
def test_lrn_matches_tf(tf, params):
    x = _lrn_input()
    want = tf.nn.local_response_normalization(nchw_to_nhwc(x), **params)
    assert_close(LocalResponseNorm(**params)(x).numpy(), nhwc_to_nchw(want), 1e-6, f"LRN vs TF {params}")


@pytest.mark.tf
@pytest.mark.parametrize("scale", [1.0, 1000.0, 5000.0])
def test_float32_lrn_at_raw_pixel_magnitudes_is_float64_lrn_in_both_frameworks(tf, scale):
    """Tutorial 003 feeds 0-255 pixels, so its LRN layers see activations in the hundreds to thousands, where
    alpha * sum(x^2) dominates the bias. TF's float32 kernel inside a `tf.function` (where oneDNN may rewrite it)
    and the port's layer both stay within 1e-6 (relative to the largest value) of the float64 LRN, forward and
    gradient: neither framework's float32 LRN drifts at these magnitudes."""
    params = LRN_CASES[0]
    g = np_rng(6)
    x = np.maximum(g.normal(size=(8, 8, 7, 7)) * scale, 0).astype(np.float32)  # NCHW, ReLU'd as after the pools
    upstream = g.normal(size=x.shape).astype(np.float32)

    x64 = torch.from_numpy(x).double().requires_grad_()
    LocalResponseNorm(**params)(x64).backward(torch.from_numpy(upstream).double())
    want_out, want_grad = np_lrn(x, **params), x64.grad.numpy()

    x32 = torch.from_numpy(x).requires_grad_()
    out32 = LocalResponseNorm(**params)(x32)
    out32.backward(torch.from_numpy(upstream))

    @tf.function
    def tf_lrn(inputs, dy):
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            out = tf.nn.local_response_normalization(inputs, **params)
        return out, tape.gradient(out, inputs, output_gradients=dy)

    tf_out, tf_grad = tf_lrn(tf.constant(nchw_to_nhwc(torch.from_numpy(x))), tf.constant(nchw_to_nhwc(
        torch.from_numpy(upstream))))

    def rel(got, want):
        return float(np.abs(got - want).max() / np.abs(want).max())

    errors = {"torch forward": rel(out32.detach().numpy(), want_out),
              "torch gradient": rel(x32.grad.numpy(), want_grad),
              "TF forward": rel(nhwc_to_nchw(tf_out), want_out), "TF gradient": rel(nhwc_to_nchw(tf_grad), want_grad)}
    assert max(errors.values()) < 1e-6, errors


# ----------------------------------------------------------------------------------------------
# batch normalization


def _bn_batches(dtype=np.float64) -> list[np.ndarray]:
    g = np_rng(4)
    return [(g.normal(size=(4, 3, 5, 6)) * (1.0 + i) + i).astype(dtype) for i in range(3)]


def _bn_affine(channels: int = 3) -> tuple[np.ndarray, np.ndarray]:
    g = np_rng(5)
    return g.uniform(0.5, 1.5, size=channels), g.normal(size=channels)


def _torch_bn2d(dtype: torch.dtype) -> BatchNorm2d:
    bn = BatchNorm2d(3, dtype=dtype)
    gamma, beta = _bn_affine()
    with torch.no_grad():
        bn.weight.copy_(torch.from_numpy(gamma))
        bn.bias.copy_(torch.from_numpy(beta))
    return bn


def test_batchnorm2d_matches_direct():
    bn = _torch_bn2d(torch.float64)
    gamma, beta = (a[None, :, None, None] for a in _bn_affine())
    moving_mean, moving_var = np.zeros(3), np.ones(3)
    for step, x in enumerate(_bn_batches()):
        mean, var = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))  # numpy var is the biased one
        expected = (x - mean[None, :, None, None]) / np.sqrt(var[None, :, None, None] + 1e-3) * gamma + beta
        assert_close(bn(torch.from_numpy(x)).detach().numpy(), expected, 1e-12, f"BN training output, step {step}")
        moving_mean, moving_var = 0.99 * moving_mean + 0.01 * mean, 0.99 * moving_var + 0.01 * var
    assert_close(bn.running_mean.numpy(), moving_mean, 1e-12, "BN running_mean after 3 steps")
    assert_close(bn.running_var.numpy(), moving_var, 1e-12, "BN running_var (biased) after 3 steps")
    assert int(bn.num_batches_tracked) == 3, f"expected num_batches_tracked 3, got {int(bn.num_batches_tracked)}"

    bn.eval()
    x = _bn_batches()[0]
    expected = (x - moving_mean[None, :, None, None]) / np.sqrt(moving_var[None, :, None, None] + 1e-3) * gamma + beta
    assert_close(bn(torch.from_numpy(x)).detach().numpy(), expected, 1e-12, "BN eval output")


def test_batchnorm_keeps_standard_state_dict_and_torch_bn_differs():
    bn, stock = _torch_bn2d(torch.float64), nn.BatchNorm2d(3, eps=1e-3, momentum=0.01, dtype=torch.float64)
    assert bn.momentum == pytest.approx(0.01) and bn.eps == 1e-3, f"got momentum {bn.momentum}, eps {bn.eps}"
    assert set(bn.state_dict()) == set(stock.state_dict()), "buffer/parameter names must match nn.BatchNorm2d"
    stock.load_state_dict(bn.state_dict())
    for x in _bn_batches():
        bn(torch.from_numpy(x))
        stock(torch.from_numpy(x))
    # nn.BatchNorm2d feeds the unbiased variance (N/(N-1), N = 120 here) into running_var.
    assert_differs(bn.running_var.numpy(), stock.running_var.numpy(), 1e-4, "stock nn.BatchNorm2d running_var")


def test_batchnorm1d_matches_direct():
    bn = BatchNorm1d(5, keras_momentum=0.9, epsilon=1e-5, dtype=torch.float64)
    x = np_rng(6).normal(size=(16, 5)) * 3 + 1
    got = bn(torch.from_numpy(x)).detach().numpy()
    assert_close(got, (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5), 1e-12, "BatchNorm1d training output")
    assert_close(bn.running_var.numpy(), 0.9 + 0.1 * x.var(0), 1e-12, "BatchNorm1d running_var")


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_batchnorm_under_autocast_computes_its_statistics_in_float32(half):
    """A convolution under autocast hands BatchNorm 16-bit activations: the batch statistics (and so the moving ones)
    are those of the same values in float32, as in Keras's mixed-precision BatchNormalization; the output keeps the
    16-bit dtype."""
    x = (torch.randn(32, 3, 12, 12, generator=torch.Generator().manual_seed(0)) * 4 + 3).to(half)
    bn, ref = BatchNorm2d(3), BatchNorm2d(3)
    out, expected = bn(x), ref(x.float())
    assert out.dtype == half, f"output dtype {out.dtype}, expected {half}"
    assert torch.equal(bn.running_mean, ref.running_mean) and torch.equal(bn.running_var, ref.running_var), (
        f"moving statistics differ from float32's by {(bn.running_var - ref.running_var).abs().max():.3g}")
    assert torch.equal(out, expected.to(half))
    assert bn.running_mean.dtype == torch.float32


@pytest.mark.parametrize(("layer", "shape"), [(BatchNorm2d, (6, 4, 5, 7)), (BatchNorm1d, (9, 4)),
                                               (BatchNorm1d, (5, 4, 3))])
def test_batchnorm_fused_training_path_equals_the_keras_formula(layer, shape):
    """In training mode the layers run torch's fused `F.batch_norm` and recover the biased variance from its
    unbiased running update; the synchronized layers of `torch_impl.distributed` keep the elementwise formula
    (`_moments`, reduced over processes). In float64 both give the same output, input and affine gradients, and
    moving statistics over several steps (1e-12), channels_last included."""
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(shape, generator=g, dtype=torch.float64) * (1 + i) + i for i in range(3)]
    if len(shape) == 4:
        batches = [b.contiguous(memory_format=torch.channels_last) for b in batches]
    fused, formula = layer(4, dtype=torch.float64), layer(4, dtype=torch.float64)
    with torch.no_grad():
        for bn in (fused, formula):
            bn.weight.copy_(torch.linspace(0.5, 1.5, 4, dtype=torch.float64))
            bn.bias.copy_(torch.linspace(-1, 1, 4, dtype=torch.float64))
    formula._local_statistics = lambda: False  # as a synchronized layer under several processes
    calls = []
    fused._fused_training_forward = lambda *a, f=fused._fused_training_forward: calls.append(1) or f(*a)
    for x in batches:
        grads = []
        for bn in (fused, formula):
            leaf = x.clone().requires_grad_(True)
            out = bn(leaf)
            (out * torch.arange(out.numel(), dtype=out.dtype).reshape(out.shape).sin()).sum().backward()
            grads.append((out.detach(), leaf.grad))
        assert_close(grads[0][0].numpy(), grads[1][0].numpy(), 1e-12, "fused vs formula output")
        assert_close(grads[0][1].numpy(), grads[1][1].numpy(), 1e-12, "fused vs formula input gradient")
    assert len(calls) == len(batches), "the fused path was not taken"
    for name in ("weight", "bias"):
        assert_close(getattr(fused, name).grad.numpy(), getattr(formula, name).grad.numpy(), 1e-12, f"{name} grad")
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert_close(getattr(fused, name).numpy(), getattr(formula, name).numpy(), 1e-12, name)


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_batchnorm_held_in_16_bits_trains_through_the_fused_path(half):
    """A module converted to 16 bits (Lightning's `bf16-true`): parameters, buffers and input all in `half`. The fused
    path computes in float32 with the parameters cast to it, as the formula does, and agrees with the formula to
    the 16-bit rounding of the output and buffers (8 significant bits in bfloat16, 11 in float16: rtol 1e-2)."""
    g = torch.Generator().manual_seed(6)
    fused, formula = BatchNorm2d(4).to(half), BatchNorm2d(4).to(half)
    formula._local_statistics = lambda: False
    for _ in range(2):
        x = (torch.randn(3, 4, 5, 5, generator=g) * 3 + 1).to(half)
        outs = [bn(x.clone().requires_grad_(True)) for bn in (fused, formula)]
        assert outs[0].dtype == half
        torch.testing.assert_close(outs[0].float(), outs[1].float(), rtol=1e-2, atol=1e-2)
        outs[0].float().sum().backward()
    assert fused.weight.grad is not None and fused.weight.grad.dtype == half
    assert fused.running_var.dtype == half
    torch.testing.assert_close(fused.running_var.float(), formula.running_var.float(), rtol=1e-2, atol=1e-2)
    assert not torch.equal(fused.running_var, torch.ones_like(fused.running_var)), "the moving variance must move"


def test_batchnorm_gradients_flow():
    bn = _torch_bn2d(torch.float64)
    x = torch.from_numpy(_bn_batches()[0]).requires_grad_()
    ref = nn.BatchNorm2d(3, eps=1e-3, dtype=torch.float64)
    ref.load_state_dict(bn.state_dict())
    x_ref = x.detach().clone().requires_grad_()
    weights = torch.from_numpy(np_rng(7).normal(size=x.shape))
    (bn(x) * weights).sum().backward()
    (ref(x_ref) * weights).sum().backward()
    # Training-mode normalization is the same as nn.BatchNorm2d's, so the gradients must agree too.
    assert_close(x.grad.numpy(), x_ref.grad.numpy(), 1e-10, "BN input gradient vs nn.BatchNorm2d")
    assert_close(bn.weight.grad.numpy(), ref.weight.grad.numpy(), 1e-10, "BN gamma gradient vs nn.BatchNorm2d")


@pytest.mark.tf
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_batchnorm2d_matches_keras(keras, dtype):
    atol = 1e-12 if dtype == "float64" else 1e-6
    bn = _torch_bn2d(getattr(torch, dtype))
    layer = keras.layers.BatchNormalization(dtype=dtype)
    layer.build((None, 5, 6, 3))
    layer.gamma.assign(_bn_affine()[0])
    layer.beta.assign(_bn_affine()[1])
    for step, x in enumerate(_bn_batches(dtype)):
        want = layer(np.transpose(x, (0, 2, 3, 1)), training=True)
        assert_close(bn(torch.from_numpy(x)).detach().numpy(), nhwc_to_nchw(want), atol, f"BN vs Keras, step {step}")
    assert_close(bn.running_mean.numpy(), layer.moving_mean.numpy(), atol, "running_mean vs Keras moving_mean")
    assert_close(bn.running_var.numpy(), layer.moving_variance.numpy(), atol, "running_var vs Keras moving_variance")
    bn.eval()
    x = _bn_batches(dtype)[1]
    want = layer(np.transpose(x, (0, 2, 3, 1)), training=False)
    assert_close(bn(torch.from_numpy(x)).detach().numpy(), nhwc_to_nchw(want), atol, "BN eval vs Keras")


# ----------------------------------------------------------------------------------------------
# Dropout: Keras `Dropout(rate)` and TF's `tf.nn.dropout(x, rate=...)` are torch's `nn.Dropout(p=rate)`: both drop
# a fraction `rate` and scale what they keep by 1 / (1 - rate) ("inverted" dropout), and only in training mode.
# The trap is TF1's `keep_prob` argument, which is 1 - rate.

DROP_RATE = 0.4


def _dropout_statistics(kept: np.ndarray, rate: float) -> None:
    n = kept.size
    dropped = float((kept == 0).mean())
    # the dropped fraction of n Bernoulli(rate) draws: within 5 standard deviations of rate
    assert abs(dropped - rate) <= 5 * math.sqrt(rate * (1 - rate) / n), f"dropped {dropped:.4f}, expected {rate}"
    np.testing.assert_allclose(kept[kept != 0], 1.0 / (1.0 - rate), rtol=1e-6)


def test_torch_dropout_is_inverted_and_off_in_eval():
    torch.manual_seed(0)
    layer = nn.Dropout(DROP_RATE)
    x = torch.ones(200_000)
    _dropout_statistics(layer.train()(x).numpy(), DROP_RATE)
    assert torch.equal(layer.eval()(x), x)


def test_keras_and_tf_dropout_take_the_same_rate(tf, keras):
    """Keras's layer and the low-level op of tutorial 004 (`tf.nn.dropout(x, rate=...)`) with the same argument as
    torch's `nn.Dropout(p)`, scaled the same way; Keras's layer passes inputs through unless `training=True`."""
    x = np.ones(200_000, dtype=np.float32)
    layer = keras.layers.Dropout(DROP_RATE, seed=0)
    _dropout_statistics(np.asarray(layer(x, training=True)), DROP_RATE)
    np.testing.assert_array_equal(np.asarray(layer(x, training=False)), x)
    tf.random.set_seed(0)
    _dropout_statistics(tf.nn.dropout(x, rate=DROP_RATE).numpy(), DROP_RATE)


def test_port_dropout_is_inverted_off_in_eval_and_keeps_where_the_uniform_draw_reaches_the_rate():
    """`torch_impl.layers.Dropout` on a CPU: keep where uniform[0, 1) >= rate (TensorFlow's rule), scale the kept by
    1 / (1 - rate); the gradient is the same mask and scale; a pass-through in eval mode and at rate 0."""
    layer = Dropout(DROP_RATE)
    assert isinstance(layer, nn.Dropout)  # what code that finds or switches off dropout layers looks for
    x = torch.ones(200_000, requires_grad=True)
    torch.manual_seed(0)
    y = layer.train()(x)
    _dropout_statistics(y.detach().numpy(), DROP_RATE)
    torch.manual_seed(0)
    uniform = torch.rand(200_000)
    expected = (uniform >= DROP_RATE).float() / (1 - DROP_RATE)
    assert torch.equal(y.detach(), expected)
    y.backward(torch.full_like(y, 3.0))
    assert torch.equal(x.grad, 3.0 * expected)
    assert torch.equal(layer.eval()(x), x)
    assert torch.equal(Dropout(0.0).train()(x), x)


def test_port_dropout_draws_in_float32_for_bfloat16_and_keeps_the_layout():
    """A bfloat16 uniform has 8 bits (its keep rate would be off by up to 1/256): the draw is float32, the output
    bfloat16. Channels-last input stays channels-last (the mask is drawn in its layout)."""
    layer = Dropout(DROP_RATE).train()
    torch.manual_seed(0)
    y = layer(torch.ones(400_000, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    kept = y.float().numpy()
    dropped, n = float((kept == 0).mean()), kept.size
    assert abs(dropped - DROP_RATE) <= 5 * math.sqrt(DROP_RATE * (1 - DROP_RATE) / n), dropped
    scale = torch.tensor(1 / (1 - DROP_RATE)).to(torch.bfloat16).item()  # the scale, rounded to bfloat16
    np.testing.assert_array_equal(kept[kept != 0], scale)
    x = torch.ones(8, 16, 5, 5).contiguous(memory_format=torch.channels_last)
    assert layer(x).is_contiguous(memory_format=torch.channels_last)


def test_tf_dropout_keeps_where_the_uniform_draw_reaches_the_rate(tf):
    """The rule `torch_impl.layers.Dropout` follows is TensorFlow's: `stateless_dropout` keeps x / (1 - rate) where
    its uniform draw (same shape, seed and dtype) is >= rate."""
    x = np.ones(100_000, dtype=np.float32)
    seed = [1, 2]
    y = tf.nn.experimental.stateless_dropout(x, rate=DROP_RATE, seed=seed).numpy()
    uniform = tf.random.stateless_uniform(x.shape, seed=seed, dtype=tf.float32).numpy()
    np.testing.assert_array_equal(y != 0, uniform >= DROP_RATE)
    _dropout_statistics(y, DROP_RATE)


# ----------------------------------------------------------------------------------------------
# Dense: oneDNN's inner product for large float32 products on an x86-64 CPU

ONEDNN_EXPECTED = platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()


def _linear_and_grads(layer: nn.Linear, x: torch.Tensor, grad: torch.Tensor, forward=None):
    x = x.detach().requires_grad_()
    y = (forward or layer)(x)
    return [y, *torch.autograd.grad(y, (x, layer.weight, layer.bias), grad)]


@pytest.mark.parametrize(("batch", "fin", "fout"), [(100, 2048, 256), (32, 3136, 1024), (128, 2048, 128)])
def test_linear_large_products_take_onednn_and_equal_f_linear_forward_and_gradients(batch, fin, fout):
    """The catalog's large Dense layers (cnn / bn_cnn 2048->256, datacamp 2048->128, at their batch) take their
    gradients from oneDNN's inner product on this CPU: the output is `F.linear`'s bit for bit; input, weight and bias
    gradients equal `F.linear`'s to float32 rounding of a different summation order (relative 1e-5 of the largest
    value; a wrong transpose or a missing bias would be off by O(1)), and all are the float64 product to the same
    tolerance."""
    torch.manual_seed(0)
    layer = Linear(fin, fout)
    assert isinstance(layer, nn.Linear) and list(layer.state_dict()) == ["weight", "bias"]
    x, grad = torch.randn(batch, fin), torch.randn(batch, fout)
    if ONEDNN_EXPECTED:
        assert layer._use_onednn(x)
    got = _linear_and_grads(layer, x, grad)
    if ONEDNN_EXPECTED:
        assert type(got[0].grad_fn).__name__ == "_OneDNNLinearBackward"
    plain = _linear_and_grads(layer, x, grad, lambda t: F.linear(t, layer.weight, layer.bias))
    exact = _linear_and_grads(layer.double(), x.double(), grad.double())
    layer.float()
    assert torch.equal(got[0], plain[0])
    for name, a, b, c in zip(("output", "grad x", "grad weight", "grad bias"), got, plain, exact):
        scale = c.abs().max().item()
        assert (a.double() - c).abs().max().item() <= 1e-5 * scale, name
        assert (a - b).abs().max().item() <= 1e-5 * scale, name


def test_linear_keeps_f_linear_for_small_products_other_dtypes_autocast_and_strided_input():
    """Where oneDNN would not pay or does not apply (or no gradient is taken), the layer is exactly `F.linear`."""
    torch.manual_seed(0)
    big, small = Linear(2048, 256), Linear(256, 10)
    assert not small._use_onednn(torch.randn(100, 256))  # 256k multiply-adds: MKL's GEMM is faster
    assert not big._use_onednn(torch.randn(256, 100).t())  # not contiguous
    assert not big._use_onednn(torch.randn(100, 3, 2048))  # 3-D input
    assert not big.double()._use_onednn(torch.randn(100, 2048, dtype=torch.float64))
    big.float()
    x = torch.randn(100, 2048)
    with torch.no_grad():  # inference: nothing to differ from F.linear
        assert not big._use_onednn(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not big._use_onednn(x)
        assert big(x).dtype == torch.bfloat16  # autocast's own linear
    y = small(torch.randn(100, 256))
    assert type(y.grad_fn).__name__ == "AddmmBackward0"


def test_linear_under_torch_compile_is_traced_as_f_linear():
    """torch.compile (and torch.export, which ONNX export uses) see `F.linear`, not the custom autograd function."""
    torch._dynamo.reset()
    layer = Linear(2048, 256)
    x = torch.randn(100, 2048)
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(node.target) for node in gm.graph.nodes)
        return gm

    y = torch.compile(layer, backend=backend)(x)
    torch.testing.assert_close(y, F.linear(x, layer.weight, layer.bias))
    assert any("linear" in target for target in seen) and not any("OneDNN" in target for target in seen), seen


@pytest.mark.tf
def test_port_dense_matches_keras_dense_forward_and_gradients(tf, keras):
    """`keras.layers.Dense(256)` on (100, 2048) float32, its kernel (in, out) given to the port's `Linear` as
    weight (out, in): output, input, kernel and bias gradients agree to float32 rounding (relative 1e-5 of the
    largest value), with the port on its oneDNN path where this CPU has it."""
    rng = np_rng(3)
    x = rng.normal(size=(100, 2048)).astype(np.float32)
    grad = rng.normal(size=(100, 256)).astype(np.float32)
    dense = keras.layers.Dense(256)
    dense.build((None, 2048))
    dense.bias.assign(rng.normal(size=256).astype(np.float32))
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        out = dense(xt)
    want = [out, *tape.gradient(out, [xt, dense.kernel, dense.bias], output_gradients=tf.constant(grad))]
    layer = Linear(2048, 256)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(dense.kernel.numpy().T))
        layer.bias.copy_(torch.from_numpy(dense.bias.numpy()))
    assert layer._use_onednn(torch.from_numpy(x)) == ONEDNN_EXPECTED
    got = _linear_and_grads(layer, torch.from_numpy(x), torch.from_numpy(grad))
    got[2] = got[2].T  # weight gradient (out, in) -> Keras's kernel layout (in, out)
    for name, a, b in zip(("output", "grad x", "grad kernel", "grad bias"), got, want):
        b = np.asarray(b)
        assert_close(a.detach().numpy(), b, 1e-5 * np.abs(b).max(), f"Dense {name} vs Keras")


def test_linear_onednn_path_switched_off_by_environment():
    """PARITY_ONEDNN_LINEAR=0: every product through F.linear (checked in a fresh process: read at import)."""
    code = ("import torch; from torch_impl.layers import Linear; "
            "print(Linear(2048, 256)._use_onednn(torch.randn(100, 2048)))")
    env = {**os.environ, "PARITY_ONEDNN_LINEAR": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ----------------------------------------------------------------------------------------------
# Flatten order


def test_nhwc_flatten_permutation():
    c, h, w = 3, 4, 5
    x_nhwc = torch.from_numpy(np_rng(8).normal(size=(2, h, w, c)))
    x_nchw = x_nhwc.permute(0, 3, 1, 2)
    perm = nhwc_flatten_permutation(c, h, w)
    assert perm.dtype == torch.long, f"expected a LongTensor, got {perm.dtype}"
    assert_close(x_nchw.flatten(1).numpy(), x_nhwc.flatten(1)[:, perm].numpy(), 0.0, "NCHW flatten vs permuted NHWC")
    # Weight transfer: a Keras Dense kernel (h*w*c, out) after an NHWC Flatten.
    kernel = np_rng(9).normal(size=(h * w * c, 7))
    linear = nn.Linear(h * w * c, 7, bias=False).double()
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(kernel).T[:, perm])
    expected = x_nhwc.flatten(1).numpy() @ kernel
    assert_close(linear(x_nchw.flatten(1)).detach().numpy(), expected, 1e-12, "Dense after Flatten, transferred")
    inverse = torch.argsort(perm)
    assert_close(x_nchw.flatten(1)[:, inverse].numpy(), x_nhwc.flatten(1).numpy(), 0.0, "argsort(perm) inverts it")


# ----------------------------------------------------------------------------------------------
# initializers


def test_keras_fans():
    cases = {(8, 3, 5, 5): (75, 200), (10, 3136): (3136, 10), (32,): (32, 32), (4, 2, 1, 3): (6, 12)}
    for shape, expected in cases.items():
        got = keras_fans(torch.empty(shape))
        assert got == expected, f"keras_fans{shape}: expected {expected}, got {got}"


def test_truncated_normal_constant():
    # Std of a unit normal truncated to [-2, 2]: sqrt(1 - 2 * 2 * pdf(2) / (cdf(2) - cdf(-2))).
    pdf2 = math.exp(-2.0) / math.sqrt(2.0 * math.pi)
    mass = math.erf(2.0 / math.sqrt(2.0))
    expected = math.sqrt(1.0 - 4.0 * pdf2 / mass)
    assert abs(TRUNCATED_NORMAL_STD - expected) < 1e-15, f"expected {expected!r}, got {TRUNCATED_NORMAL_STD!r}"


def _big_conv_weight() -> torch.Tensor:
    return torch.empty(256, 128, 5, 5)  # fan_in 3200, fan_out 6400, 819200 samples


def test_glorot_uniform_statistics():
    w = glorot_uniform_(_big_conv_weight(), generator=torch.Generator().manual_seed(0))
    limit = math.sqrt(6.0 / (3200 + 6400))
    assert float(w.abs().max()) <= limit, f"expected |w| <= {limit:.6f}, got max {float(w.abs().max()):.6f}"
    assert float(w.abs().max()) > 0.999 * limit, f"expected samples near the limit {limit:.6f}"
    assert abs(float(w.std()) / (limit / math.sqrt(3.0)) - 1.0) < 0.01, f"std {float(w.std()):.6f} off uniform std"
    assert abs(float(w.mean())) < 0.01 * limit, f"expected mean ~0, got {float(w.mean()):.2e}"


def test_glorot_normal_statistics():
    w = glorot_normal_(_big_conv_weight(), generator=torch.Generator().manual_seed(0))
    target_std = math.sqrt(2.0 / (3200 + 6400))
    bound = 2.0 * target_std / TRUNCATED_NORMAL_STD
    assert float(w.abs().max()) <= bound, f"expected truncation at {bound:.6f}, got max {float(w.abs().max()):.6f}"
    assert float(w.abs().max()) > 0.99 * bound, f"expected samples near the truncation bound {bound:.6f}"
    assert abs(float(w.std()) / target_std - 1.0) < 0.01, f"expected std {target_std:.6f}, got {float(w.std()):.6f}"


def test_tf1_xavier_uniform_on_bias():
    n = 100_000
    b = tf1_xavier_uniform_(torch.empty(n), generator=torch.Generator().manual_seed(0))
    limit = math.sqrt(3.0 / n)  # fan_in = fan_out = n for a 1-D shape
    assert limit * 0.999 < float(b.abs().max()) <= limit, (
        f"expected max |b| just under {limit:.3e}, got {b.abs().max()}"
    )
    assert abs(float(b.std()) / (limit / math.sqrt(3.0)) - 1.0) < 0.01, f"std {float(b.std()):.3e} off uniform std"


def test_keras_init_defaults():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(5.0)
    keras_init_(model, generator=torch.Generator().manual_seed(0))
    conv, bn, _, linear = (layer.requires_grad_(False) for layer in model)
    assert float(conv.bias.abs().max()) == 0.0 and float(linear.bias.abs().max()) == 0.0, "biases must be zero"
    assert float(conv.weight.abs().max()) <= math.sqrt(6.0 / (9 + 36)), "conv kernel outside the Glorot limit"
    assert float(linear.weight.abs().max()) <= math.sqrt(6.0 / (2704 + 10)), "dense kernel outside the Glorot limit"
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0), "BN gamma must be 1 and beta 0"


@pytest.mark.tf
def test_fans_and_limits_match_keras(keras):
    from keras.src.initializers.random_initializers import compute_fans

    for oihw in [(8, 3, 5, 5), (64, 32, 3, 3), (16, 8, 2, 2)]:
        hwio = (oihw[2], oihw[3], oihw[1], oihw[0])
        got, expected = keras_fans(torch.empty(oihw)), compute_fans(hwio)
        assert got == expected, f"fans of OIHW {oihw}: expected Keras {expected} (HWIO {hwio}), got {got}"
    got, expected = keras_fans(torch.empty(10, 3136)), compute_fans((3136, 10))
    assert got == expected, f"fans of Linear (10, 3136): expected Keras {expected}, got {got}"

    shape = (5, 5, 128, 256)
    limit = math.sqrt(6.0 / sum(keras_fans(torch.empty(256, 128, 5, 5))))
    k_uniform = np.asarray(keras.initializers.GlorotUniform(seed=0)(shape))
    assert 0.999 * limit < np.abs(k_uniform).max() <= limit, f"Keras GlorotUniform max {np.abs(k_uniform).max()}"
    k_normal = np.asarray(keras.initializers.GlorotNormal(seed=0)(shape))
    bound = 2.0 * math.sqrt(2.0 / (3200 + 6400)) / TRUNCATED_NORMAL_STD
    assert 0.99 * bound < np.abs(k_normal).max() <= bound * (1 + 1e-6), (
        f"Keras GlorotNormal max {np.abs(k_normal).max()}"
    )
    assert abs(k_normal.std() / math.sqrt(2.0 / 9600) - 1.0) < 0.01, f"Keras GlorotNormal std {k_normal.std()}"


@pytest.mark.tf
def test_tf1_glorot_fans_for_1d_shape(tf):
    n = 100_000
    b = tf.compat.v1.glorot_uniform_initializer(seed=0)(shape=(n,)).numpy()
    limit = math.sqrt(3.0 / n)
    assert 0.999 * limit < np.abs(b).max() <= limit, f"TF1 glorot on ({n},): expected limit {limit:.3e}"


# ----------------------------------------------------------------------------------------------
# optimizers: a small quadratic loss sum(c * (p - target)^2)

QUAD_C = np.array([0.5, 2.0, 1e-3, 10.0, 1.0])
QUAD_TARGET = np.array([1.0, -2.0, 0.5, 0.0, 3.0])
QUAD_START = np.array([0.0, 1.0, -1.0, 2.0, 0.5])


def np_quad_grad(p: np.ndarray) -> np.ndarray:
    return 2.0 * QUAD_C * (p - QUAD_TARGET)


def torch_quad_loss(p: torch.Tensor) -> torch.Tensor:
    c, target = torch.from_numpy(QUAD_C).to(p.dtype), torch.from_numpy(QUAD_TARGET).to(p.dtype)
    return (c * (p - target) ** 2).sum()


def run_torch(make_opt, steps: int, dtype=torch.float64, start=QUAD_START) -> np.ndarray:
    p = torch.tensor(start, dtype=dtype, requires_grad=True)
    opt = make_opt([p])
    for _ in range(steps):
        opt.zero_grad()
        torch_quad_loss(p).backward()
        opt.step()
    return p.detach().numpy()


def run_keras(tf, keras, optimizer, steps: int, dtype: str = "float64", start=QUAD_START) -> np.ndarray:
    v = keras.Variable(start.astype(dtype), dtype=dtype)
    c, target = tf.constant(QUAD_C, dtype=dtype), tf.constant(QUAD_TARGET, dtype=dtype)
    for _ in range(steps):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(c * (v - target) ** 2)
        optimizer.apply_gradients([(tape.gradient(loss, v), v)])
    return v.numpy()


def np_keras_adam(p, grad_fn, steps, lr, beta_1=0.9, beta_2=0.999, epsilon=1e-7) -> np.ndarray:
    p, m, v = p.copy(), np.zeros_like(p), np.zeros_like(p)
    # Keras' tf.cast of the Python betas rounds them to float32 before the bias-correction powers.
    beta_1_hat, beta_2_hat = float(np.float32(beta_1)), float(np.float32(beta_2))
    for t in range(1, steps + 1):
        g = grad_fn(p)
        alpha = lr * math.sqrt(1 - beta_2_hat**t) / (1 - beta_1_hat**t)
        m += (g - m) * (1 - beta_1)
        v += (g * g - v) * (1 - beta_2)
        p -= alpha * m / (np.sqrt(v) + epsilon)
    return p


@pytest.fixture
def keras64(tf, keras):
    """Keras with floatx float64, so the optimizer's learning-rate variable is float64 too."""
    previous = keras.config.floatx()
    keras.config.set_floatx("float64")
    yield keras
    keras.config.set_floatx(previous)


def test_keras_adam_matches_numpy():
    got = run_torch(lambda ps: KerasAdam(ps, lr=0.1), 10)
    expected = np_keras_adam(QUAD_START, np_quad_grad, 10, lr=0.1)
    assert_rel_close(got, expected, 1e-12, "KerasAdam vs numpy, 10 steps")


def test_torch_adam_differs_where_epsilon_matters():
    # Tiny gradients and a large epsilon: torch adds eps to the bias-corrected sqrt(v_hat).
    start = QUAD_TARGET + 1e-6
    ours = run_torch(lambda ps: KerasAdam(ps, lr=0.1, epsilon=1e-3), 5, start=start)
    expected = np_keras_adam(start, np_quad_grad, 5, lr=0.1, epsilon=1e-3)
    assert_rel_close(ours, expected, 1e-12, "KerasAdam vs numpy with epsilon 1e-3")
    stock = run_torch(lambda ps: torch.optim.Adam(ps, lr=0.1, eps=1e-3), 5, start=start)
    assert_differs(stock - start, ours - start, 1e-8, "torch.optim.Adam updates vs Keras Adam")


def test_keras_adam_skips_missing_grads_but_counts_the_step():
    a, b = torch.ones(3, requires_grad=True), torch.ones(2, requires_grad=True)
    opt = KerasAdam([a, b], lr=0.1)
    a.grad = torch.full((3,), 0.5)
    opt.step()
    assert opt.iterations == 1, f"expected iterations 1, got {opt.iterations}"
    assert b not in opt.state and torch.all(b == 1), "a parameter without .grad must be left untouched"
    a.grad = None
    b.grad = torch.full((2,), 0.5)
    opt.step()
    # b's first update runs at t = 2, so alpha = lr * sqrt(1 - b2^2) / (1 - b1^2).
    alpha = 0.1 * math.sqrt(1 - 0.999**2) / (1 - 0.9**2)
    m, v = 0.05, 0.00025
    assert_close(b.detach().numpy(), 1 - alpha * m / (math.sqrt(v) + 1e-7) * np.ones(2), 1e-6, "b at shared t=2")
    assert opt.iterations == 2, f"expected iterations 2, got {opt.iterations}"


def test_keras_adam_state_dict_round_trip():
    def make(ps):
        return KerasAdam(ps, lr=0.05)

    straight = run_torch(make, 6)
    p = torch.tensor(QUAD_START, requires_grad=True)
    opt = make([p])
    for _ in range(3):
        opt.zero_grad()
        torch_quad_loss(p).backward()
        opt.step()
    saved = opt.state_dict()
    assert saved["iterations"] == 3, f"expected iterations 3 in state_dict, got {saved.get('iterations')}"
    resumed = make([p])
    resumed.load_state_dict(saved)
    assert resumed.iterations == 3, f"expected iterations 3 after load, got {resumed.iterations}"
    for _ in range(3):
        resumed.zero_grad()
        torch_quad_loss(p).backward()
        resumed.step()
    assert_close(p.detach().numpy(), straight, 0.0, "6 steps vs 3 + save/load + 3")


@pytest.mark.tf
@pytest.mark.parametrize("epsilon", [1e-7, 1e-3])
def test_keras_adam_matches_keras_float64(tf, keras64, epsilon):
    keras = keras64
    want = run_keras(tf, keras, keras.optimizers.Adam(learning_rate=0.1, epsilon=epsilon), 10)
    got = run_torch(lambda ps: KerasAdam(ps, lr=0.1, epsilon=epsilon), 10)
    assert_rel_close(got, want, 1e-12, f"KerasAdam vs keras Adam, float64, epsilon {epsilon}")


@pytest.mark.tf
def test_keras_adam_matches_keras_float32(tf, keras):
    want = run_keras(tf, keras, keras.optimizers.Adam(learning_rate=0.1), 10, dtype="float32")
    got = run_torch(lambda ps: KerasAdam(ps, lr=0.1), 10, dtype=torch.float32)
    assert_close(got, want, 1e-6, "KerasAdam vs keras Adam, float32")


@pytest.mark.tf
def test_shared_counter_matches_one_keras_optimizer_on_two_models(keras64):
    keras = keras64
    starts = [QUAD_START[:3], QUAD_START[3:]]

    def grad_of(p, part):
        sl = slice(0, 3) if part == 0 else slice(3, 5)
        return 2.0 * QUAD_C[sl] * (p - QUAD_TARGET[sl])

    # Keras 3 builds an optimizer on the variables of its first apply_gradients and then rejects others.
    k_vars = [keras.Variable(s, dtype="float64") for s in starts]
    lonely = keras.optimizers.Adam(learning_rate=0.1)
    lonely.apply_gradients([(grad_of(k_vars[0].numpy(), 0), k_vars[0])])
    with pytest.raises(ValueError, match="Unknown variable"):
        lonely.apply_gradients([(grad_of(k_vars[1].numpy(), 1), k_vars[1])])

    k_vars = [keras.Variable(s, dtype="float64") for s in starts]
    k_opt = keras.optimizers.Adam(learning_rate=0.1)
    k_opt.build(k_vars)  # one optimizer for both "models": build it on all variables first
    params = [torch.tensor(s, requires_grad=True) for s in starts]
    t_opt = KerasAdam([{"params": [params[0]]}, {"params": [params[1]]}], lr=0.1)
    for _ in range(5):
        for part in (0, 1):
            k_opt.apply_gradients([(grad_of(k_vars[part].numpy(), part), k_vars[part])])
            t_opt.zero_grad()
            params[part].grad = torch.from_numpy(grad_of(params[part].detach().numpy(), part))
            t_opt.step()
    assert int(k_opt.iterations.numpy()) == t_opt.iterations == 10, "the counter must advance once per apply"
    for part in (0, 1):
        got, want = params[part].detach().numpy(), k_vars[part].numpy()
        assert_rel_close(got, want, 1e-12, f"shared-counter Adam, model {part}")

    # Separate optimizers (per-model counters) follow a different trajectory: the shared counter matters.
    separate = [torch.tensor(s, requires_grad=True) for s in starts]
    opts = [KerasAdam([p], lr=0.1) for p in separate]
    for _ in range(5):
        for part in (0, 1):
            separate[part].grad = torch.from_numpy(grad_of(separate[part].detach().numpy(), part))
            opts[part].step()
    assert_differs(separate[0].detach().numpy(), params[0].detach().numpy(), 1e-6, "per-model counters")


def np_keras_rmsprop(p, grad_fn, steps, lr, rho=0.9, epsilon=1e-7) -> np.ndarray:
    p, v = p.copy(), np.zeros_like(p)
    for _ in range(steps):
        g = grad_fn(p)
        v = rho * v + (1 - rho) * g * g
        p -= lr * g / np.sqrt(v + epsilon)
    return p


def test_keras_rmsprop_matches_numpy_and_torch_rmsprop_differs():
    got = run_torch(lambda ps: KerasRMSprop(ps, lr=0.01), 10)
    expected = np_keras_rmsprop(QUAD_START, np_quad_grad, 10, lr=0.01)
    assert_rel_close(got, expected, 1e-12, "KerasRMSprop vs numpy, 10 steps")
    # Same rho, epsilon outside the sqrt: the weakly curved coordinate (tiny gradient) moves differently.
    stock = run_torch(lambda ps: torch.optim.RMSprop(ps, lr=0.01, alpha=0.9, eps=1e-3), 10)
    ours = run_torch(lambda ps: KerasRMSprop(ps, lr=0.01, epsilon=1e-3), 10)
    assert_differs(stock, ours, 1e-6, "torch.optim.RMSprop vs Keras RMSprop")


@pytest.mark.tf
@pytest.mark.parametrize("epsilon", [1e-7, 1e-3])
def test_keras_rmsprop_matches_keras_float64(tf, keras64, epsilon):
    keras = keras64
    want = run_keras(tf, keras, keras.optimizers.RMSprop(learning_rate=0.01, epsilon=epsilon), 10)
    got = run_torch(lambda ps: KerasRMSprop(ps, lr=0.01, epsilon=epsilon), 10)
    assert_rel_close(got, want, 1e-12, f"KerasRMSprop vs keras RMSprop, float64, epsilon {epsilon}")


@pytest.mark.tf
def test_keras_rmsprop_matches_keras_float32(tf, keras):
    want = run_keras(tf, keras, keras.optimizers.RMSprop(learning_rate=0.01), 10, dtype="float32")
    got = run_torch(lambda ps: KerasRMSprop(ps, lr=0.01), 10, dtype=torch.float32)
    assert_close(got, want, 1e-6, "KerasRMSprop vs keras RMSprop, float32")


# ----------------------------------------------------------------------------------------------
# learning-rate schedule

SCHEDULE_STEPS = [0, 1, 2, 99, 100, 101, 250, 999, 1000, 12345]


@pytest.mark.parametrize("staircase", [True, False])
def test_exponential_decay_matches_formula(staircase):
    schedule = ExponentialDecay(0.01, 100, 0.96, staircase)
    # The schedule runs in float32, as Keras does; with the float32-rounded inputs the float64 formula
    # agrees to float32 precision (with exact 0.96, the rounding of 0.96 is amplified by the exponent).
    lr0, rate = float(np.float32(0.01)), float(np.float32(0.96))
    for step in SCHEDULE_STEPS:
        exponent = step // 100 if staircase else step / 100
        assert_rel_close(schedule(step), lr0 * rate**exponent, 1e-6, f"ExponentialDecay at step {step}")


def test_exponential_decay_lambda_with_lambda_lr():
    schedule = ExponentialDecay(0.01, 3, 0.5, staircase=True)
    p = torch.zeros(1, requires_grad=True)
    opt = KerasAdam([p], lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, exponential_decay_lambda(0.01, 3, 0.5, staircase=True))
    for step in range(10):
        lr = opt.param_groups[0]["lr"]
        # The lr seen by the step-th update (0-based) is schedule(step), Keras' value at iterations = step.
        assert np.float32(lr) == np.float32(schedule(step)), f"step {step}: expected lr {schedule(step)}, got {lr}"
        p.grad = torch.ones(1)
        opt.step()
        scheduler.step()


@pytest.mark.tf
@pytest.mark.parametrize("staircase", [True, False])
def test_exponential_decay_matches_keras(keras, staircase):
    keras_schedule = keras.optimizers.schedules.ExponentialDecay(0.01, 100, 0.96, staircase=staircase)
    ours = ExponentialDecay(0.01, 100, 0.96, staircase)
    for step in SCHEDULE_STEPS:
        want, got = np.float32(keras_schedule(step)), np.float32(ours(step))
        assert got == want, f"ExponentialDecay at step {step}: expected {want!r} (Keras, float32), got {got!r}"


@pytest.mark.tf
def test_scheduled_adam_matches_keras(tf, keras):
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, 2, 0.5, staircase=True)
    want = run_keras(tf, keras, keras.optimizers.Adam(learning_rate=schedule), 7, dtype="float32")

    p = torch.tensor(QUAD_START, dtype=torch.float32, requires_grad=True)
    opt = KerasAdam([p], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, exponential_decay_lambda(0.1, 2, 0.5, staircase=True))
    for _ in range(7):
        opt.zero_grad()
        torch_quad_loss(p).backward()
        opt.step()
        scheduler.step()  # once per optimizer step, so the scheduler's count is Keras' iterations
    assert_close(p.detach().numpy(), want, 1e-6, "Adam + ExponentialDecay vs Keras (schedule read before increment)")
