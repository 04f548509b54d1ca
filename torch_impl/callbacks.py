"""Lightning callbacks that give a torch run the same outputs as a TF run, and Keras's early-stopping semantics."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, TQDMProgressBar

from parity.runs import TB_TAGS, History, derived_seed


class HistoryWriter(Callback):
    """Writes `history.json` / `history.csv` and the shared TensorBoard tags (see `parity.runs`) every epoch.

    Args:
        directory: the run directory.
        model_name, seed, recipe: recorded in the history header.
    """

    def __init__(self, directory: str, model_name: str = "", seed: int = 0, recipe: dict | None = None):
        super().__init__()
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.history = History(self.directory, model_name, "torch", recipe or {}, seed)
        self.writer = None
        self._t0 = 0.0
        self._fit_started = 0.0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_started = time.perf_counter()
        if trainer.is_global_zero and self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.directory / "tensorboard"))

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t0 = time.perf_counter()

    def on_sanity_check_end(self, trainer, pl_module) -> None:
        pl_module.reset_epoch_metrics()  # the sanity batches are not an epoch

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        # runs after the epoch's validation: train, val and test numbers are all in
        row = pl_module.epoch_metrics(reset=True)
        members = {k: v for k, v in row.items() if k.startswith("member")}
        row = {k: v for k, v in row.items() if not k.startswith("member")}
        row.update(epoch=trainer.current_epoch + 1, seconds=time.perf_counter() - self._t0)
        optimizer = trainer.optimizers[0]
        row["lr"] = float(optimizer.param_groups[0]["lr"])
        if not trainer.is_global_zero:
            return
        self.history.add_epoch(row)
        for key, value in row.items():
            if key in TB_TAGS:
                self.writer.add_scalar(TB_TAGS[key], value, row["epoch"])
        for key, value in members.items():
            self.writer.add_scalar(f"members/{key}", value, row["epoch"])
        self.writer.flush()

    def on_fit_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self.history.finish(train_seconds=time.perf_counter() - self._fit_started)
            if self.writer is not None:
                self.writer.close()
                self.writer = None

    def state_dict(self) -> dict:
        return {"epochs": self.history.epochs}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history.epochs = list(state_dict.get("epochs", []))  # a resumed run keeps its earlier epochs


class EpochSeed(Callback):
    """Dropout masks and online augmentation drawn per process and per epoch, as the data order is.

    Lightning seeds every process with the same seed: under DDP each rank would draw the same dropout masks and
    augmentations for its share of the global batch (B images, B / W distinct masks), and a resumed run would
    replay the random stream of its first epoch. At the start of every epoch, torch's generators are seeded with
    `parity.runs.derived_seed(seed, epoch, global_rank)`, except on the first epoch of rank 0, which keeps the stream that
    `seed_everything(seed)` started. (The datamodule's loaders draw from generators of their own, so the stream
    an epoch sees does not depend on how many loaders were iterated before it.)
    """

    def __init__(self, seed: int):
        super().__init__()
        self.seed = seed

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch, rank = trainer.current_epoch, trainer.global_rank
        if epoch or rank:
            torch.manual_seed(derived_seed(self.seed, epoch, rank))


class SetAsideCheckpoints(Callback):
    """A new run (no --resume) in a directory that holds an earlier run's checkpoints moves them to
    `checkpoints.replaced-<time>` when training starts: after the data and the model are set up, so that a run which
    fails to start leaves them where they were. Left in place, Lightning would write the new files beside them as
    `last-v1.ckpt`, ..., and a later --resume would pick up the earlier run's `last.ckpt`."""

    def __init__(self, dirpath: str | Path):
        super().__init__()
        self.dirpath = Path(dirpath)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or not self.dirpath.is_dir() or not any(self.dirpath.iterdir()):
            return
        stamp = time.strftime("%Y%m%dT%H%M%S")
        target = self.dirpath.with_name(f"{self.dirpath.name}.replaced-{stamp}")
        for n in range(2, 1000):
            if not target.exists():
                break
            target = self.dirpath.with_name(f"{self.dirpath.name}.replaced-{stamp}-{n}")
        self.dirpath.rename(target)
        print(f"a new run in {self.dirpath.parent}: the earlier run's checkpoints are now in {target}", flush=True)


class KerasEarlyStopping(EarlyStopping):
    """Lightning's `EarlyStopping` deciding as Keras's `EarlyStopping` does where the two differ: on values that are
    not finite.

    - Lightning stops at once on a NaN or infinite value (`check_finite=True`); Keras counts it as an epoch without
      improvement (every comparison with NaN is false) and goes on until `patience` runs out.
    - Keras takes the first epoch's value as the best whatever it is; after a NaN first epoch nothing improves on it,
      and training stops `patience` epochs later (Lightning would wait for the first finite value instead).
    Finite values: both count epochs without improvement and stop when the count reaches `patience`.
    """

    def __init__(self, monitor: str = "val_loss", patience: int = 10, mode: str = "min", **kwargs):
        super().__init__(monitor=monitor, patience=patience, mode=mode, check_finite=False, **kwargs)
        self.seen_first = False

    @property
    def state_key(self) -> str:
        # Lightning's EarlyStopping key, so that checkpoints written with either resume with the other
        return self._generate_state_key(monitor=self.monitor, mode=self.mode).replace(
            type(self).__qualname__, EarlyStopping.__qualname__, 1)

    def _evaluate_stopping_criteria(self, current: torch.Tensor) -> tuple[bool, str | None]:
        if self.seen_first:
            return super()._evaluate_stopping_criteria(current)
        self.seen_first = True
        self.best_score, self.wait_count = current.detach().clone(), 0
        return False, None

    def state_dict(self) -> dict:
        return {**super().state_dict(), "seen_first": self.seen_first}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # a checkpoint of Lightning's EarlyStopping: its best is still the initial infinity until a value improved
        self.seen_first = state_dict.get("seen_first", bool(torch.isfinite(torch.as_tensor(self.best_score))))


class RestoreBestWeights(Callback):
    """Keras's `EarlyStopping(restore_best_weights=True)`: at the end of training, put back the weights of the
    epoch with the best monitored value (Lightning's EarlyStopping only stops).

    Keras restores them whenever training ends with a best epoch on record, stopped early or not.
    """

    def __init__(self, monitor: str = "val_loss", mode: str = "min"):
        super().__init__()
        self.monitor, self.mode = monitor, mode
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.best_state: dict | None = None

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.monitor])
        better = self.best is None or (value < self.best if self.mode == "min" else value > self.best)
        if better:
            self.best, self.best_epoch = value, trainer.current_epoch + 1
            self.best_state = copy.deepcopy({k: v.detach().clone() for k, v in pl_module.state_dict().items()})

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.best_state is not None:
            pl_module.load_state_dict(self.best_state)
            if trainer.is_global_zero:
                print(f"Restoring model weights from the end of the best epoch: {self.best_epoch}.")

    def state_dict(self) -> dict:
        # the weights too: a run resumed after its best epoch must still end on them
        return {"best": self.best, "best_epoch": self.best_epoch, "best_state": self.best_state}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best, self.best_epoch = state_dict.get("best"), state_dict.get("best_epoch")
        self.best_state = state_dict.get("best_state")


class KerasProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar showing what Keras's `Progbar` shows: the epoch's running mean loss and accuracy, redrawn
    at most every `interval` seconds (Keras: 0.05 s) and at the end of each epoch.

    Lightning's bar redraws after every `refresh_rate` batches and, each time, reads every logged metric back as a
    Python number; at refresh_rate 1 that cost about 3% of a 35 ms CPU step of `cnn` (BENCHMARKS.md) and, on a GPU,
    would wait for the device once per batch. The running means come from the module's own epoch accumulators
    (`train_loss`, `train_acc`: torchmetrics `MeanMetric`s), read on this process only, so nothing is synchronized.
    """

    def __init__(self, interval: float = 0.1, leave: bool = False):
        super().__init__(refresh_rate=1, leave=leave)
        self.interval = interval
        self._last_draw = float("-inf")

    def _should_update(self, current: int, total: int) -> bool:
        if not self.is_enabled:
            return False
        now = time.monotonic()
        if current == total or now - self._last_draw >= self.interval:
            self._last_draw = now
            return True
        return False

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        for name in ("train_loss", "train_acc"):
            metric = getattr(pl_module, name, None)
            # a MeanMetric's local state: weighted sum and total weight (compute() would sync across processes)
            if metric is not None and getattr(metric, "update_count", 0) and float(metric.weight) > 0:
                metrics[name.removeprefix("train_")] = f"{float(metric.mean_value / metric.weight):.4f}"
        return metrics
