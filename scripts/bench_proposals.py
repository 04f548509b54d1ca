"""Speed of changes proposed for files `parity bench` only measures (models, ClassifierModule, train.py), each
applied on top of the current code in its own worker process, timed repeats alternating between the processes.

    .venv/bin/python scripts/bench_proposals.py [--model cnn] [--batch 100] [--steps 20] [--repeats 5]
                                                [--warmup 5] [--threads N] [--configs current,all,...] [--json PATH]

A configuration is a base (`eager`: plain modules and optimizer in a loop; `bare` / `fit`: the ClassifierModule in a
hand-written loop / in Trainer.fit, as `parity bench` runs them) plus patches:

- `malloc`: glibc keeps freed memory instead of unmapping it (mallopt M_MMAP_THRESHOLD / M_TRIM_THRESHOLD): every
  step's large activations otherwise come back as fresh pages, thousands of page faults per step.
- `channels_last`: the model's 4-D parameters (and hence its activations) in NHWC memory format: oneDNN's NCHW
  convolutions reorder on every call, and its NCHW weight gradient for a 1-channel input is slow.
- `relu_before_pool`: `maxpool(relu(conv(x)))`, Keras's order, instead of the port's `relu(maxpool(conv(x)))`
  (identical values and gradients: the max commutes with the monotone ReLU and is taken at the same position; the
  port's order runs the ReLU and its backward on a quarter of the elements), in `cnn`, `bn_cnn`, `datacamp*` and the
  vectorized ensemble.
- `padded_max_pool`: `torch_impl.layers.MaxPool2d(padding="same")` copies its input into a -inf padded tensor for
  every pool that pads (7 -> 4 in `cnn`, `bn_cnn`, `datacamp*`; the 3x3/1 pool of `inception_e`), as it did before it
  used `F.max_pool2d`'s own padding and ceil mode for the same windows.
- `batchnorm_formula`: the Keras BatchNorm layers in training mode computed with Keras's elementwise formula
  (`tf.nn.moments`, then `x * inv + (beta - mean * inv)`: about a dozen passes forward and backward) instead of
  torch's fused `F.batch_norm`, as they were before (`bn_cnn`, its ensembles).
- `mkl_linear`: the models' Dense layers (`torch_impl.layers.Linear`) take their gradients from `F.linear`'s
  backward (MKL's GEMM on an x86 CPU) instead of oneDNN's inner product, as they did before.
- `relu_inplace`: Keras's order (as `relu_before_pool`) with `cnn`'s ReLUs in place (`torch.relu_`), writing into
  the convolution's output while it is still in cache instead of a fresh 10 MB tensor (same values and gradients:
  the convolution's backward does not need its output).
- `foreach_adam`: KerasAdam's update with `torch._foreach_*` ops in the same operation order (bit-identical).
- `dropout_bernoulli`: the models' dropout drawn by `nn.Dropout` (a Bernoulli draw) instead of the port's
  `torch_impl.layers.Dropout`, which keeps where a uniform draw is >= the rate, as TensorFlow does: same distribution
  of masks, but torch's CPU `bernoulli_` takes about 3x as long as `rand_like`, both single-threaded (BENCHMARKS.md).
- Lightning (`fit` only): `no_bar` (no progress bar), `no_logger`, `no_step_log` (no per-step `self.log`),
  `manual` (a single model trained through the module's manual-optimization path: `manual_backward`, then the
  optimizer's and scheduler's `step()` in `training_step`, instead of Lightning's automatic-optimization closure),
  `barebones` (`Trainer(barebones=True)`: Lightning's loop alone, without loggers, progress bar, callbacks and
  `self.log`; the module's own metrics still update).

Reported: wall ms/step, CPU ms/step (all threads; steadier than wall time on a shared machine), and the speed-up over
`current` as the median of per-repeat ratios (paired in time).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from parity import bench  # noqa: E402

CONFIGS = {
    "current": ("eager", ()),
    "malloc": ("eager", ("malloc",)),
    "channels_last": ("eager", ("channels_last",)),
    "relu_before_pool": ("eager", ("relu_before_pool",)),
    "relu_inplace": ("eager", ("relu_inplace",)),
    "bare_relu_inplace": ("bare", ("relu_inplace",)),
    "bare_relu_before_pool": ("bare", ("relu_before_pool",)),
    "fit_relu_before_pool": ("fit", ("relu_before_pool",)),
    "fit_padded_max_pool": ("fit", ("padded_max_pool",)),
    "fit_batchnorm_formula": ("fit", ("batchnorm_formula",)),
    "mkl_linear": ("eager", ("mkl_linear",)),
    "bare_mkl_linear": ("bare", ("mkl_linear",)),
    "fit_mkl_linear": ("fit", ("mkl_linear",)),
    "foreach_adam": ("eager", ("foreach_adam",)),
    "dropout_bernoulli": ("eager", ("dropout_bernoulli",)),
    "fit_dropout_bernoulli": ("fit", ("dropout_bernoulli",)),
    "malloc_channels_last": ("eager", ("malloc", "channels_last")),
    "all": ("eager", ("malloc", "channels_last")),
    "bare": ("bare", ()),
    "fit": ("fit", ()),
    "fit_no_bar": ("fit", ("no_bar",)),
    "fit_no_logger": ("fit", ("no_logger",)),
    "fit_no_step_log": ("fit", ("no_step_log",)),
    "fit_manual": ("fit", ("manual",)),
    "fit_barebones": ("fit", ("barebones",)),
    "bare_all": ("bare", ("malloc", "channels_last")),
    "fit_all": ("fit", ("malloc", "channels_last")),
}
DEFAULT_CONFIGS = ("current", "malloc", "channels_last", "relu_before_pool", "all")


# ------------------------------------------------------------------------------------------------ the patches
def use_malloc_cache() -> None:
    """glibc: serve large blocks from the heap and never trim it (freed activations are reused, not unmapped).
    Landed as `torch_impl.cpu_tuning.keep_freed_memory`, which the Lightning bases already apply."""
    from torch_impl.cpu_tuning import keep_freed_memory

    if not keep_freed_memory():
        raise RuntimeError("mallopt refused the thresholds (or PARITY_KEEP_FREED_MEMORY=0, or not glibc)")


def relu_before_pool() -> None:
    """Put the ReLUs back before the max pooling, in Keras's order `maxpool(relu(.))`, in the models that pool
    after a ReLU (the port runs `relu(maxpool(.))`: the same values and gradients)."""
    import torch

    from torch_impl.models.bn_cnn import BNCNN
    from torch_impl.models.cnn import CNN
    from torch_impl.models.datacamp import DataCampCNN
    from torch_impl.models.vectorized import VectorizedEnsemble

    def cnn_forward(self, x):
        x = self.pool1(torch.relu(self.conv1(x)))
        x = self.pool2(torch.relu(self.conv2(x)))
        x = self.pool3(torch.relu(self.conv3(x)))
        x = self.drop4(torch.relu(self.dense4(self.pool3_flat(x))))
        return self.dense5(x)

    def datacamp_forward(self, x):
        x = self._drop("drop1", self.pool1(torch.relu(self.conv1(x))))
        x = self._drop("drop2", self.pool2(torch.relu(self.conv2(x))))
        x = self._drop("drop3", self.pool3(torch.relu(self.conv3(x))))
        x = self._drop("drop4", torch.relu(self.fc1(self.flatten(x))))
        return self.out(x)

    def bn_cnn_forward(self, x):
        x = self.pool1(torch.relu(self.conv1(x)))  # the blocks are built with relu=False
        x = self.pool2(torch.relu(self.conv2(x)))
        x = self.pool3(torch.relu(self.conv3(x)))
        return self.dense5(self.drop4(self.dense4(self.pool3_flat(x))))

    def vectorized_forward(self, x):
        x = self.pool1(torch.relu(self.conv1(x)))
        x = self.pool2(torch.relu(self.conv2(x)))
        x = self.pool3(torch.relu(self.conv3(x)))
        x = self.dense4(x.reshape(x.shape[0], self.num_members, -1).transpose(0, 1))
        return self.dense5(self.drop4(torch.relu(x) if self._dense_relu else x))

    CNN.forward, DataCampCNN.forward, BNCNN.forward = cnn_forward, datacamp_forward, bn_cnn_forward
    VectorizedEnsemble.forward = vectorized_forward


def padded_max_pool() -> None:
    """MaxPool2d's 'same' padding as an explicit -inf padded copy, for every pool that pads."""
    import math

    import torch.nn.functional as F

    from torch_impl import layers

    def forward(self, x):
        if self.padding == "same":
            pads = layers._same_pads_2d(x.shape[-2], x.shape[-1], self.kernel_size, self.stride)
            if any(pads):
                x = F.pad(x, pads, value=-math.inf)
        return F.max_pool2d(x, self.kernel_size, self.stride)

    layers.MaxPool2d.forward = forward


def batchnorm_formula() -> None:
    """The Keras BatchNorm layers' training mode through their elementwise formula (`_moments`), not F.batch_norm."""
    from torch_impl.layers import _KerasBatchNorm

    _KerasBatchNorm._local_statistics = lambda self: False


def mkl_linear() -> None:
    """The port's Dense layers through `F.linear` and its backward (MKL's GEMM on an x86 CPU), not oneDNN's."""
    from torch_impl import layers

    layers.Linear._use_onednn = lambda self, x: False


def relu_inplace() -> None:
    """`cnn`'s forward with in-place ReLUs, in the same order as the model's."""
    import torch

    from torch_impl.models.cnn import CNN

    def forward(self, x):
        x = self.pool1(torch.relu_(self.conv1(x)))
        x = self.pool2(torch.relu_(self.conv2(x)))
        x = self.pool3(torch.relu_(self.conv3(x)))
        x = self.drop4(torch.relu_(self.dense4(self.pool3_flat(x))))
        return self.dense5(x)

    CNN.forward = forward


def foreach_adam() -> None:
    """KerasAdam._update for all parameters at once with `_foreach` ops, in `_update`'s operation order."""
    import torch

    from torch_impl.optim import KerasAdam

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if self.members != 1:
                raise NotImplementedError("foreach_adam: members=1 only")
            for p in params:
                if not self.state[p]:
                    self.state[p]["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    self.state[p]["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            grads = [p.grad for p in params]
            ms = [self.state[p]["exp_avg"] for p in params]
            vs = [self.state[p]["exp_avg_sq"] for p in params]
            factor = self._factor(group, self.iterations, params[0].dtype)
            delta = torch._foreach_sub(grads, ms)
            torch._foreach_mul_(delta, 1 - group["beta_1"])
            torch._foreach_add_(ms, delta)
            delta = torch._foreach_mul(grads, grads)
            torch._foreach_sub_(delta, vs)
            torch._foreach_mul_(delta, 1 - group["beta_2"])
            torch._foreach_add_(vs, delta)
            update = torch._foreach_mul(ms, factor)
            denominator = torch._foreach_sqrt(vs)
            torch._foreach_add_(denominator, group["epsilon"])
            torch._foreach_div_(update, denominator)
            torch._foreach_sub_(params, update)
        self.iterations += self.members
        if self.lr_schedule is not None:
            for group in self.param_groups:
                group["lr"] = self.lr_schedule(self.iterations)
        return loss

    KerasAdam.step = step


def dropout_bernoulli() -> None:
    """The models' `torch_impl.layers.Dropout` layers draw their masks as `nn.Dropout` does."""
    from torch import nn

    from torch_impl.layers import Dropout

    Dropout.forward = nn.Dropout.forward


def no_step_log() -> None:
    """ClassifierModule without its per-step `self.log` (the epoch metrics are still accumulated)."""
    from torch_impl.lightning_module import ClassifierModule

    def log_train(self, loss, acc):
        self.train_loss.update(loss)
        if not self.hparams.train_acc_after_step:
            self.train_acc.update(acc)

    ClassifierModule._log_train = log_train


# patches that change the process before the worker is built (the others act on the built worker, below)
PROCESS_PATCHES = {
    "malloc": use_malloc_cache,
    "relu_before_pool": relu_before_pool,
    "padded_max_pool": padded_max_pool,
    "batchnorm_formula": batchnorm_formula,
    "mkl_linear": mkl_linear,
    "relu_inplace": relu_inplace,
    "foreach_adam": foreach_adam,
    "no_step_log": no_step_log,
    "dropout_bernoulli": dropout_bernoulli,
}


def make_worker(setup: dict):
    """`parity bench`'s worker for the base variant, with the configuration's patches applied around it."""
    import torch

    patches = set(setup["patches"])
    for name, patch in PROCESS_PATCHES.items():  # in this order
        if name in patches:
            patch()
    cell = dict(setup["cell"])
    if cell["variant"] == "eager" and "channels_last" in patches:
        cell["variant"] = "channels_last"
    worker = bench.make_worker({**setup, "cell": cell})
    if cell["variant"] in ("bare", "fit"):
        if "channels_last" in patches:
            worker.module.model.to(memory_format=torch.channels_last)
        if "no_bar" in patches:
            worker.progress_bar = False
        if "no_logger" in patches:
            worker.trainer_kwargs["logger"] = False
        if "manual" in patches:
            worker.module.automatic_optimization = False
        if "barebones" in patches:
            # Lightning's loop alone: no loggers, progress bar, LearningRateMonitor or `self.log` (the timer stays)
            worker.trainer_kwargs["barebones"] = True
    return worker


# ---------------------------------------------------------------------------------------------------- driver
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--batch", type=int, help="default: the model's recipe batch size")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--data", choices=("auto", "mnist", "synthetic"), default="auto")
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help=f"from: {', '.join(CONFIGS)}")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    names = [c for c in args.configs.split(",") if c]
    unknown = set(names) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown configs {sorted(unknown)}")
    model, members = bench.parse_models(args.model)[0]
    batch = args.batch or bench.recipe_for(model).batch_size
    source = bench._data_source(args.data)
    workers = {name: bench.Worker(name, [sys.executable, __file__, "--worker"]) for name in names}
    for name, worker in workers.items():
        variant, patches = CONFIGS[name]
        cell = bench.Cell("torch", variant, model, members, batch)
        worker.send("setup", cell=bench.asdict(cell), data=source, device="cpu", threads=args.threads,
                    patches=list(patches))
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for name, worker in workers.items():
        answer = worker.receive()
        if not answer["ok"]:
            print(f"{name}: {answer['status']}")
            runs.pop(name)
    steps = bench.steps_for(members, args.steps)
    for repeat in range(args.repeats):
        order = list(runs)
        order = order[repeat % len(order):] + order[:repeat % len(order)]
        for name in order:
            answer = workers[name].ask("run", steps=steps, warmup=bench.steps_for(members, args.warmup))
            if not answer["ok"]:
                print(f"{name}: {answer['status']}")
                continue
            runs[name].append((1000 * answer["seconds"] / steps, 1000 * answer["cpu_seconds"] / steps))
            time.sleep(0.05)
    for worker in workers.values():
        worker.close()
    baseline = {"eager": "current", "bare": "bare", "fit": "fit"}
    results = []
    print(f"{model} x{members}, batch {batch}, data {source}, threads {args.threads or 'default'}: "
          f"{steps} steps x {args.repeats} repeats (median)")
    print(f"{'config':18s}  {'base':5s}  {'patches':40s}  {'ms/step':>8s}  {'cpu ms/step':>11s}  {'speed-up':>8s}")
    for name, values in runs.items():
        variant, patches = CONFIGS[name]
        if not values:
            continue
        reference = runs.get(baseline[variant]) if name != baseline[variant] else None
        pairs = list(zip(values, reference or []))
        speedup = statistics.median(r[0] / v[0] for v, r in pairs) if pairs else None
        row = {"config": name, "base": variant, "patches": list(patches), "ms_per_step": statistics.median(
            v[0] for v in values), "cpu_ms_per_step": statistics.median(v[1] for v in values), "speedup": speedup,
            "runs_ms": [v[0] for v in values]}
        results.append(row)
        print(f"{name:18s}  {variant:5s}  {','.join(patches) or '-':40s}  {row['ms_per_step']:8.1f}  "
              f"{row['cpu_ms_per_step']:11.1f}  {'' if speedup is None else f'{speedup:.2f}x':>8s}")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": model, "members": members, "batch": batch, "data": source,
                                               "threads": args.threads, "rows": results}, indent=2))
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        bench.serve(make_worker)
    else:
        sys.exit(main())
