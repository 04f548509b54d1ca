"""Where a `cnn` training step's time goes, part by part, in TensorFlow and in PyTorch on this machine's CPU.

    .venv/bin/python scripts/layer_bench.py [--batch 100] [--iters 30] [--repeats 7] [--json PATH]
                                            [--threads N] [--tf-inter-op N] [--worker-stderr]

Each part of tutorial 001's `cnn` step is timed alone at the model's real shapes: each convolution's forward and
backward (the first one computes no input gradient, as in the model), the ReLU and the 2x2 max pooling on the
largest activation (B x 32 x 28 x 28), the two Dense layers, and the optimizer's update of all 619,786 parameters
(Keras's Adam in a `tf.function`; the port's `KerasAdam`), then the whole step as `parity bench` measures it. The
torch side runs as the port does: channels_last tensors, `keep_freed_memory()`, the port's Dense layer
(`torch_impl.layers.Linear`). Each framework runs in its own
process (the torch one never imports TensorFlow); the two take turns, one repeat each, and a cell is the median
over repeats of the mean time per call over `--iters` calls after 5 warm-up calls.

`--threads N`: both frameworks' intra-op threads (and TF's inter-op threads); `--tf-inter-op N`: TF's inter-op
threads alone (1: no two TF ops run at once); `--worker-stderr`: the workers' stderr passes through, e.g. with
`ONEDNN_VERBOSE=1` to see which oneDNN primitive each framework runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PARTS = ["conv1 1->32 @28", "relu @28 (32 ch)", "maxpool 28->14", "conv2 32->64 @14", "conv3 64->128 @7",
         "dense 2048->256", "dense 256->10", "optimizer update", "whole step"]


def _timer(fn, iters: int) -> float:
    for _ in range(5):
        fn()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters * 1e3


def torch_parts(batch: int, threads: int | None) -> dict:
    sys.path.insert(0, str(ROOT))
    import torch
    import torch.nn.functional as F

    if threads:
        torch.set_num_threads(threads)

    from torch_impl.cpu_tuning import keep_freed_memory
    from torch_impl.layers import Linear
    from torch_impl.models import build_model
    from torch_impl.optim import KerasAdam

    keep_freed_memory()
    torch.manual_seed(0)
    cl = torch.channels_last

    def conv_part(hw, cin, cout):
        conv = torch.nn.Conv2d(cin, cout, 3, padding=1).to(memory_format=cl)
        x = torch.randn(batch, cin, hw, hw).to(memory_format=cl).requires_grad_(cin > 1)
        g = torch.randn(batch, cout, hw, hw).to(memory_format=cl)
        sources = ([x] if cin > 1 else []) + list(conv.parameters())
        # autograd.grad returns fresh gradients as TF's tape does (`.backward` would add them into `.grad`)
        return lambda: torch.autograd.grad(conv(x), sources, g)

    def elementwise_part(fn, shape, out_shape):
        x = torch.randn(*shape).to(memory_format=cl).requires_grad_()
        g = torch.randn(*out_shape).to(memory_format=cl)
        return lambda: torch.autograd.grad(fn(x), x, g)

    def dense_part(fin, fout):
        dense = Linear(fin, fout)  # the port's Dense: gradients from oneDNN's inner product where it pays
        x, g = torch.randn(batch, fin, requires_grad=fout != 10), torch.randn(batch, fout)
        sources = ([x] if fout != 10 else []) + list(dense.parameters())
        return lambda: torch.autograd.grad(dense(x), sources, g)

    model = build_model("cnn", seed=0).to(memory_format=cl)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    update = KerasAdam(params, lr=1e-3, epsilon=1e-7)
    step_model = build_model("cnn", seed=0).to(memory_format=cl).train()
    step_opt = KerasAdam(step_model.parameters(), lr=1e-3, epsilon=1e-7)
    images = torch.rand(batch, 1, 28, 28).to(memory_format=cl)
    labels = torch.randint(0, 10, (batch,))

    def whole_step():
        loss = F.cross_entropy(step_model(images), labels)
        step_opt.zero_grad(set_to_none=True)
        loss.backward()
        step_opt.step()

    return {
        "conv1 1->32 @28": conv_part(28, 1, 32),
        "relu @28 (32 ch)": elementwise_part(torch.relu, (batch, 32, 28, 28), (batch, 32, 28, 28)),
        "maxpool 28->14": elementwise_part(lambda x: F.max_pool2d(x, 2), (batch, 32, 28, 28), (batch, 32, 14, 14)),
        "conv2 32->64 @14": conv_part(14, 32, 64),
        "conv3 64->128 @7": conv_part(7, 64, 128),
        "dense 2048->256": dense_part(2048, 256),
        "dense 256->10": dense_part(256, 10),
        "optimizer update": update.step,
        "whole step": whole_step,
    }


def tf_parts(batch: int, threads: int | None, inter_op: int | None) -> dict:
    sys.path.insert(0, str(ROOT))
    import tensorflow as tf

    import tf_ref  # noqa: F401  (quiets TensorFlow's start-up logging)

    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
    if threads or inter_op:
        tf.config.threading.set_inter_op_parallelism_threads(inter_op or threads)
    from tf_ref.models import build_model

    tf.random.set_seed(0)

    def layer_part(layer, in_shape, out_shape, input_grad=True):
        x, g = tf.random.normal((batch, *in_shape)), tf.random.normal((batch, *out_shape))
        layer(x)  # builds the variables

        @tf.function
        def run():
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x)
            sources = ([x] if input_grad else []) + layer.trainable_variables
            # y is returned too: a linear layer's gradients do not need its output, and Grappler would otherwise
            # prune the forward pass from the graph (torch's autograd.grad always runs it)
            return y, tape.gradient(y, sources, output_gradients=g)

        return run

    def op_part(fn, in_shape, out_shape):
        x, g = tf.random.normal((batch, *in_shape)), tf.random.normal((batch, *out_shape))

        @tf.function
        def run():
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = fn(x)
            return y, tape.gradient(y, x, output_gradients=g)

        return run

    import keras

    model = build_model("cnn", seed=0)
    optimizer = keras.optimizers.Adam(learning_rate=1e-3, epsilon=1e-7)
    optimizer.build(model.trainable_variables)
    grads = [tf.random.normal(v.shape) * 1e-3 for v in model.trainable_variables]

    @tf.function
    def update():
        optimizer.apply_gradients(zip(grads, model.trainable_variables))

    step_model = build_model("cnn", seed=0)
    step_opt = keras.optimizers.Adam(learning_rate=1e-3, epsilon=1e-7)
    images = tf.random.uniform((batch, 28, 28, 1))
    labels = tf.random.uniform((batch,), maxval=10, dtype=tf.int64)

    @tf.function
    def whole_step():  # tutorial 001's step, as tf_ref/train.py runs it (without its second pass)
        with tf.GradientTape() as tape:
            logits = step_model(images, training=True)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits))
        step_opt.apply_gradients(zip(tape.gradient(loss, step_model.trainable_variables),
                                     step_model.trainable_variables))

    conv = keras.layers.Conv2D
    return {
        "conv1 1->32 @28": layer_part(conv(32, 3, padding="same"), (28, 28, 1), (28, 28, 32), input_grad=False),
        "relu @28 (32 ch)": op_part(tf.nn.relu, (28, 28, 32), (28, 28, 32)),
        "maxpool 28->14": op_part(lambda x: tf.nn.max_pool2d(x, 2, 2, "SAME"), (28, 28, 32), (14, 14, 32)),
        "conv2 32->64 @14": layer_part(conv(64, 3, padding="same"), (14, 14, 32), (14, 14, 64)),
        "conv3 64->128 @7": layer_part(conv(128, 3, padding="same"), (7, 7, 64), (7, 7, 128)),
        "dense 2048->256": layer_part(keras.layers.Dense(256), (2048,), (256,)),
        "dense 256->10": layer_part(keras.layers.Dense(10), (256,), (10,), input_grad=False),
        "optimizer update": update,
        "whole step": whole_step,
    }


def worker(framework: str, args) -> None:
    """Reads a part name per line, answers the mean ms per call of `iters` calls."""
    import os

    # answers go to the parent through the original stdout; anything the libraries print there (oneDNN's verbose
    # lines) goes to stderr instead
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    if framework == "torch":
        parts = torch_parts(args.batch, args.threads)
    else:
        parts = tf_parts(args.batch, args.threads, args.tf_inter_op)
    iters = args.iters
    print("ready", file=answers, flush=True)
    for line in sys.stdin:
        name = line.strip()
        print(json.dumps(_timer(parts[name], iters)), file=answers, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", help="also write the numbers here")
    parser.add_argument("--threads", type=int, help="intra-op threads of both frameworks (default: theirs)")
    parser.add_argument("--tf-inter-op", type=int, help="TF's inter-op threads (default: TF's)")
    parser.add_argument("--worker-stderr", action="store_true", help="let the workers' stderr through")
    parser.add_argument("--worker", choices=["torch", "tf"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args)
        return 0
    procs = {}
    options = ["--batch", str(args.batch), "--iters", str(args.iters)]
    for flag, value in (("--threads", args.threads), ("--tf-inter-op", args.tf_inter_op)):
        if value:
            options += [flag, str(value)]
    for fw in ("tf", "torch"):
        procs[fw] = subprocess.Popen(
            [sys.executable, __file__, "--worker", fw, *options], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=None if args.worker_stderr else subprocess.DEVNULL, text=True)
        if procs[fw].stdout.readline().strip() != "ready":
            raise SystemExit(f"the {fw} worker failed to start")
    times = {fw: {part: [] for part in PARTS} for fw in procs}
    for _ in range(args.repeats):
        for part in PARTS:
            for fw, proc in procs.items():
                proc.stdin.write(part + "\n")
                proc.stdin.flush()
                times[fw][part].append(json.loads(proc.stdout.readline()))
    for proc in procs.values():
        proc.stdin.close()
        proc.wait()
    import os

    threads = args.threads or os.cpu_count()
    print(f"cnn step parts at batch {args.batch} on {platform.processor() or platform.machine()}, {threads} threads"
          f"{f', TF inter-op {args.tf_inter_op}' if args.tf_inter_op else ''}; ms per call, median of "
          f"{args.repeats} repeats of {args.iters} calls")
    print(f"{'part':<20} {'TF ms':>8} {'torch ms':>9} {'torch / TF':>11}")
    rows = []
    for part in PARTS:
        tf_ms, torch_ms = (statistics.median(times[fw][part]) for fw in ("tf", "torch"))
        rows.append({"part": part, "tf_ms": tf_ms, "torch_ms": torch_ms,
                     "tf_runs": times["tf"][part], "torch_runs": times["torch"][part]})
        print(f"{part:<20} {tf_ms:8.2f} {torch_ms:9.2f} {torch_ms / tf_ms:10.2f}x")
    parts_only = rows[:-1]
    tf_sum, torch_sum = (sum(r[key] for r in parts_only) for key in ("tf_ms", "torch_ms"))
    print(f"{'sum of the parts':<20} {tf_sum:8.2f} {torch_sum:9.2f} {torch_sum / tf_sum:10.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"batch": args.batch, "iters": args.iters, "repeats": args.repeats,
                                               "threads": threads, "tf_inter_op": args.tf_inter_op,
                                               "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
