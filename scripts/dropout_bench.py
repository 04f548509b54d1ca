"""Time one dropout layer (forward + backward) and the random draw under it, in both frameworks, on the CPU.

    .venv/bin/python scripts/dropout_bench.py [--shapes 100x64x12x12,128x32x14x14] [--rate 0.25] [--threads 2]
                                              [--iterations 100] [--repeats 5] [--no-tf] [--json PATH]

Rows per shape: torch's `nn.Dropout` (a Bernoulli draw), the port's `torch_impl.layers.Dropout` (keep where a uniform
draw is >= the rate, TensorFlow's rule), Keras's `Dropout` in a `tf.function`, each computing `sum(dropout(x) * g)`
and its gradient; then the draws alone: torch's `bernoulli_` and `rand_like`. Median over repeats of the mean
over `iterations` calls.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402  (before TensorFlow: both bundle oneDNN / OpenMP)
from torch import nn  # noqa: E402

from torch_impl.layers import Dropout  # noqa: E402


def _time(fn, iterations: int, repeats: int) -> float:
    """Median over `repeats` of the mean milliseconds per call over `iterations` calls, after a warm-up."""
    for _ in range(max(3, iterations // 10)):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iterations):
            fn()
        times.append((time.perf_counter() - start) / iterations * 1e3)
    return statistics.median(times)


def torch_rows(shape: tuple[int, ...], rate: float, iterations: int, repeats: int) -> dict[str, float]:
    x = torch.randn(shape, requires_grad=True)
    g = torch.randn(shape)
    rows = {}
    for name, layer in (("torch nn.Dropout (bernoulli)", nn.Dropout(rate)),
                        ("torch port Dropout (uniform >= rate)", Dropout(rate))):
        layer.train()
        rows[name] = _time(lambda layer=layer: (layer(x) * g).sum().backward(), iterations, repeats)
    rows["torch bernoulli_ alone"] = _time(lambda: torch.empty(shape).bernoulli_(1 - rate), iterations, repeats)
    rows["torch rand_like alone"] = _time(lambda: torch.rand_like(g), iterations, repeats)
    return rows


def tf_rows(shape: tuple[int, ...], rate: float, iterations: int, repeats: int) -> dict[str, float]:
    import keras
    import tensorflow as tf

    layer = keras.layers.Dropout(rate)
    x = tf.random.normal(shape)
    g = tf.random.normal(shape)

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(y * g)
        return loss, tape.gradient(loss, x)  # the loss too, so that the forward pass is not pruned

    return {"tf keras Dropout": _time(lambda: step(x)[0].numpy(), iterations, repeats)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="100x64x12x12,128x32x14x14",
                        help="comma-separated NCHW shapes (100x64x12x12: the largest dropout input of `convpool`'s "
                             "kind; 128x32x14x14: `datacamp_dropout`'s first)")
    parser.add_argument("--rate", type=float, default=0.25)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-tf", action="store_true", help="torch rows only")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    shapes = [tuple(int(n) for n in text.split("x")) for text in args.shapes.split(",") if text]
    torch.set_num_threads(args.threads)
    if not args.no_tf:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    results = []
    print(f"dropout rate {args.rate}, {args.threads} threads, {args.iterations} calls x {args.repeats} repeats (median)")
    for shape in shapes:
        rows = torch_rows(shape, args.rate, args.iterations, args.repeats)
        if not args.no_tf:
            rows.update(tf_rows(shape, args.rate, args.iterations, args.repeats))
        print(f"\nshape {'x'.join(map(str, shape))} ({torch.Size(shape).numel():,} elements)")
        for name, ms in rows.items():
            print(f"  {name:40s} {ms:8.3f} ms")
            results.append({"shape": list(shape), "row": name, "ms": ms})
    if args.json:
        Path(args.json).write_text(json.dumps({"rate": args.rate, "threads": args.threads, "torch": torch.__version__,
                                               "rows": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
