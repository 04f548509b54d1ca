"""Arithmetic work per image and the machine's matrix-multiply rate, for `parity bench`'s "fraction of the
hardware" columns.

FLOPs are counted by PyTorch's own `torch.utils.flop_counter.FlopCounterMode` (convolutions and matrix multiplies:
2 FLOPs per multiply-add; elementwise ops, pooling and the optimizer are left out, as usual for this figure) on a
training step: forward, cross-entropy and backward. The backward pass costs about twice the forward, except that
the first layer's input gradient is never computed, so a step is a little under 3x the forward.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from parity.catalog import get_spec


def _count(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def flops_per_image(model_name: str, train: bool = True, members: int | None = None) -> float:
    """FLOPs of one image through `model_name` (an ensemble: every member), forward only or a training step."""
    from torch_impl.models import build_member, model_logits

    spec = get_spec(model_name)
    members = members or spec.members
    member = build_member(model_name, seed=0)
    batch = 2
    x = torch.rand(batch, spec.input_shape[2], *spec.input_shape[:2])
    if not train:
        with torch.no_grad():
            return members * _count(lambda: model_logits(member, x)) / batch
    y = torch.zeros(batch, dtype=torch.long)
    return members * _count(lambda: F.cross_entropy(model_logits(member, x), y).backward()) / batch


def matmul_gflops(device: str = "cpu", dtype: torch.dtype = torch.float32, size: int | None = None,
                  repeats: int = 10) -> float:
    """The measured rate of a square matrix multiply (GFLOP/s), the best of `repeats` after a warm-up: the
    practical peak that a convolutional network's step is compared against."""
    size = size or (2048 if device == "cpu" else 8192)  # CPU: smaller or fewer multiplies measure oneDNN's ramp-up
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(2):
        a @ b
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    del a, b
    if device.startswith("cuda"):
        torch.cuda.empty_cache()  # the bench's parent process measures this: leave the device to its workers
    return 2 * size**3 / best / 1e9
