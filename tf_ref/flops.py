"""The machine's matrix-multiply rate as TensorFlow reaches it, for `parity bench`'s "fraction of the hardware"
column (`torch_impl/flops.py` measures the same with torch).

The two frameworks do not reach the same rate on every CPU: TensorFlow multiplies float32 matrices with oneDNN's
GEMM, PyTorch with the BLAS it was built with (MKL in the standard x86 wheels), and MKL may pick slower kernels on
CPUs it was not tuned for. `parity bench` divides by the best rate either framework measures.
"""

from __future__ import annotations

import time

import tf_ref  # noqa: F401  (quiets TensorFlow's start-up logging)
import tensorflow as tf


def matmul_gflops(dtype: str = "float32", size: int = 2048, repeats: int = 10) -> float:
    """The measured rate of a square matrix multiply (GFLOP/s), the best of `repeats` after a warm-up."""
    a = tf.random.normal((size, size), dtype=dtype)
    b = tf.random.normal((size, size), dtype=dtype)
    matmul = tf.function(tf.matmul)
    for _ in range(2):
        matmul(a, b).numpy()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        matmul(a, b).numpy()  # .numpy() waits for the result
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best / 1e9


def main(argv: list[str] | None = None) -> int:
    """`python -m tf_ref.flops [--threads N]`: both dtypes' rates as one JSON line (how `parity bench` asks)."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description="TensorFlow's float32 and bfloat16 matrix-multiply rates, GFLOP/s")
    parser.add_argument("--threads", type=int, help="intra- and inter-op threads (default: TensorFlow's)")
    args = parser.parse_args(argv)
    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    tf.config.set_visible_devices([], "GPU")  # the CPU's rate (the bench measures TensorFlow on CPU only)
    print(json.dumps({dtype: matmul_gflops(dtype) for dtype in ("float32", "bfloat16")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
