"""`parity train MODEL --framework torch`: a tutorial recipe run through Lightning (twin of `tf_ref/train.py`).

The same `parity.catalog.Recipe` the TF side reads is turned into a `MNISTDataModule`, a `ClassifierModule` and
a `Trainer`; the run directory, history file and TensorBoard tags are the TF side's (see `parity.runs`).
The YAML files under `configs/` describe the same runs for `python -m torch_impl.cli fit --config ...`.
"""

from __future__ import annotations

import dataclasses
import time

import lightning as L
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from parity.catalog import Recipe
from parity.runs import run_dir
from torch_impl.callbacks import HistoryWriter, RestoreBestWeights
from torch_impl.datamodule import MNISTDataModule
from torch_impl.lightning_module import ClassifierModule


def build(model_name: str, recipe: Recipe, *, seed: int = 0, data_dir=None, limit_train: int | None = None,
          augment: str | None = None) -> tuple[ClassifierModule, MNISTDataModule]:
    datamodule = MNISTDataModule(
        dataset=recipe.dataset, split=recipe.split, batch_size=recipe.batch_size, scale=recipe.scale,
        shuffle=recipe.shuffle, drop_last=recipe.drop_last, augment=augment or recipe.augment,
        shift_low=recipe.shift_low, shift_high=recipe.shift_high, data_dir=data_dir, limit_train=limit_train,
        seed=seed,
    )
    module = ClassifierModule(
        model_name=model_name, members=recipe.members, optimizer=recipe.optimizer, lr=recipe.lr,
        epsilon=recipe.epsilon, lr_decay_rate=recipe.lr_decay_rate, lr_decay_epochs=recipe.lr_decay_epochs,
        train_acc_after_step=recipe.loop == "tape",
    )
    return module, datamodule


def train(model_name: str, recipe: Recipe, *, seed: int = 0, out=None, data_dir=None, progress: bool = True,
          limit_train: int | None = None, resume: bool = False, deterministic: bool = False,
          augment: str | None = None, trainer_kwargs: dict | None = None) -> dict:
    """Train `model_name` with `recipe`; returns the history dict (also written to the run directory)."""
    L.seed_everything(seed, workers=True, verbose=False)
    directory = run_dir(out, model_name, "torch", seed)
    module, datamodule = build(model_name, recipe, seed=seed, data_dir=data_dir, limit_train=limit_train,
                               augment=augment)
    history = HistoryWriter(str(directory), model_name=model_name, seed=seed, recipe=dataclasses.asdict(recipe))
    callbacks = [
        history,
        ModelCheckpoint(dirpath=directory / "checkpoints", filename="epoch{epoch:03d}", auto_insert_metric_name=False,
                        save_last=True, save_top_k=-1 if recipe.epochs <= 20 else 3,
                        monitor=None if recipe.epochs <= 20 else "test_acc", mode="max"),
        LearningRateMonitor(logging_interval="epoch"),
    ]
    if recipe.early_stopping_patience:
        # Keras's EarlyStopping(patience=10, restore_best_weights=True) on val_loss
        callbacks += [EarlyStopping(monitor="val_loss", patience=recipe.early_stopping_patience, mode="min"),
                      RestoreBestWeights(monitor="val_loss", mode="min")]
    trainer = L.Trainer(
        max_epochs=recipe.epochs,
        accelerator="auto",
        devices=1,
        callbacks=callbacks,
        logger=[TensorBoardLogger(directory, name="tensorboard", version="lightning"),
                CSVLogger(directory, name="csv", version="")],
        enable_progress_bar=progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=deterministic,
        **(trainer_kwargs or {}),
    )
    ckpt_path = "last" if resume and (directory / "checkpoints" / "last.ckpt").exists() else None
    started = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    train_seconds = time.perf_counter() - started
    module.reset_epoch_metrics()
    trainer.test(module, datamodule=datamodule, verbose=False)  # the final (for 003: the restored best) weights
    test = module.epoch_metrics(reset=True)
    history.history.finish(test_loss=test.get("test_loss", float("nan")), test_acc=test.get("test_acc", float("nan")),
                           train_seconds=train_seconds)
    result = history.history.as_dict()
    result["models"] = [module]
    return result
