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

import os
import sys
from pathlib import Path

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.layer_sync import LayerSync
from lightning.pytorch.strategies import DDPStrategy

from parity.catalog import get_spec
from parity.runs import History, member_seed
from torch_impl.callbacks import EpochSeed, HistoryWriter, KerasProgressBar
from torch_impl.cpu_tuning import keep_freed_memory, tensorboard_without_tensorflow
from torch_impl.datamodule import MNISTDataModule
from torch_impl.distributed import KerasSyncBatchNorm, has_batchnorm, launched_rank, members_of_rank
from torch_impl.lightning_module import ClassifierModule
from torch_impl.train import evaluate_ensemble, load_members, member_dir, wait_for_members


class ParityCLI(LightningCLI):
    """LightningCLI whose Trainer shows `KerasProgressBar` (the epoch's running loss and accuracy, redrawn on a
    timer) unless the config names its own progress bar or sets `trainer.enable_progress_bar: false`, and seeds
    dropout and augmentation per process and epoch (`EpochSeed`) from `seed_everything`, which also seeds the data
    order unless `data.seed` is given, and writes `history.json` / `history.csv` and the shared TensorBoard tags
    (`HistoryWriter`) into the run's log directory, as `parity train` does. The Trainer defaults to
    `use_distributed_sampler: false`: the datamodule splits each global batch across DDP processes itself
    (`GlobalBatchSampler`), and Lightning's DistributedSampler would replace that sampler and break it. Under DDP
    it adds what `parity train` adds where the config leaves it open (`_distributed_defaults`): Keras-semantics
    synchronized BatchNorm, and `find_unused_parameters` for a looped ensemble."""

    def _seed(self) -> int | None:
        """`seed_everything` as the int Lightning seeded with (it replaces `true` by the seed it drew); None if off."""
        seed = self._get(self.config, "seed_everything")
        return seed if isinstance(seed, int) and not isinstance(seed, bool) else None

    def parse_arguments(self, parser, args) -> None:
        self.given_arguments = list(sys.argv[1:] if args is None else args) if not isinstance(args, dict) else args
        super().parse_arguments(parser, args)

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
        kwargs = {key: value for key, value in kwargs.items() if key != "callbacks"}
        trainer = super().instantiate_trainer(**kwargs, callbacks=list(callbacks))
        distributed = self._distributed_defaults(trainer, config)
        if distributed:  # the same Trainer again, with what DDP needs for this model
            trainer = super().instantiate_trainer(**kwargs, **distributed, callbacks=list(callbacks))
        if not any(isinstance(c, HistoryWriter) for c in trainer.callbacks):
            # history.json / history.csv and the TensorBoard tags `parity train` writes for both frameworks, in the
            # run's log directory (lightning_logs/version_<n>), so CLI runs overlay TF runs too
            directory = trainer.log_dir or trainer.default_root_dir
            hparams = {**dict(self.model.hparams), **dict(self.datamodule.hparams)} if self.datamodule else dict(
                self.model.hparams)
            trainer.callbacks.append(HistoryWriter(directory, model_name=self.model.hparams.model_name,
                                                   seed=seed or 0, recipe=hparams))
        return trainer

    def _distributed_defaults(self, trainer: Trainer, config: dict) -> dict:
        """What `parity train` sets by itself under DDP, where the config leaves it open: Keras-semantics synchronized
        BatchNorm (`KerasSyncBatchNorm`) for models with BatchNorm, unless the config names a layer sync or
        `sync_batchnorm`; and `find_unused_parameters` for a looped ensemble (it backpropagates one member at a
        time), unless the config names a strategy other than "auto" / "ddp"."""
        if trainer.world_size <= 1 or not isinstance(trainer.strategy, DDPStrategy) or self.model is None:
            return {}
        extra = {}
        plugins = config.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if (has_batchnorm(self.model) and not config.get("sync_batchnorm")
                and not any(isinstance(p, LayerSync) for p in plugins)):
            extra["plugins"] = [*plugins, KerasSyncBatchNorm()]
        if not self.model.automatic_optimization and config.get("strategy", "auto") in ("auto", "ddp"):
            extra["strategy"] = DDPStrategy(find_unused_parameters=True)
        return extra

    # ---------------------------------------------------------------------------------- member-parallel
    def fit(self, model: ClassifierModule, datamodule=None, ckpt_path=None, **kwargs) -> None:
        """`Trainer.fit`, or for `model.ensemble_mode=members` member-parallel training: member k is trained by
        rank k % (devices x nodes) as a run of this same config with `members=1`, the member's seeds
        (`parity.runs.member_seed`, as `parity train --ensemble-mode members`) and one device, in
        `<default_root_dir>/members/member<k>/`; rank 0 then loads every member's final weights into `model`,
        tests the ensemble, and writes `checkpoints/ensemble.ckpt` and `history.json` into `default_root_dir`.
        Several devices without torchrun or srun: one process per device is spawned here."""
        if model.hparams.ensemble_mode != "members" or model.hparams.members < 2:
            self.trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, **kwargs)
            return
        if ckpt_path is not None:
            raise ValueError("--ckpt_path does not resume a member-parallel run (every member has its own "
                             "checkpoints); resume one with `parity train MODEL --ensemble-mode members --resume`")
        if isinstance(self.given_arguments, dict):
            raise ValueError("member-parallel training from the LightningCLI needs command-line arguments, not a dict")
        arguments = list(self.given_arguments)
        arguments.remove(self.subcommand)  # each member's run is built without a subcommand (run=False)
        root = Path(self.trainer.default_root_dir)
        config = self.config[self.subcommand]
        seed = self._seed() or 0
        plan = {"arguments": arguments, "root": str(root), "member_name": get_spec(model.hparams.model_name).member
                or model.hparams.model_name, "members": model.hparams.members, "seed": seed,
                "data_seed": config.get("data.seed") if config.get("data.seed") is not None else seed,
                "cuda": self.trainer.strategy.root_device.type == "cuda"}
        layout = launched_rank()
        world = self.trainer.num_devices * self.trainer.num_nodes
        if layout is not None:
            _fit_members(layout[0], layout[1], layout[2], plan)
            if layout[0] != 0:
                return
            wait_for_members(root, plan["members"])
        elif world > 1:
            if self.trainer.num_nodes > 1:
                raise ValueError("member-parallel training across nodes is launched by srun or torchrun, one "
                                 "process per device (scripts/slurm_ensemble.sbatch)")
            torch.multiprocessing.start_processes(_spawned_member_worker, args=(world, plan), nprocs=world,
                                                  start_method="spawn")
        else:
            _fit_members(0, 1, 0, plan)
        load_members(model, root)
        test = evaluate_ensemble(model, datamodule, root, accelerator="gpu" if plan["cuda"] else "cpu")
        recipe = {**dict(model.hparams), **(dict(datamodule.hparams) if datamodule is not None else {})}
        History(root, model.hparams.model_name, "torch", recipe, seed).finish(
            **{k: v for k, v in test.items() if k.startswith("test_")})
        for key, value in sorted(test.items()):
            print(f"{key}: {value:.4f}")


def _spawned_member_worker(rank: int, world: int, plan: dict) -> None:
    _fit_members(rank, world, rank, plan)


def _fit_members(rank: int, world: int, local_rank: int, plan: dict) -> None:
    """Train this rank's members, each a run of the CLI's config with `members=1` (see `ParityCLI.fit`)."""
    if world > 1 and not plan["cuda"]:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # the processes share the CPU cores
    for k in members_of_rank(plan["members"], rank, world):
        target = member_dir(Path(plan["root"]), k)
        (target / "done").unlink(missing_ok=True)
        overrides = [f"--seed_everything={member_seed(plan['seed'], k)}",
                     f"--data.seed={member_seed(plan['data_seed'], k)}",
                     f"--model.model_name={plan['member_name']}", "--model.members=1", "--model.ensemble_mode=loop",
                     f"--trainer.devices=[{local_rank}]" if plan["cuda"] else "--trainer.devices=1",
                     "--trainer.num_nodes=1", "--trainer.strategy=auto", f"--trainer.default_root_dir={target}"]
        cli = main([*plan["arguments"], *overrides], run=False)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        # the member as its run ended (with Keras-style early stopping: the restored best weights)
        torch.save(cli.model.state_dict(), target / "final.pt")
        (target / "done").write_text("ok\n")


def main(args=None, run: bool = True) -> LightningCLI:
    keep_freed_memory()  # CPU speed only (torch_impl/cpu_tuning.py)
    tensorboard_without_tensorflow()  # Lightning's TensorBoard logger would import TensorFlow where it is installed
    return ParityCLI(ClassifierModule, MNISTDataModule, args=args, run=run, seed_everything_default=0,
                     trainer_defaults={"use_distributed_sampler": False}, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
