"""`parity bench`: training speed and memory of the TF reference and the PyTorch port, side by side.

    parity bench [--models cnn,bn_cnn:5] [--batch-sizes 100] [--frameworks tf,torch] [--variants ...]
                 [--steps 30] [--repeats 5] [--warmup 5] [--device cpu|cuda] [--threads N] [--json PATH]
    parity bench --memory     peak resident memory of each recipe's training (a few steps on the full data)
    parity bench --scale      time per step against batch size and number of members

A model is a catalog name, `NAME:M` for an ensemble of M members of it (`bn_cnn:5` is tutorial 001's "best"
ensemble, trained as the tutorial does: one member after the other, one shared optimizer). Every row is one
training step (forward, loss, backward, optimizer update; no evaluation pass) with the model's recipe optimizer, on
the same uint8 batches scaled per batch (real MNIST when it is in the cache, synthetic otherwise).

Variants: `tf` (the step as a `tf.function`, as `tf_ref/train.py` runs it), `eager` (plain `nn.Module`s and the
Keras-semantics optimizer in a Python loop), `channels_last` (the same in NHWC memory format), `bf16` (channels_last
with the forward and loss under `torch.autocast(dtype=torch.bfloat16)`, opt-in: for GPUs), `compiled`
(`torch.compile`, opt-in: minutes of compilation), `bare` / `fit` (the `ClassifierModule` in a hand-written loop /
in `Trainer.fit` configured as `torch_impl/train.py` does, loggers and progress bar included: their ratio is
Lightning's overhead), `vectorized_bare` / `vectorized_fit` (the same with `ensemble_mode="vectorized"`, for
ensembles, when `ClassifierModule` has that argument). The Lightning rows leave out the recipe's learning-rate
decay (a scalar per step; the bare loop has no Trainer to size it).

Each variant runs in its own worker process (TensorFlow is imported only by the `tf` worker, so `--frameworks torch`
works where TensorFlow is not installed); the workers of one (model, batch) are started together and their timed
repeats alternate, so a load change on a shared machine hits every variant alike. Reported: images/s as the median
of the repeats, the ratio to TF as the median of the per-repeat ratios (paired in time), CPU time per step (all
threads), and the worker's peak resident memory (or the peak CUDA allocation).

JSON (`--json PATH`): {"command", "device", "threads", "data", "steps", "repeats", "warmup", "hardware",
"versions", "rows": [{"framework", "variant", "label", "model", "members", "batch", "steps", "status",
"images_per_s", "images_per_s_runs", "ms_per_step", "cpu_ms_per_step", "ratio_to_tf", "ratio_to_tf_runs",
"peak_rss_mb", "base_rss_mb", "cuda_peak_mb", "tf_imported", "threads", "train_gflop_per_image", "gflops",
"fraction_of_matmul"}], "matmul_gflops": {"float32", "bfloat16"}, "matmul_gflops_by_framework": {"torch",
"tf"}, "lightning_overhead": [{"model",
"members", "batch", "mode", "fit_images_per_s", "bare_images_per_s", "overhead_pct"}], "memory": [{"framework",
"recipe", "model", "members", "steps", "status", "peak_rss_mb", "base_rss_mb", "tf_imported"}], "scale": [{"framework", "variant",
"model", "members", "batch", "ms_per_step"}]}. "memory" and "scale" appear with --memory / --scale.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from parity.catalog import RECIPES, TRAINABLE_MODEL_NAMES, get_spec, recipe_for

VARIANTS = ("tf", "eager", "channels_last", "bf16", "compiled", "bare", "fit", "vectorized_bare", "vectorized_fit")
DEFAULT_VARIANTS = ("tf", "eager", "channels_last", "bare", "fit", "vectorized_bare", "vectorized_fit")
LABELS = {
    "tf": "tf.function", "eager": "eager", "channels_last": "eager channels_last",
    "bf16": "eager channels_last bf16", "compiled": "torch.compile",
    "bare": "Lightning bare loop", "fit": "Lightning Trainer.fit", "vectorized_bare": "vectorized bare loop",
    "vectorized_fit": "vectorized Trainer.fit",
}
# One model per recipe for --memory (the recipe's largest or only model).
MEMORY_MODELS = ("cnn", "cnn_ensemble3", "bn_cnn", "convpool", "lenet_d", "datacamp")
_MB = 1024 * 1024


@dataclass(frozen=True)
class Cell:
    """One measured configuration: which code, which model, how many members, which batch size."""

    framework: str
    variant: str
    model: str
    members: int
    batch: int


def parse_models(text: str) -> list[tuple[str, int]]:
    """`"cnn,bn_cnn:5"` -> [("cnn", 1), ("bn_cnn", 5)]; a catalog ensemble (cnn_ensemble3) is its member x M."""
    models = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, count = item.partition(":")
        if name == "all":
            models += [(n, get_spec(n).members) for n in TRAINABLE_MODEL_NAMES]
            continue
        spec = get_spec(name)
        if not spec.recipe:
            raise ValueError(f"{name} is a building block with no training recipe; choose a trainable model")
        members = int(count) if count else spec.members
        if members < 1:
            raise ValueError(f"{item}: the number of members must be >= 1")
        models.append((name, members))
    if not models:
        raise ValueError("--models names no model")
    return models


def _ints(text: str | None) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()] if text else []


def _member_name(model: str) -> str:
    return get_spec(model).member or model


def applicable(variant: str, members: int) -> bool:
    """Variants that exist for this many members: `bare` needs automatic optimization (one model or vectorized);
    the vectorized variants need an ensemble."""
    if variant.startswith("vectorized"):
        return members > 1
    if variant == "bare":
        return members == 1
    return True


def steps_for(members: int, steps: int) -> int:
    """Timed steps per repeat: an ensemble's step trains every member, so it runs ceil(steps / members) of them."""
    return max(1, math.ceil(steps / members))


# ================================================================================================ worker process
# A worker serves one variant. It reads JSON commands on stdin and answers one JSON line each on the original
# stdout; everything libraries print goes to stderr (a log file the parent shows when the worker fails).


def _rss_mb() -> float:
    """Current resident set size (Linux /proc; falls back to the peak elsewhere)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / _MB
    except (OSError, ValueError, IndexError):
        return _peak_rss_mb()


def _peak_rss_mb() -> float:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / _MB  # Linux: KiB, macOS: bytes


def _load_data(source: str, seed: int = 0):
    """uint8 training images (N, 28, 28) and int64 labels, in one fixed shuffled order shared by all workers."""
    import numpy as np

    from parity import data as pdata

    if source == "mnist":
        arrays = pdata.load_arrays("mnist", offline=True, log=lambda *a, **k: None)
    else:
        arrays = pdata.make_synthetic(n_train=60000, n_test=1000, seed=seed)
    order = np.random.default_rng(seed).permutation(len(arrays["x_train"]))
    return np.ascontiguousarray(arrays["x_train"][order]), arrays["y_train"][order].astype(np.int64)


def _batches(n: int, batch: int) -> int:
    if n < batch:
        raise ValueError(f"batch {batch} is larger than the {n} training images")
    return n // batch  # full batches only: a partial batch would retrace a tf.function


class _TFWorker:
    """tutorial 001's `tf.function` step (tf_ref/train.py), one per member, one optimizer shared by all members."""

    def __init__(self, cell: Cell, source: str, device: str, threads: int | None, seed: int = 0):
        try:
            import tf_ref  # noqa: F401  (quiets TensorFlow's start-up logging)
            import keras
            import tensorflow as tf
        except ImportError as error:
            raise _NotAvailable(f"TensorFlow is not installed ({error})") from None

        if threads:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(threads)
        if device == "cpu":
            tf.config.set_visible_devices([], "GPU")
        from tf_ref.models import build_member
        from tf_ref.train import make_optimizer

        self.tf = tf
        recipe = recipe_for(cell.model, members=cell.members)
        self.images, self.labels = _load_data(source, seed)
        self.batch, self.n_batches = cell.batch, _batches(len(self.images), cell.batch)
        self.members = [build_member(cell.model, seed=seed + k) for k in range(cell.members)]
        optimizer = make_optimizer(recipe, -(-len(self.images) // cell.batch))
        optimizer.build([v for m in self.members for v in m.trainable_variables])
        softmax = get_spec(_member_name(cell.model)).output == "softmax"
        scale = float(recipe.scale)

        def loss_fn(labels, outputs):
            if softmax:  # what model.fit's "sparse_categorical_crossentropy" computes for a softmax output
                return tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(labels, outputs))
            return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=outputs))

        def make_step(model):
            @tf.function(reduce_retracing=True)
            def step(images, labels):
                x = tf.cast(images, tf.float32)[..., None] / scale  # uint8 in memory, scaled per batch
                with tf.GradientTape() as tape:
                    loss = loss_fn(labels, model(x, training=True))
                grads = tape.gradient(loss, model.trainable_variables)
                optimizer.apply_gradients(zip(grads, model.trainable_variables))
                return loss

            return step

        self.steps = [make_step(m) for m in self.members]
        self.i = 0

    def versions(self) -> dict:
        import keras

        return {"tensorflow": self.tf.__version__, "keras": keras.__version__}

    def threads(self) -> dict:
        cfg = self.tf.config.threading
        return {"intra_op": cfg.get_intra_op_parallelism_threads(), "inter_op": cfg.get_inter_op_parallelism_threads()}

    def run(self, steps: int, warmup: int) -> tuple[float, float]:
        loss = None
        for k in range(warmup + steps):
            if k == warmup:
                if loss is not None:
                    loss.numpy()
                t0, c0 = time.perf_counter(), time.process_time()
            start = (self.i % self.n_batches) * self.batch
            self.i += 1
            images, labels = self.images[start:start + self.batch], self.labels[start:start + self.batch]
            for step in self.steps:
                loss = step(images, labels)
        loss.numpy()  # the last step has finished
        return time.perf_counter() - t0, time.process_time() - c0

    def cuda_peak_mb(self) -> float | None:
        if not self.tf.config.list_logical_devices("GPU"):
            return None
        return self.tf.config.experimental.get_memory_info("GPU:0")["peak"] / _MB


class _TorchWorker:
    """Shared torch set-up: device, threads, the uint8 data as tensors, synchronization for timing."""

    def __init__(self, device: str, threads: int | None):
        from torch_impl.cpu_tuning import tensorboard_without_tensorflow

        tensorboard_without_tensorflow()  # a torch row costs what it costs on a torch-only machine
        import torch

        if threads:
            torch.set_num_threads(threads)
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--device cuda: torch sees no CUDA device")
        self.torch, self.device = torch, torch.device(device)

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def versions(self) -> dict:
        import lightning

        return {"torch": self.torch.__version__, "lightning": lightning.__version__}

    def threads(self) -> dict:
        return {"intra_op": self.torch.get_num_threads(), "inter_op": self.torch.get_num_interop_threads()}

    def cuda_peak_mb(self) -> float | None:
        if self.device.type != "cuda":
            return None
        return self.torch.cuda.max_memory_allocated() / _MB


class _EagerWorker(_TorchWorker):
    """Plain `nn.Module` members and the recipe's Keras-semantics optimizer, shared, in a Python loop."""

    def __init__(self, cell: Cell, source: str, device: str, threads: int | None, seed: int = 0):
        super().__init__(device, threads)
        torch = self.torch
        import torch.nn.functional as F

        from torch_impl.lightning_module import build_optimizer
        from torch_impl.models import build_member, model_logits
        from torch_impl.optim import ExponentialDecay

        recipe = recipe_for(cell.model, members=cell.members)
        images, labels = _load_data(source, seed)
        self.images, self.labels = torch.from_numpy(images), torch.from_numpy(labels)
        if self.device.type == "cuda":  # resident on the GPU, as MNISTDataModule keeps them (data_on_device)
            self.images, self.labels = self.images.to(self.device), self.labels.to(self.device)
        self.batch, self.n_batches, self.scale = cell.batch, _batches(len(images), cell.batch), float(recipe.scale)
        self.memory_format = (torch.channels_last if cell.variant in ("channels_last", "bf16")
                              else torch.contiguous_format)
        self.autocast = cell.variant == "bf16"  # parameters and optimizer stay float32 (mixed precision)
        self.members = [build_member(cell.model, seed=seed + k).to(self.device, memory_format=self.memory_format)
                        for k in range(cell.members)]
        lr = recipe.lr
        if recipe.lr_decay_rate is not None:
            decay_steps = round(-(-len(images) // cell.batch) * recipe.lr_decay_epochs)
            lr = ExponentialDecay(recipe.lr, decay_steps, recipe.lr_decay_rate, staircase=True)
        self.optimizer = build_optimizer([p for m in self.members for p in m.parameters()], recipe.optimizer, lr,
                                         recipe.epsilon)
        self.forwards = [torch.compile(m) if cell.variant == "compiled" else m for m in self.members]
        self.loss = lambda member, forward, x, y: F.cross_entropy(
            model_logits(forward, x) if forward is member else _compiled_logits(member, forward, x), y)
        self.i = 0
        if cell.variant == "compiled":
            self.run(1, 1)  # compile now, not in the first timed repeat

    def _batch(self):
        start = (self.i % self.n_batches) * self.batch
        self.i += 1
        images = self.images[start:start + self.batch].to(self.device, non_blocking=True)
        labels = self.labels[start:start + self.batch].to(self.device, non_blocking=True)
        x = images.unsqueeze(1).float() / self.scale  # as MNISTDataModule.on_after_batch_transfer
        return x.contiguous(memory_format=self.memory_format), labels

    def run(self, steps: int, warmup: int) -> tuple[float, float]:
        for k in range(warmup + steps):
            if k == warmup:
                self.sync()
                t0, c0 = time.perf_counter(), time.process_time()
            x, y = self._batch()
            for member, forward in zip(self.members, self.forwards):  # the tutorial's loop: one update per member
                with self.torch.autocast(self.device.type, dtype=self.torch.bfloat16, enabled=self.autocast):
                    loss = self.loss(member, forward, x, y)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
        self.sync()
        return time.perf_counter() - t0, time.process_time() - c0


def _compiled_logits(member, forward, x):
    """A compiled softmax model's logits: compile `logits`, not the softmax forward."""
    if getattr(member, "output", "logits") == "softmax":
        if not hasattr(member, "_bench_logits"):
            import torch

            member._bench_logits = torch.compile(member.logits)
        return member._bench_logits(x)
    return forward(x)


class _LightningWorker(_TorchWorker):
    """`ClassifierModule` over `MNISTDataModule`'s loader: in a hand-written loop (`bare`) or in `Trainer.fit`."""

    def __init__(self, cell: Cell, source: str, device: str, threads: int | None, seed: int = 0):
        super().__init__(device, threads)
        import inspect

        from torch_impl.cpu_tuning import keep_freed_memory

        keep_freed_memory()  # as torch_impl/train.py does: the port as it trains

        import lightning as L

        from torch_impl.datamodule import InMemoryImages, MNISTDataModule
        from torch_impl.lightning_module import ClassifierModule

        self.L, self.cell = L, cell
        recipe = recipe_for(cell.model, members=cell.members)
        kwargs = {}
        if cell.variant.startswith("vectorized"):
            if "ensemble_mode" not in inspect.signature(ClassifierModule.__init__).parameters:
                raise _NotAvailable("ClassifierModule has no ensemble_mode argument")
            kwargs["ensemble_mode"] = "vectorized"
        L.seed_everything(seed, verbose=False)
        try:
            self.module = ClassifierModule(model_name=_member_name(cell.model), members=cell.members,
                                           optimizer=recipe.optimizer, lr=recipe.lr, epsilon=recipe.epsilon, **kwargs)
        except ValueError as error:  # e.g. vectorized members of a model that has no vectorized form
            raise _NotAvailable(str(error)) from None
        images, labels = _load_data(source, seed)

        class BenchData(MNISTDataModule):
            """The project's datamodule (loader, batch sampler, on-device scaling) over the bench's arrays."""

            def prepare_data(self) -> None:
                pass

            def setup(self, stage: str | None = None) -> None:
                # on the trainer's GPU when Trainer.fit calls this (MNISTDataModule.data_device)
                self.train_set = InMemoryImages(images, labels).to(self.data_device())
                self.eval_sets, self.eval_names = {}, []

        self.data = BenchData(batch_size=cell.batch, scale=recipe.scale, shuffle=False, seed=seed)
        self.data.setup("fit")
        if self.device.type == "cuda":  # resident on the GPU, as MNISTDataModule.setup keeps them there
            self.data.train_set.to(self.device)
        self.bare = cell.variant.endswith("bare")
        self.trainer_kwargs: dict = {}  # overrides of the Trainer below (scripts/bench_proposals.py)
        self.progress_bar = True
        if self.bare:
            self.module.to(self.device)
            self.optimizer = self.module.configure_optimizers()
            self.iterator = iter(())
        self.logdir = tempfile.mkdtemp(prefix="parity-bench-")  # in the worker's TMPDIR, which `Worker` removes

    def _next(self):
        try:
            return next(self.iterator)
        except StopIteration:
            self.iterator = iter(self.data.train_dataloader())
            return next(self.iterator)

    def run(self, steps: int, warmup: int) -> tuple[float, float]:
        return self._run_bare(steps, warmup) if self.bare else self._run_fit(steps, warmup)

    def _run_bare(self, steps: int, warmup: int) -> tuple[float, float]:
        module, optimizer = self.module, self.optimizer
        module.train()
        for k in range(warmup + steps):
            if k == warmup:
                self.sync()
                t0, c0 = time.perf_counter(), time.process_time()
            batch = tuple(t.to(self.device, non_blocking=True) for t in self._next())
            batch = self.data.on_after_batch_transfer(batch, 0)
            optimizer.zero_grad(set_to_none=True)
            loss = module.training_step(batch, k)
            loss.backward()
            optimizer.step()
            module.on_train_batch_end(loss, batch, k)
        self.sync()
        return time.perf_counter() - t0, time.process_time() - c0

    def _run_fit(self, steps: int, warmup: int) -> tuple[float, float]:
        from lightning.pytorch.callbacks import LearningRateMonitor
        from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

        from torch_impl.callbacks import KerasProgressBar

        worker, warmup = self, max(warmup, 1)
        times: dict[str, float] = {}

        class StepTimer(self.L.Callback):
            """From the end of the last warm-up batch to the end of the last timed one: N whole iterations."""

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
                if batch_idx in (warmup - 1, warmup + steps - 1):
                    worker.sync()
                    key = "start" if batch_idx == warmup - 1 else "end"
                    times[key], times[f"{key}_cpu"] = time.perf_counter(), time.process_time()

        # torch_impl/train.py's Trainer, less what acts only at epoch end (checkpoints, history, evaluation).
        settings = dict(
            max_epochs=1, limit_train_batches=warmup + steps, limit_val_batches=0, num_sanity_val_steps=0,
            accelerator="gpu" if self.device.type == "cuda" else "cpu", devices=1,
            callbacks=[*([KerasProgressBar()] if self.progress_bar else []), LearningRateMonitor(logging_interval="epoch"),
                       StepTimer()],
            logger=[TensorBoardLogger(self.logdir, name="tensorboard", version="lightning"),
                    CSVLogger(self.logdir, name="csv", version="")],
            enable_progress_bar=self.progress_bar, enable_model_summary=False, enable_checkpointing=False,
            use_distributed_sampler=False,
        )
        settings.update(self.trainer_kwargs)
        if settings.get("barebones"):  # Lightning's loop alone: no loggers, progress bar or callbacks but the timer
            settings.update(logger=None, enable_progress_bar=None, enable_model_summary=None, callbacks=[StepTimer()])
        trainer = self.L.Trainer(**settings)
        trainer.fit(self.module, datamodule=self.data)
        if "end" not in times:
            raise RuntimeError(f"Trainer.fit stopped before {warmup + steps} batches")
        return times["end"] - times["start"], times["end_cpu"] - times["start_cpu"]


class _NotAvailable(Exception):
    """This variant does not exist for this configuration (reported as a row status, not as a failure)."""


def make_worker(setup: dict):
    """The worker object for a `setup` command: {"cell", "data", "device", "threads"}."""
    cell, source, device, threads = Cell(**setup["cell"]), setup["data"], setup["device"], setup["threads"]
    if cell.framework == "tf":
        return _TFWorker(cell, source, device, threads)
    if cell.variant in ("eager", "channels_last", "bf16", "compiled"):
        return _EagerWorker(cell, source, device, threads)
    return _LightningWorker(cell, source, device, threads)


def _recipe_memory(framework: str, model: str, members: int, steps: int, device: str) -> dict:
    """Train `model` with its recipe on the full data for `steps` batches, then evaluate as after an epoch."""
    recipe = recipe_for(model, members=members).replace(epochs=1)
    with tempfile.TemporaryDirectory(prefix="parity-bench-memory-", ignore_cleanup_errors=True) as out:
        if framework == "torch":
            from torch_impl.train import train

            train(model, recipe, out=out, progress=False, accelerator="gpu" if device == "cuda" else "cpu",
                  trainer_kwargs={"limit_train_batches": steps})
        else:
            _limit_tf_steps(steps)
            from tf_ref.train import train

            train(model, recipe, out=out, progress=False)
    return {"recipe": recipe.name}


def _limit_tf_steps(steps: int) -> None:
    """Stop tf_ref/train.py's epochs after `steps` batches (its loops have no such option): every tf.data pipeline
    takes `steps` batches before prefetching, and `Model.fit` gets `steps_per_epoch`."""
    import tf_ref  # noqa: F401
    import keras
    import tensorflow as tf

    prefetch, fit = tf.data.Dataset.prefetch, keras.Model.fit
    tf.data.Dataset.prefetch = lambda self, *a, **k: prefetch(self.take(steps), *a, **k)
    keras.Model.fit = lambda self, *a, **k: fit(self, *a, **{"steps_per_epoch": steps, **k})


def serve(factory=make_worker) -> None:
    """A worker's command loop (`python -m parity.bench --worker`); `factory(setup_command)` makes the worker."""
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever a library prints lands in the log, not in the protocol

    def reply(**message) -> None:
        protocol.write(json.dumps(message) + "\n")

    worker = None
    for line in sys.stdin:
        command = json.loads(line)
        op = command.pop("op")
        try:
            if op == "setup":
                started = time.perf_counter()
                worker = factory(command)
                reply(ok=True, seconds=time.perf_counter() - started, rss_mb=_rss_mb(), threads=worker.threads(),
                      versions=worker.versions())
            elif op == "run":
                seconds, cpu_seconds = worker.run(command["steps"], command["warmup"])
                reply(ok=True, seconds=seconds, cpu_seconds=cpu_seconds)
            elif op == "stats":
                reply(ok=True, peak_rss_mb=_peak_rss_mb(), cuda_peak_mb=worker.cuda_peak_mb() if worker else None,
                      tf_imported="tensorflow" in sys.modules)
            elif op == "memory":
                base = _rss_mb()
                result = _recipe_memory(**command)
                reply(ok=True, base_rss_mb=base, peak_rss_mb=_peak_rss_mb(), tf_imported="tensorflow" in sys.modules,
                      **result)
            elif op == "exit":
                reply(ok=True)
                return
        except _NotAvailable as error:
            reply(ok=False, status=f"not available: {error}")
        except Exception as error:  # reported in the row; the log file has the traceback
            import traceback

            traceback.print_exc()
            reply(ok=False, status=f"error: {type(error).__name__}: {error}")


# ================================================================================================ parent process
class Worker:
    """A worker process and its pipe; answers are JSON lines. Its stderr goes to a log file shown on failure."""

    def __init__(self, name: str, argv: list[str] | None = None):
        self.name = name
        # Everything the worker writes to temporary files (the Trainer's loggers, the memory runs' checkpoints,
        # TensorFlow's autograph sources) goes to a directory of its own, removed by close() even if it crashed.
        self.tmp = tempfile.mkdtemp(prefix=f"parity-bench-{name}-")
        self.log = open(Path(self.tmp) / "worker.log", "w+")  # noqa: SIM115 (closed by close())
        env = {**_child_env(), "TMPDIR": self.tmp}
        argv = argv or [sys.executable, "-m", "parity.bench", "--worker"]
        self.process = subprocess.Popen(argv, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=self.log, text=True, bufsize=1, env=env)

    def send(self, op: str, **payload) -> None:
        self.process.stdin.write(json.dumps({"op": op, **payload}) + "\n")
        self.process.stdin.flush()

    def receive(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            self.process.wait()
            return {"ok": False, "status": f"error: worker exited with code {self.process.returncode}: "
                                           f"{self.log_tail()}"}
        return json.loads(line)

    def ask(self, op: str, **payload) -> dict:
        self.send(op, **payload)
        return self.receive()

    def log_tail(self, lines: int = 3) -> str:
        text = Path(self.log.name).read_text(errors="replace").strip().splitlines()
        return " | ".join(text[-lines:])

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.ask("exit")
                self.process.wait(timeout=30)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                self.process.kill()
        self.log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _hardware(device: str = "cpu") -> dict:
    """The machine a bench ran on: CPU model and cores, and on a CUDA device the GPU, its memory and the CUDA and
    cuDNN versions torch runs with."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    hardware = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "system": platform.system()}
    if device.startswith("cuda"):
        import torch

        index = torch.device(device).index or 0
        hardware.update(gpu=torch.cuda.get_device_name(index),
                        gpu_memory_gib=round(torch.cuda.get_device_properties(index).total_memory / 2**30, 1),
                        cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return hardware


def _data_source(choice: str) -> str:
    """`auto`: real MNIST when the verified cache holds it (no download from here), synthetic otherwise."""
    if choice != "auto":
        return choice
    from parity import data as pdata

    directory = pdata.default_cache_dir() / "mnist"
    return "mnist" if all((directory / name).is_file() for name in pdata.FILES) else "synthetic"


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def measure_group(cells: list[Cell], args, source: str, workers: dict | None = None) -> list[dict]:
    """Set up one worker per cell (together), then alternate their timed repeats; one row per cell."""
    own = workers is None
    workers = {} if own else workers
    rows = {cell: {**asdict(cell), "label": LABELS[cell.variant], "steps": steps_for(cell.members, args.steps),
                   "status": "ok"} for cell in cells}
    try:
        active = []
        for cell in cells:
            key = (cell.framework, cell.variant)
            if key not in workers:
                workers[key] = Worker(cell.variant)
            workers[key].send("setup", cell=asdict(cell), data=source, device=args.device, threads=args.threads)
        for cell in cells:
            answer = workers[(cell.framework, cell.variant)].receive()
            if answer["ok"]:
                rows[cell].update(base_rss_mb=answer["rss_mb"], threads=answer["threads"])
                rows[cell]["versions"] = answer["versions"]
                active.append(cell)
            else:
                rows[cell]["status"] = answer["status"]
        runs: dict[Cell, list[tuple[float, float]]] = {cell: [] for cell in active}
        for repeat in range(args.repeats):
            # Alternate, and rotate the order each repeat so that no variant always follows the same one.
            shift = repeat % max(len(active), 1)
            for cell in active[shift:] + active[:shift]:
                if rows[cell]["status"] != "ok":
                    continue
                steps = steps_for(cell.members, args.steps)
                answer = workers[(cell.framework, cell.variant)].ask(
                    "run", steps=steps, warmup=steps_for(cell.members, args.warmup) if args.warmup else 0)
                if answer["ok"]:
                    runs[cell].append((steps * cell.batch / answer["seconds"], answer["cpu_seconds"] / steps))
                else:
                    rows[cell]["status"] = answer["status"]
                time.sleep(0.05)  # let the previous worker's spinning threads go idle
        for cell in active:
            stats = workers[(cell.framework, cell.variant)].ask("stats")
            row = rows[cell]
            if stats.get("ok"):
                row.update(peak_rss_mb=stats["peak_rss_mb"], cuda_peak_mb=stats["cuda_peak_mb"],
                           tf_imported=stats["tf_imported"])
            ips = [r[0] for r in runs[cell]]
            if ips and row["status"] == "ok":
                row.update(images_per_s=_median(ips), images_per_s_runs=ips,
                           ms_per_step=1000 * cell.batch / _median(ips),
                           cpu_ms_per_step=1000 * _median([r[1] for r in runs[cell]]))
        _add_ratios(list(rows.values()), runs, cells)
    finally:  # also on Ctrl-C: no worker process or temporary directory outlives the bench
        if own:
            for worker in workers.values():
                worker.close()
    return list(rows.values())


def _add_ratios(rows: list[dict], runs: dict, cells: list[Cell]) -> None:
    """ratio_to_tf: median over repeats of (this row's images/s / TF's images/s in the same repeat)."""
    by_cell = dict(zip(cells, rows))
    for cell, row in by_cell.items():
        tf_cell = Cell("tf", "tf", cell.model, cell.members, cell.batch)
        tf_runs = runs.get(tf_cell, [])
        mine = runs.get(cell, [])
        if not tf_runs or not mine or row["status"] != "ok":
            row["ratio_to_tf"], row["ratio_to_tf_runs"] = None, []
            continue
        ratios = [a[0] / b[0] for a, b in zip(mine, tf_runs)]
        row["ratio_to_tf"], row["ratio_to_tf_runs"] = _median(ratios), ratios


def lightning_overhead(rows: list[dict]) -> list[dict]:
    """Trainer.fit against the bare loop over the same module and data, per configuration."""
    out = []
    index = {(r["variant"], r["model"], r["members"], r["batch"]): r for r in rows}
    for (variant, model, members, batch), fit in index.items():
        if variant not in ("fit", "vectorized_fit"):
            continue
        bare = index.get((variant.replace("fit", "bare"), model, members, batch))
        if not bare or fit["status"] != "ok" or bare["status"] != "ok":
            continue
        pairs = list(zip(bare["images_per_s_runs"], fit["images_per_s_runs"]))
        overhead = _median([100 * (b / f - 1) for b, f in pairs])
        out.append({"model": model, "members": members, "batch": batch,
                    "mode": "vectorized" if variant.startswith("vectorized") else "single",
                    "fit_images_per_s": fit["images_per_s"], "bare_images_per_s": bare["images_per_s"],
                    "overhead_pct": overhead})
    return out


def measure_memory(models: list[tuple[str, int]], frameworks: list[str], steps: int, device: str) -> list[dict]:
    """Each recipe's training in a fresh process per framework (alternating), for its peak resident memory."""
    rows = []
    for model, members in models:
        for framework in frameworks:
            recipe = recipe_for(model, members=members)
            row = {"framework": framework, "recipe": recipe.name, "model": model, "members": members,
                   "steps": steps, "status": "ok"}
            worker = Worker(f"memory-{framework}")
            try:
                answer = worker.ask("memory", framework=framework, model=model, members=members, steps=steps,
                                    device=device)
            finally:
                worker.close()
            if answer["ok"]:
                row.update(peak_rss_mb=answer["peak_rss_mb"], base_rss_mb=answer["base_rss_mb"],
                           tf_imported=answer["tf_imported"])
            else:
                row["status"] = answer["status"]
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------- output
def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def format_rows(rows: list[dict]) -> str:
    header = (f"{'framework':9s}  {'variant':24s}  {'model':16s}  {'batch':>5s}  {'images/s':>9s}  {'ms/step':>8s}  "
              f"{'cpu ms/step':>11s}  {'vs TF':>6s}  {'peak RSS MB':>11s}  {'GFLOP/s':>8s}  {'of matmul':>9s}")
    lines = [header, "-" * len(header)]
    for r in rows:
        model = r["model"] if r["members"] == 1 or get_spec(r["model"]).members == r["members"] else \
            f"{r['model']} x{r['members']}"
        if r["status"] != "ok":
            lines.append(f"{r['framework']:9s}  {r['label']:24s}  {model:16s}  {r['batch']:5d}  {r['status']}")
            continue
        memory = r.get("cuda_peak_mb") if r.get("cuda_peak_mb") is not None else r.get("peak_rss_mb")
        ratio = _fmt(r.get("ratio_to_tf"), ".2f") + ("x" if r.get("ratio_to_tf") is not None else "")
        lines.append(
            f"{r['framework']:9s}  {r['label']:24s}  {model:16s}  {r['batch']:5d}  {_fmt(r.get('images_per_s'), ',.0f'):>9s}  "
            f"{_fmt(r.get('ms_per_step'), '.1f'):>8s}  {_fmt(r.get('cpu_ms_per_step'), '.1f'):>11s}  {ratio:>6s}  "
            f"{_fmt(memory, ',.0f'):>11s}  {_fmt(r.get('gflops'), ',.1f'):>8s}  "
            f"{_fmt(r.get('fraction_of_matmul'), '.1%'):>9s}")
    return "\n".join(lines)


def format_overhead(items: list[dict]) -> str:
    lines = ["Lightning overhead (Trainer.fit against the bare loop, same module and data; median of paired repeats):"]
    for item in items:
        lines.append(f"  {item['model']} x{item['members']} batch {item['batch']} ({item['mode']}): "
                     f"fit {item['fit_images_per_s']:,.0f} vs bare {item['bare_images_per_s']:,.0f} images/s "
                     f"-> {item['overhead_pct']:+.1f}%")
    return "\n".join(lines)


def format_memory(rows: list[dict]) -> str:
    header = f"{'framework':9s}  {'recipe':16s}  {'model':16s}  {'peak RSS MB':>11s}  {'after imports MB':>16s}"
    lines = [header, "-" * len(header)]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"{r['framework']:9s}  {r['recipe']:16s}  {r['model']:16s}  {r['status']}")
        else:
            lines.append(f"{r['framework']:9s}  {r['recipe']:16s}  {r['model']:16s}  {r['peak_rss_mb']:>11,.0f}  "
                         f"{r['base_rss_mb']:>16,.0f}")
    return "\n".join(lines)


def scale_table(rows: list[dict]) -> list[dict]:
    return [{"framework": r["framework"], "variant": r["variant"], "model": r["model"], "members": r["members"],
             "batch": r["batch"], "ms_per_step": r.get("ms_per_step")} for r in rows if r["status"] == "ok"]


def format_scale(items: list[dict]) -> str:
    batches = sorted({i["batch"] for i in items})
    keys = list(dict.fromkeys((i["framework"], i["variant"], i["model"], i["members"]) for i in items))
    cells = {(i["framework"], i["variant"], i["model"], i["members"], i["batch"]): i["ms_per_step"] for i in items}
    header = f"{'ms per step':40s}" + "".join(f"  {'batch ' + str(b):>10s}" for b in batches)
    lines = [header, "-" * len(header)]
    for framework, variant, model, members in keys:
        name = f"{framework} {LABELS[variant]}, {model} x{members}"
        lines.append(f"{name:40s}" + "".join(
            f"  {_fmt(cells.get((framework, variant, model, members, b)), '.1f'):>10s}" for b in batches))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- command
def plan(args) -> list[list[Cell]]:
    """Groups of cells measured together: every requested variant of one (model, members, batch)."""
    frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    unknown = set(frameworks) - {"tf", "torch"}
    if unknown:
        raise ValueError(f"unknown framework(s) {sorted(unknown)}; choose from tf, torch")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise ValueError(f"unknown variant(s) {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    groups = []
    for model, members in parse_models(args.models):
        batch_sizes = _ints(args.batch_sizes) or [recipe_for(model).batch_size]
        for batch in batch_sizes:
            group = []
            for variant in variants:
                framework = "tf" if variant == "tf" else "torch"
                if framework in frameworks and applicable(variant, members):
                    group.append(Cell(framework, variant, model, members, batch))
            if group:
                groups.append(group)
    return groups


def _command(args) -> str:
    """The command line that reproduces this run, every default spelled out."""
    parts = ["parity bench", f"--models {args.models}", f"--frameworks {args.frameworks}",
             f"--variants {args.variants}", f"--steps {args.steps}", f"--repeats {args.repeats}",
             f"--warmup {args.warmup}", f"--device {args.device}", f"--data {args.data}"]
    if args.batch_sizes:
        parts.insert(2, f"--batch-sizes {args.batch_sizes}")
    if args.threads:
        parts.append(f"--threads {args.threads}")
    if args.memory or args.memory_only:
        parts.append("--memory-only" if args.memory_only else "--memory")
        parts.append(f"--memory-steps {args.memory_steps}")
        if args.memory_models:
            parts.append(f"--memory-models {args.memory_models}")
    if args.scale:
        parts.append("--scale")
    return " ".join(parts)


def arithmetic_rates(device: str, threads: int | None, frameworks: list[str] | tuple[str, ...] = ("torch",)
                     ) -> tuple[dict, dict]:
    """The device's matrix-multiply rate (GFLOP/s) in float32 and bfloat16: the best that torch and, on CPU with
    `tf` among `frameworks`, TensorFlow measure (they need not agree: TensorFlow multiplies with oneDNN's GEMM, torch
    with its BLAS, MKL in the x86 wheels, which on some CPUs runs slower kernels). Returns (best, by framework)."""
    import torch

    from torch_impl.flops import matmul_gflops

    if threads:
        torch.set_num_threads(threads)
    by_framework = {"torch": {"float32": matmul_gflops(device, torch.float32),
                              "bfloat16": matmul_gflops(device, torch.bfloat16)}}
    if device == "cpu" and "tf" in frameworks:
        tf_rates = _tf_matmul_rates(threads)
        if tf_rates:
            by_framework["tf"] = tf_rates
    best = {dtype: max(rates[dtype] for rates in by_framework.values()) for dtype in ("float32", "bfloat16")}
    return best, by_framework


def _child_env() -> dict:
    """The environment of a process the bench starts: this one's, with the project root on PYTHONPATH."""
    root = str(Path(__file__).resolve().parent.parent)
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH"))))}


def _tf_matmul_rates(threads: int | None) -> dict | None:
    """TensorFlow's rates, measured in a process of its own (`python -m tf_ref.flops`); None if it fails, e.g.
    without TensorFlow (the `tf` rows then say why)."""
    argv = [sys.executable, "-m", "tf_ref.flops", *(["--threads", str(threads)] if threads else [])]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=_child_env(),
                              check=False)
        return json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        return None


def add_work(rows: list[dict], rates: dict) -> None:
    """FLOPs per image of each row's training step (`torch_impl.flops`, the same arithmetic in both frameworks),
    the rate that makes at the row's images/s, and its fraction of the matrix-multiply rate of the row's dtype."""
    from torch_impl.flops import flops_per_image

    cache = {}
    for row in rows:
        if row["status"] != "ok" or not row.get("images_per_s"):
            continue
        key = (row["model"], row["members"])
        if key not in cache:
            cache[key] = flops_per_image(row["model"], train=True, members=row["members"]) / 1e9
        row["train_gflop_per_image"] = cache[key]
        row["gflops"] = row["images_per_s"] * cache[key]
        rate = rates.get("bfloat16" if row["variant"] == "bf16" else "float32")
        row["fraction_of_matmul"] = row["gflops"] / rate if rate else None


def cmd_bench(args) -> int:
    if args.steps < 1 or args.repeats < 1 or args.warmup < 0:
        raise ValueError("--steps and --repeats must be >= 1, --warmup >= 0")
    if args.scale:
        args.models = args.models or "bn_cnn:1,bn_cnn:3,bn_cnn:5"
        args.batch_sizes = args.batch_sizes or "32,100,256"
        args.variants = args.variants or "tf,eager,vectorized_bare"
    args.models = args.models or "cnn,bn_cnn:5"
    args.variants = args.variants or ",".join(DEFAULT_VARIANTS)
    source = _data_source(args.data)
    frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    result = {"command": _command(args), "device": args.device, "threads": args.threads,
              "data": source, "steps": args.steps, "repeats": args.repeats, "warmup": args.warmup,
              "hardware": _hardware(args.device), "versions": {"python": platform.python_version()}, "rows": []}
    gpu = f"{result['hardware']['gpu']}, CUDA {result['hardware']['cuda']}; " if "gpu" in result["hardware"] else ""
    print(f"parity bench on {args.device} ({gpu}{result['hardware']['cpu']}, {result['hardware']['cores']} cores), "
          f"data: {source}; {args.steps} steps x {args.repeats} repeats after {args.warmup} warm-up steps "
          f"(an ensemble of M members: 1/M as many)", flush=True)
    if not args.memory_only:
        result["matmul_gflops"], result["matmul_gflops_by_framework"] = arithmetic_rates(
            args.device, args.threads, frameworks)
        print("matrix-multiply rate, the reference for 'of matmul' (the best of " + " and ".join(
            f"{name} {rates['float32']:,.0f} / {rates['bfloat16']:,.0f}" for name, rates in
            result["matmul_gflops_by_framework"].items()) + "): " + ", ".join(
            f"{dtype} {rate:,.0f} GFLOP/s" for dtype, rate in result["matmul_gflops"].items()), flush=True)
        groups = plan(args)
        shared = {} if args.scale else None  # --scale: one worker per variant for all cells (time, not memory)
        try:
            for group in groups:
                rows = measure_group(group, args, source, shared)
                add_work(rows, result["matmul_gflops"])
                for row in rows:
                    result["versions"].update(row.pop("versions", {}))
                result["rows"] += rows
                print(format_rows(rows), flush=True)
                print(flush=True)
        finally:
            for worker in (shared or {}).values():
                worker.close()
        result["lightning_overhead"] = lightning_overhead(result["rows"])
        if result["lightning_overhead"]:
            print(format_overhead(result["lightning_overhead"]))
        if args.scale:
            result["scale"] = scale_table(result["rows"])
            print("\n" + format_scale(result["scale"]))
    if args.memory or args.memory_only:
        models = parse_models(args.memory_models) if args.memory_models else [
            (m, get_spec(m).members if m != "bn_cnn" else RECIPES["tut001_best"].members) for m in MEMORY_MODELS]
        result["memory"] = measure_memory(models, frameworks, args.memory_steps, args.device)
        print("\nPeak resident memory of each recipe's training (full data, "
              f"{args.memory_steps} steps, then the epoch's evaluation):")
        print(format_memory(result["memory"]))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    failed = [r for r in result["rows"] + result.get("memory", []) if r["status"].startswith("error")]
    return 1 if failed else 0


def add_bench_parser(sub) -> None:
    from parity.compare import HelpFormatter

    p = sub.add_parser(
        "bench", help="training speed and memory, TF reference vs PyTorch port, side by side",
        description="Time training steps of catalog models in both frameworks (and several PyTorch variants), each "
                    "in its own process, repeats alternating; print images/s, the ratio to TF, CPU time and peak "
                    "memory. See parity/bench.py for the variants and the JSON format.",
        formatter_class=HelpFormatter)
    p.add_argument("--models", help="comma-separated catalog names, NAME:M for M members, or 'all' "
                                    "(default: cnn,bn_cnn:5; with --scale: bn_cnn:1,bn_cnn:3,bn_cnn:5)")
    p.add_argument("--batch-sizes", help="comma-separated (default: each model's recipe batch; --scale: 32,100,256)")
    p.add_argument("--frameworks", default="tf,torch", help="tf, torch or both (torch alone never imports TF)")
    p.add_argument("--variants", help=f"comma-separated subset of {','.join(VARIANTS)} "
                                      f"(default: all but bf16 and compiled; --scale: tf,eager,vectorized_bare)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per repeat (an ensemble of M: steps/M)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per variant, alternating between variants")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps before each repeat")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, help="intra-op threads for both frameworks (default: theirs)")
    p.add_argument("--data", choices=("auto", "mnist", "synthetic"), default="auto",
                   help="auto: MNIST if it is in the cache (parity fetch), synthetic otherwise")
    p.add_argument("--memory", action="store_true",
                   help="also measure each recipe's peak resident memory (fresh process per recipe and framework)")
    p.add_argument("--memory-only", action="store_true", help="only the --memory table")
    p.add_argument("--memory-models", help=f"models for --memory (default: {','.join(MEMORY_MODELS)}, "
                                           "bn_cnn with its recipe's 5 members)")
    p.add_argument("--memory-steps", type=int, default=20, help="training steps per recipe for --memory")
    p.add_argument("--scale", action="store_true", help="time per step against batch size and members")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON (format: parity/bench.py)")
    p.set_defaults(func=cmd_bench)


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    serve()
