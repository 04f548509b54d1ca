"""PyTorch layers with TensorFlow/Keras numerics, for NCHW tensors.

Every block here exists because the PyTorch default differs from the TF/Keras
behaviour the tutorials rely on; each class says what differs and why.
"""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Padding = Literal["same", "valid"]


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _check_padding(padding: str) -> Padding:
    if padding not in ("same", "valid"):
        raise ValueError(f"padding must be 'same' or 'valid', got {padding!r}")
    return padding  # type: ignore[return-value]


def tf_same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """Return ``(pad_before, pad_after)`` that TF's ``padding='SAME'`` applies along one spatial axis.

    The output size is ``ceil(size / stride)``; when the total padding is odd, the extra
    pixel goes after (bottom/right), which PyTorch's symmetric ``padding=`` cannot express.
    """
    out = math.ceil(size / stride)
    effective_kernel = (kernel - 1) * dilation + 1
    total = max((out - 1) * stride + effective_kernel - size, 0)
    before = total // 2
    return before, total - before


def _same_pads_2d(height: int, width: int, kernel: tuple[int, int], stride: tuple[int, int]) -> tuple[int, ...]:
    """TF 'SAME' padding for an NCHW tensor, in ``F.pad`` order (left, right, top, bottom)."""
    top, bottom = tf_same_padding(height, kernel[0], stride[0])
    left, right = tf_same_padding(width, kernel[1], stride[1])
    return left, right, top, bottom


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` with TF ``padding='same'|'valid'``; the weight stays a plain OIHW parameter.

    Why: TF 'same' with stride > 1 or an even kernel pads asymmetrically (extra pixel
    bottom/right) and depends on the input size; PyTorch only pads symmetrically.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: Padding = "valid",
        bias: bool = True,
    ) -> None:
        kernel, strides = _pair(kernel_size), _pair(stride)
        self.tf_padding = _check_padding(padding)
        # Fast path: stride 1 with odd kernels gives the same symmetric padding for every input size.
        self._symmetric = self.tf_padding == "same" and strides == (1, 1) and all(k % 2 == 1 for k in kernel)
        native = tuple((k - 1) // 2 for k in kernel) if self._symmetric else 0
        super().__init__(in_channels, out_channels, kernel, stride=strides, padding=native, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tf_padding == "same" and not self._symmetric:
            # Asymmetric TF padding, computed from the actual input size, applied before a padding-0 conv.
            x = F.pad(x, _same_pads_2d(x.shape[-2], x.shape[-1], self.kernel_size, self.stride))
        return self._conv_forward(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", tf_padding={self.tf_padding!r}"


class _Pool2d(nn.Module):
    """Shared arguments of the TF-padding pools."""

    def __init__(
        self,
        kernel_size: int | tuple[int, int] = 2,
        stride: int | tuple[int, int] | None = None,
        padding: Padding = "valid",
    ) -> None:
        super().__init__()
        self.kernel_size = _pair(kernel_size)
        # Keras defaults strides to the pool size, as PyTorch does.
        self.stride = self.kernel_size if stride is None else _pair(stride)
        self.padding = _check_padding(padding)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding!r}"


class MaxPool2d(_Pool2d):
    """Max pooling with TF ``padding='same'|'valid'`` (e.g. 7 -> 4 with a 2x2/2 window under 'same').

    Why: TF 'same' pads asymmetrically and padded cells never win the max; padding with
    ``-inf`` reproduces that for any input sign (zero padding would win on negative inputs).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == "same":
            pads = _same_pads_2d(x.shape[-2], x.shape[-1], self.kernel_size, self.stride)
            if any(pads):  # (28 -> 14 needs none)
                native = _native_max_pool_padding(x.shape[-2:], self.kernel_size, self.stride, pads)
                if native is not None:  # the same windows without a padded copy of the input (and of its grad)
                    padding, ceil_mode = native
                    return F.max_pool2d(x, self.kernel_size, self.stride, padding, ceil_mode=ceil_mode)
                # -inf padding so that only real pixels can be the maximum, as in TF.
                x = F.pad(x, pads, value=-math.inf)
        return F.max_pool2d(x, self.kernel_size, self.stride)


def _native_max_pool_padding(
    size: Sequence[int], kernel: tuple[int, int], stride: tuple[int, int], pads: tuple[int, ...]
) -> tuple[tuple[int, int], bool] | None:
    """`F.max_pool2d`'s own (padding, ceil_mode) that gives TF's 'same' windows, or None where none does.

    `F.max_pool2d` pads implicitly with -inf, symmetrically, at most half a kernel, and in ceil mode lets the last
    window run past the bottom/right edge; TF's window i starts at i * stride - pad_before in both, so the two agree
    where the padding before is torch's and the number of windows is TF's (e.g. 7 -> 4 with a 2x2/2 window:
    padding 0, ceil mode; a 3x3/1 window: padding 1).
    """
    left, _, top, _ = pads
    before = (top, left)
    if any(p > k // 2 for p, k in zip(before, kernel)):
        return None
    wanted = [-(-length // s) for length, s in zip(size, stride)]  # TF 'same': ceil(size / stride) windows
    for ceil_mode in (False, True):
        got = []
        for length, k, s, p in zip(size, kernel, stride, before):
            span = length + 2 * p - k
            out = (-(-span // s) if ceil_mode else span // s) + 1
            if ceil_mode and (out - 1) * s >= length + p:  # torch drops a last window that starts in the padding
                out -= 1
            got.append(out)
        if got == wanted:
            return before, ceil_mode
    return None


class AvgPool2d(_Pool2d):
    """Average pooling with TF ``padding='same'|'valid'``.

    Why: TF 'same' average pooling divides each window by the number of real pixels it
    covers, including on the asymmetric bottom/right pad; ``nn.AvgPool2d`` pads symmetrically.
    """

    def __init__(
        self,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] | None = None,
        padding: Padding = "valid",
    ) -> None:
        super().__init__(kernel_size, stride, padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == "valid":
            return F.avg_pool2d(x, self.kernel_size, self.stride)
        pads = _same_pads_2d(x.shape[-2], x.shape[-1], self.kernel_size, self.stride)
        # Window sums over zero padding, divided by how many real pixels each window saw.
        sums = F.avg_pool2d(F.pad(x, pads), self.kernel_size, self.stride, divisor_override=1)
        ones = torch.ones((1, 1, x.shape[-2], x.shape[-1]), dtype=x.dtype, device=x.device)
        counts = F.avg_pool2d(F.pad(ones, pads), self.kernel_size, self.stride, divisor_override=1)
        return sums / counts


class LocalResponseNorm(nn.Module):
    """``tf.nn.local_response_normalization`` on NCHW input (the channel window runs along dim 1).

    ``out = x / (bias + alpha * sum_{c' in [c - r, c + r]} x_{c'}^2) ** beta``.
    Why not ``nn.LocalResponseNorm``: it takes a window *size* (2r + 1) rather than a radius
    and divides ``alpha`` by that size (it averages the squares), so TF's parameters map to
    ``nn.LocalResponseNorm(size=2r + 1, alpha=alpha * (2r + 1), beta=beta, k=bias)``.
    """

    def __init__(self, depth_radius: int = 5, bias: float = 1.0, alpha: float = 1.0, beta: float = 0.5) -> None:
        super().__init__()
        self.depth_radius = depth_radius
        self.bias = bias
        self.alpha = alpha
        self.beta = beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r, channels = self.depth_radius, x.shape[1]
        # Zero-pad the channel axis (F.pad order: W, W, H, H, C, C) so edge windows are simply truncated.
        squares = F.pad(x.square(), (0, 0, 0, 0, r, r))
        # Plain sum over the window, as TF does, rather than nn.LocalResponseNorm's mean.
        sqr_sum = sum(squares[:, i : i + channels] for i in range(2 * r + 1))
        return x / (self.bias + self.alpha * sqr_sum) ** self.beta

    def extra_repr(self) -> str:
        return f"depth_radius={self.depth_radius}, bias={self.bias}, alpha={self.alpha}, beta={self.beta}"


class Dropout(nn.Dropout):
    """``keras.layers.Dropout(rate)``: inverted dropout, drawn on a CPU as TensorFlow draws it.

    Same layer as ``nn.Dropout(p=rate)`` (drop a fraction ``rate``, scale what is kept by ``1 / (1 - rate)``, pass
    through in eval mode), and the same distribution of masks. TensorFlow keeps an element where a uniform draw in
    [0, 1) is ``>= rate``; on a CPU this layer does the same. Why not ``nn.Dropout`` there: its Bernoulli sampler
    takes about 3x as long as the uniform one (both single-threaded), which made dropout 1.7-1.9x slower per layer and
    cost ``datacamp_dropout`` a fifth of its training step (BENCHMARKS.md). Elsewhere (a GPU) ``nn.Dropout``'s fused
    kernel is the fast one and is used. The masks differ from ``nn.Dropout``'s under the same seed.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p in (0, 1) or x.device.type != "cpu":  # rate 1: nn.Dropout's zeros
            return super().forward(x)
        # the draw in at least float32 (a bfloat16 uniform has 8 bits: its keep rate would be off by up to 1/256)
        keep = torch.rand_like(x, dtype=torch.promote_types(x.dtype, torch.float32)).ge_(self.p)  # 1.0 or 0.0
        mask = keep.mul_(1 / (1 - self.p)).to(x.dtype)
        return x.mul_(mask) if self.inplace else x * mask


def _onednn_inner_product_op():
    """`torch.ops.mkldnn._linear_pointwise` where this torch build has it on an x86-64 CPU (None elsewhere, or with
    PARITY_ONEDNN_LINEAR=0)."""
    if os.environ.get("PARITY_ONEDNN_LINEAR", "1") == "0" or platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        return None


_INNER_PRODUCT = _onednn_inner_product_op()
ONEDNN_MIN_MACS = 1 << 22  # batch * in * out below which MKL's GEMM (F.linear) is the faster one on this CPU


def _inner_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.T`` by oneDNN's inner product (a: (m, k), b: (n, k); either may be a transposed view)."""
    return _INNER_PRODUCT(a, b, None, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    """``F.linear`` for 2-D float32 CPU tensors, its two gradient products on oneDNN's inner product."""

    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, bias = inputs
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = _inner_product(grad, weight.t()) if ctx.needs_input_grad[0] else None  # (B, out) @ (out, in)
        grad_w = _inner_product(grad.t(), x.t()) if ctx.needs_input_grad[1] else None  # (out, B) @ (B, in)
        grad_b = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


class Linear(nn.Linear):
    """``keras.layers.Dense`` without its activation: ``nn.Linear``, whose large float32 gradient products on an
    x86-64 CPU run on oneDNN's inner product, as TensorFlow's Dense runs its products there.

    Same parameters, initialization hooks, state dict and forward (bit for bit) as ``nn.Linear``; the input and
    weight gradients equal ``nn.Linear``'s to float32 rounding (the sums run in another order). Why: on a CPU torch
    multiplies float32 matrices with MKL, TensorFlow with oneDNN, and on the project's AMD CPU MKL's GEMM reaches
    under half oneDNN's rate: `cnn`'s Dense 2048->256, forward and both gradients, took 1.8-2x TensorFlow's time
    (BENCHMARKS.md). The two gradient products, two thirds of the layer's training work, go through
    ``torch.ops.mkldnn._linear_pointwise``, the op torch's own inductor CPU backend emits for a linear layer. The
    forward product stays ``F.linear``'s: oneDNN's inner product rounds it with about twice MKL's error (rms against
    a float64 product of 2,048 terms), and the forward is what inference, exported models and the forward parity
    level see. ``F.linear`` keeps everything for products under ``ONEDNN_MIN_MACS`` multiply-adds per batch (oneDNN's
    fixed cost per call is larger than MKL's), other dtypes and devices, autocast, ``torch.compile`` /
    ``torch.export`` tracing, and builds without the op. ``PARITY_ONEDNN_LINEAR=0`` switches it off.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._use_onednn(x):
            return _OneDNNLinear.apply(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)

    def _use_onednn(self, x: torch.Tensor) -> bool:
        # tracing first: under torch.export a size test would put a guard on the (symbolic) batch dimension
        return (
            _INNER_PRODUCT is not None
            and torch.is_grad_enabled()  # only the gradients differ from F.linear
            and not torch.compiler.is_compiling()
            and not torch.jit.is_tracing()
            and x.device.type == "cpu"
            and x.dtype == self.weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu")
            and x.dim() == 2
            and x.is_contiguous()
            and x.shape[0] * self.in_features * self.out_features >= ONEDNN_MIN_MACS
        )


class _KerasBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Shared forward for the Keras-semantics batch norms (see ``BatchNorm2d``)."""

    def __init__(
        self,
        num_features: int,
        keras_momentum: float = 0.99,
        epsilon: float = 1e-3,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        # Keras' momentum weighs the old moving value, PyTorch's weighs the new batch statistic.
        super().__init__(num_features, eps=epsilon, momentum=1.0 - keras_momentum, device=device, dtype=dtype)

    def _local_statistics(self) -> bool:
        """Whether the batch statistics are this process's own, which torch's fused kernel then computes
        (`torch_impl.distributed`'s synchronized layers: False while they reduce over several processes)."""
        return True

    def _moments(self, x: torch.Tensor, dims: list[int], shape: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch mean and biased (divide by N) variance, as tf.nn.moments; the mean is detached there too.
        (`torch_impl.distributed` overrides this to reduce over all processes.)"""
        mean = x.mean(dims)
        return mean, (x - mean.detach().view(shape)).square().mean(dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        shape = [1, self.num_features] + [1] * (x.dim() - 2)
        # Under autocast a convolution hands over bfloat16 / float16: the statistics are computed in float32 and the
        # output cast back, as Keras's BatchNormalization does under a mixed-precision policy (in 16 bits the batch
        # variance keeps 3 significant digits, and SyncBatchNorm's counts would round: 39,200 -> 39,168).
        in_dtype = x.dtype
        if in_dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        count = x.numel() // max(x.shape[1], 1)  # values per channel
        if self.training and count > 1 and self._local_statistics():
            return self._fused_training_forward(x, count).to(in_dtype)
        if self.training:
            mean, var = self._moments(x, [0, *range(2, x.dim())], shape)
            self._update_moving(mean, var)
        else:
            mean, var = self.running_mean, self.running_var
        # Same operation order as tf.nn.batch_normalization: x * inv + (beta - mean * inv).
        inv = torch.rsqrt(var + self.eps) * self.weight
        return (x * inv.view(shape) + (self.bias - mean * inv).view(shape)).to(in_dtype)

    def _fused_training_forward(self, x: torch.Tensor, count: int) -> torch.Tensor:
        """Training mode through torch's fused kernel (`F.batch_norm`: the same normalization by the batch mean and
        biased variance, in two passes forward and one backward instead of a dozen elementwise ones; 6-8x faster
        on the largest activation of `bn_cnn` on CPU, BENCHMARKS.md), then Keras's moving-average update.

        `F.batch_norm` hands out the batch statistics only through its running buffers, which it updates with the
        unbiased variance: it writes them into zeroed scratch buffers at momentum 1, and the biased variance is
        that times (n - 1) / n. Its output rounds differently from `x * inv + (beta - mean * inv)` (float32: within
        about 1e-7 of each other; test_torch_semantics::test_batchnorm2d_matches_keras holds both paths to Keras)."""
        # x is float32 or float64 here; a module held in 16 bits (bf16-true) joins it in x's dtype, as the formula does
        weight, bias = self.weight, self.bias
        if weight is not None and weight.dtype != x.dtype:
            weight, bias = weight.to(x.dtype), bias.to(x.dtype)
        batch_mean = torch.zeros(self.num_features, dtype=x.dtype, device=x.device)
        batch_var = torch.zeros(self.num_features, dtype=x.dtype, device=x.device)
        out = F.batch_norm(x, batch_mean, batch_var, weight, bias, True, 1.0, self.eps)
        self._update_moving(batch_mean, batch_var * ((count - 1) / count))
        return out

    @torch.no_grad()
    def _update_moving(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        """Keras's moving averages from the batch mean and biased variance (PyTorch would use the unbiased one)."""
        keep = 1.0 - self.momentum
        self.running_mean.copy_(self.running_mean * keep + mean * (1.0 - keep))
        self.running_var.copy_(self.running_var * keep + var * (1.0 - keep))
        self.num_batches_tracked.add_(1)


class BatchNorm2d(_KerasBatchNorm):
    """``keras.layers.BatchNormalization`` on NCHW feature maps, with standard PyTorch buffers.

    Why: Keras defaults are momentum 0.99 (= PyTorch momentum 0.01) and epsilon 1e-3, and
    Keras updates ``moving_variance`` with the biased batch variance (PyTorch: unbiased).
    Both normalize training batches with the biased variance.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"expected 4D input (N, C, H, W), got {x.dim()}D")


class BatchNorm1d(_KerasBatchNorm):
    """``keras.layers.BatchNormalization`` on ``(N, C)`` or ``(N, C, L)`` input; see ``BatchNorm2d``."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() not in (2, 3):
            raise ValueError(f"expected 2D or 3D input, got {x.dim()}D")


def nhwc_flatten_permutation(c: int, h: int, w: int) -> torch.Tensor:
    """Map NCHW-flatten positions to NHWC-flatten positions.

    ``perm[i]`` is the index, in Keras' NHWC ``Flatten`` order, of the element found at
    index ``i`` of PyTorch's NCHW ``nn.Flatten`` order, so that
    ``x_nchw.flatten(1) == x_nhwc.flatten(1)[:, perm]``.  Why: the first Dense after a
    Flatten sees features in a different order; a Keras kernel ``K`` of shape
    ``(h*w*c, out)`` becomes ``nn.Linear.weight = K.T[:, perm]``.  The inverse map is
    ``torch.argsort(perm)``.
    """
    return torch.arange(h * w * c).reshape(h, w, c).permute(2, 0, 1).reshape(-1)
