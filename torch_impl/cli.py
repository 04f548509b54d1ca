"""LightningCLI entry point: every hyperparameter comes from the typed `__init__` arguments of
`ClassifierModule` and `MNISTDataModule`, and each tutorial's recipe is a YAML file under `configs/`.

    python -m torch_impl.cli fit --config configs/tut001_cnn.yaml
    python -m torch_impl.cli fit --config configs/tut001_cnn.yaml --trainer.fast_dev_run=true
    python -m torch_impl.cli fit --config configs/tut001_cnn.yaml --print_config
"""

from __future__ import annotations

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningCLI

from torch_impl.callbacks import EpochSeed, HistoryWriter, KerasProgressBar
from torch_impl.cpu_tuning import keep_freed_memory, tensorboard_without_tensorflow
from torch_impl.datamodule import MNISTDataModule
from torch_impl.lightning_module import ClassifierModule


class ParityCLI(LightningCLI):
    """LightningCLI whose Trainer shows `KerasProgressBar` (the epoch's running loss and accuracy, redrawn on a
    timer) unless the config names its own progress bar or sets `trainer.enable_progress_bar: false`, and seeds
    dropout and augmentation per process and epoch (`EpochSeed`) from `seed_everything`, which also seeds the data
    order unless `data.seed` is given, and writes `history.json` / `history.csv` and the shared TensorBoard tags
    (`HistoryWriter`) into the run's log directory, as `parity train` does. The Trainer defaults to
    `use_distributed_sampler: false`: the datamodule splits each global batch across DDP processes itself
    (`GlobalBatchSampler`), and Lightning's DistributedSampler would replace that sampler and break it."""

    def _seed(self) -> int | None:
        """`seed_everything` as the int Lightning seeded with (it replaces `true` by the seed it drew); None if off."""
        seed = self._get(self.config, "seed_everything")
        return seed if isinstance(seed, int) and not isinstance(seed, bool) else None

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.get("data.seed") is None and self._seed() is not None:
            config["data.seed"] = self._seed()

    def instantiate_trainer(self, **kwargs) -> Trainer:
        config = self._get(self.config_init, "trainer", default={})
        callbacks = kwargs.get("callbacks", config.get("callbacks")) or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks = [KerasProgressBar(), *callbacks]
        seed = self._seed()
        if seed is not None and not any(isinstance(c, EpochSeed) for c in callbacks):
            callbacks = [*callbacks, EpochSeed(seed)]  # per-rank, per-epoch dropout and augmentation draws
        kwargs["callbacks"] = callbacks
        trainer = super().instantiate_trainer(**kwargs)
        if not any(isinstance(c, HistoryWriter) for c in trainer.callbacks):
            # history.json / history.csv and the TensorBoard tags `parity train` writes for both frameworks, in the
            # run's log directory (lightning_logs/version_<n>), so CLI runs overlay TF runs too
            directory = trainer.log_dir or trainer.default_root_dir
            hparams = {**dict(self.model.hparams), **dict(self.datamodule.hparams)} if self.datamodule else dict(
                self.model.hparams)
            trainer.callbacks.append(HistoryWriter(directory, model_name=self.model.hparams.model_name,
                                                   seed=seed or 0, recipe=hparams))
        return trainer


def main(args=None, run: bool = True) -> LightningCLI:
    keep_freed_memory()  # CPU speed only (torch_impl/cpu_tuning.py)
    tensorboard_without_tensorflow()  # Lightning's TensorBoard logger would import TensorFlow where it is installed
    return ParityCLI(ClassifierModule, MNISTDataModule, args=args, run=run, seed_everything_default=0,
                     trainer_defaults={"use_distributed_sampler": False}, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
