"""LightningCLI entry point: every hyperparameter comes from the typed `__init__` arguments of
`ClassifierModule` and `MNISTDataModule`, and each tutorial's recipe is a YAML file under `configs/`.

    python -m torch_impl.cli fit --config configs/tut001_cnn.yaml
    python -m torch_impl.cli fit --config configs/tut001_cnn.yaml --trainer.fast_dev_run=true
    python -m torch_impl.cli fit --config configs/tut001_cnn.yaml --print_config
    python -m torch_impl.cli fit --config configs/tut001_best.yaml --model.ensemble_mode=members --trainer.devices=4

`--model.ensemble_mode` selects how an ensemble trains: "loop" (the tutorial's), "vectorized" (all members in one
pass) or "members" (member-parallel: each member is a run of its own with this config, `members=1` and the
member's seed, spread over the devices; rank 0 then assembles and tests the ensemble). With `trainer.devices` /
`trainer.num_nodes` > 1 the first two train data-parallel under DDP.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.strategies import DDPStrategy

from parity.catalog import get_spec
from parity.runs import History, member_seed
from torch_impl.callbacks import EpochSeed, HistoryWriter, KerasProgressBar
from torch_impl.cpu_tuning import keep_freed_memory, tensorboard_without_tensorflow
from torch_impl.datamodule import MNISTDataModule
from torch_impl.distributed import (KerasSyncBatchNorm, has_batchnorm, launched_rank, members_of_rank,
                                   release_process_group, share_cpu_cores, single_process_rank)
from torch_impl.lightning_module import ClassifierModule
from torch_impl.train import (clear_member, evaluate_ensemble, finish_member, load_members, member_dir,
                              wait_for_members)


class ParityCLI(LightningCLI):
    """LightningCLI whose Trainer logs to TensorBoard and CSV unless the config names its loggers, shows
    `KerasProgressBar` (the epoch's running loss and accuracy, redrawn on a timer) unless the config names its own
    progress bar or sets `trainer.enable_progress_bar: false`, and seeds dropout and augmentation per process and
    epoch (`EpochSeed`) from `seed_everything`, which also seeds the data order unless `data.seed` is given, and
    writes `history.json` / `history.csv` and the shared TensorBoard tags (`HistoryWriter`) into the run's log
    directory, as `parity train` does. The Trainer defaults to
    `use_distributed_sampler: false`: the datamodule splits each global batch across DDP processes itself
    (`GlobalBatchSampler`), and Lightning's DistributedSampler would replace that sampler and break it. Under DDP
    it adds what `parity train` adds where the config leaves it open (`_distributed_defaults`): Keras-semantics
    synchronized BatchNorm, and `find_unused_parameters` for a looped ensemble."""

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
        if kwargs.get("logger", config.get("logger")) in (None, True):
            # Lightning's default TensorBoard logger and, as `parity train` has, a CSV logger beside it:
            # lightning_logs/version_<n>/ holds the event files, lightning_logs/version_<n>/csv/metrics.csv
            root = config.get("default_root_dir") or os.getcwd()
            board = TensorBoardLogger(root, version=SLURMEnvironment.job_id())
            version = board.version if isinstance(board.version, str) else f"version_{board.version}"
            kwargs["logger"] = [board, CSVLogger(root, name=board.name, version=f"{version}/csv")]
        trainer = super().instantiate_trainer(**kwargs)
        self._complete_ddp(trainer)
        if not any(isinstance(c, HistoryWriter) for c in trainer.callbacks):
            # history.json / history.csv and the TensorBoard tags `parity train` writes for both frameworks, in the
            # run's log directory (lightning_logs/version_<n>), so CLI runs overlay TF runs too
            directory = trainer.log_dir or trainer.default_root_dir
            hparams = {**dict(self.model.hparams), **dict(self.datamodule.hparams)} if self.datamodule else dict(
                self.model.hparams)
            trainer.callbacks.append(HistoryWriter(directory, model_name=self.model.hparams.model_name,
                                                   seed=seed or 0, recipe=hparams))
        return trainer

    def _complete_ddp(self, trainer: Trainer) -> None:
        """What `parity train` sets by itself under DDP, where the config leaves it open: Keras-semantics synchronized
        BatchNorm (`KerasSyncBatchNorm`) for models with BatchNorm, unless the config names a layer sync (a plugin or
        `sync_batchnorm`); and `find_unused_parameters=True` for a looped ensemble (it backpropagates one member at a
        time), unless the config's strategy sets it. Set on the Trainer's DDP strategy before anything runs (the
        strategy keeps both as attributes until `fit` sets the model up), so a strategy given as an object keeps
        everything else the config gave it."""
        strategy = trainer.strategy
        if trainer.world_size <= 1 or not isinstance(strategy, DDPStrategy) or self.model is None:
            return
        if getattr(strategy, "_layer_sync", None) is None and has_batchnorm(self.model):
            strategy._layer_sync = KerasSyncBatchNorm()
        if not self.model.automatic_optimization and isinstance(getattr(strategy, "_ddp_kwargs", None), dict):
            strategy._ddp_kwargs.setdefault("find_unused_parameters", True)

    # ---------------------------------------------------------------------------------- member-parallel
    def fit(self, model: ClassifierModule, datamodule=None, ckpt_path=None, **kwargs) -> None:
        """`Trainer.fit`, or for `model.ensemble_mode=members` member-parallel training: member k is trained by
        process k % P as a run of this same config with `members=1`, the member's seeds (`parity.runs.member_seed`,
        as `parity train --ensemble-mode members`) and one device, in `<default_root_dir>/members/member<k>/`;
        process 0 then loads every member's final weights into `model`, tests the ensemble, and writes
        `checkpoints/ensemble.ckpt` and `history.json` into `default_root_dir`. Under torchrun or srun the P
        processes are the launched ones (WORLD_SIZE / SLURM_NTASKS); otherwise, with `trainer.devices` x
        `trainer.num_nodes` > 1 on one node, one process per device is spawned here (no more than the members)."""
        if model.hparams.ensemble_mode != "members" or model.hparams.members < 2:
            self.trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, **kwargs)
            return
        if ckpt_path is not None:
            raise ValueError("--ckpt_path does not resume a member-parallel run (every member has its own "
                             "checkpoints); resume one with `parity train MODEL --ensemble-mode members --resume`")
        root = Path(self.trainer.default_root_dir)
        # each member's run: this config as parsed (the command line, config files and defaults), less the
        # subcommand's own options (ckpt_path, weights_only, ...), with the member's overrides (`_fit_members`)
        parsed = self.config[self.subcommand]
        config = parsed.clone()
        for key in list(parsed.keys()):
            if key.split(".")[0] not in _RUN_KEYS:
                config.pop(key, None)
        seed = self._seed() or 0
        cuda = self.trainer.strategy.root_device.type == "cuda"
        plan = {"config": config.as_dict(), "root": str(root), "members": model.hparams.members,
                "member_name": get_spec(model.hparams.model_name).member or model.hparams.model_name, "seed": seed,
                "data_seed": config.get("data.seed") if config.get("data.seed") is not None else seed,
                "device_ids": list(self.trainer.device_ids) if cuda else None}
        layout = launched_rank()
        world = self.trainer.num_devices * self.trainer.num_nodes
        if layout is not None:
            rank, world, local_rank = layout
            _fit_members(rank, world, local_rank, plan, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
            if rank != 0:
                return
            wait_for_members(root, plan["members"])
        elif world > 1:
            if self.trainer.num_nodes > 1:
                raise ValueError("member-parallel training across nodes is launched by srun or torchrun, one "
                                 "process per device (scripts/slurm_ensemble.sbatch)")
            processes = min(world, plan["members"])
            torch.multiprocessing.start_processes(_spawned_member_worker, args=(processes, plan), nprocs=processes,
                                                  start_method="spawn")
        else:
            _fit_members(0, 1, 0, plan, 1)
        load_members(model, root)
        test = evaluate_ensemble(model, datamodule, root, accelerator="gpu" if cuda else "cpu",
                                 devices=plan["device_ids"][:1] if cuda else 1, precision=self.trainer.precision)
        recipe = {**dict(model.hparams), **(dict(datamodule.hparams) if datamodule is not None else {})}
        History(root, model.hparams.model_name, "torch", recipe, seed).finish(
            **{k: v for k, v in test.items() if k.startswith("test_")})
        for key, value in sorted(test.items()):
            print(f"{key}: {value:.4f}")


_RUN_KEYS = {"seed_everything", "trainer", "model", "data", "optimizer", "lr_scheduler"}  # a run without subcommand


def _spawned_member_worker(rank: int, world: int, plan: dict) -> None:
    _fit_members(rank, world, rank, plan, world)


def _fit_members(rank: int, world: int, local_rank: int, plan: dict, local_world: int) -> None:
    """Train this process's members, each a run of the CLI's config with `members=1` (see `ParityCLI.fit`)."""
    cuda = plan["device_ids"] is not None
    if local_world > 1 and not cuda:
        share_cpu_cores(local_world)
    mine = members_of_rank(plan["members"], rank, world)
    for k in mine:  # before any training: process 0 must not take an earlier run's member for this run's
        clear_member(Path(plan["root"]), k)
    for k in mine:
        target = member_dir(Path(plan["root"]), k)
        config = copy.deepcopy(plan["config"])
        config["seed_everything"] = member_seed(plan["seed"], k)
        config["data"]["seed"] = member_seed(plan["data_seed"], k)
        config["model"].update(model_name=plan["member_name"], members=1, ensemble_mode="loop")
        config["trainer"].update(devices=[plan["device_ids"][local_rank]] if cuda else 1, num_nodes=1,
                                 strategy="auto", default_root_dir=str(target))
        _own_directories(config["trainer"], target)
        with single_process_rank():  # a member's run logs and checkpoints as the one process it is
            cli = main(config, run=False)
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        # the member as its run ended (with Keras-style early stopping: the restored best weights)
        finish_member(Path(plan["root"]), k, cli.model)


def _own_directories(trainer: dict, target: Path) -> None:
    """A member's run writes under its own directory: a logger's `save_dir` and a ModelCheckpoint's `dirpath` named
    in the config (shared by every member's run otherwise, which would mix their logs and overwrite each other's
    checkpoints) move into `target`, keeping their last path component."""
    for key, option in (("logger", "save_dir"), ("callbacks", "dirpath")):
        entries = trainer.get(key)
        for entry in entries if isinstance(entries, list) else [entries]:
            init_args = entry.get("init_args") if isinstance(entry, dict) else None
            if isinstance(init_args, dict) and init_args.get(option):
                init_args[option] = str(target / Path(init_args[option]).name)


def main(args=None, run: bool = True) -> LightningCLI:
    keep_freed_memory()  # CPU speed only (torch_impl/cpu_tuning.py)
    tensorboard_without_tensorflow()  # Lightning's TensorBoard logger would import TensorFlow where it is installed
    cli = ParityCLI(ClassifierModule, MNISTDataModule, args=args, run=run, seed_everything_default=0,
                    trainer_defaults={"use_distributed_sampler": False}, save_config_kwargs={"overwrite": True})
    if run and cli.trainer.world_size > 1:
        release_process_group()  # every DDP process, once its subcommand is done
    return cli


if __name__ == "__main__":
    main()
