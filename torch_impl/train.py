"""`parity train MODEL --framework torch`: a tutorial recipe run through Lightning (twin of `tf_ref/train.py`).

The same `parity.catalog.Recipe` the TF side reads is turned into a `MNISTDataModule`, a `ClassifierModule` and
a `Trainer`; the run directory, history file and TensorBoard tags are the TF side's (see `parity.runs`).
The YAML files under `configs/` describe the same runs for `python -m torch_impl.cli fit --config ...`.

Scaling out (see `torch_impl.distributed`): `devices` x `num_nodes` > 1 trains data-parallel under DDP (the recipe's
batch is the global batch; BatchNorm statistics are synchronized with Keras's semantics); `ensemble_mode`
"vectorized" runs all members in one pass; "members" trains member k on process k % P (P processes: spawned, or
launched by torchrun / srun; one process trains them one after another) on the full data and assembles the ensemble
from their final weights.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy

from parity.catalog import Recipe, get_spec
from parity.runs import History, member_seed, run_dir
from torch_impl.callbacks import (EpochSeed, HistoryWriter, KerasEarlyStopping, KerasProgressBar, RestoreBestWeights,
                                  SetAsideCheckpoints)
from torch_impl.datamodule import MNISTDataModule
from torch_impl.cpu_tuning import keep_freed_memory, tensorboard_without_tensorflow
from torch_impl.distributed import (KerasSyncBatchNorm, has_batchnorm, launched_rank, members_of_rank,
                                   release_process_group, share_cpu_cores, single_process_rank)
from torch_impl.lightning_module import ClassifierModule

ENSEMBLE_MODES = ("loop", "vectorized", "members")


def build(model_name: str, recipe: Recipe, *, seed: int = 0, data_dir=None, limit_train: int | None = None,
          augment: str | None = None, ensemble_mode: str = "loop") -> tuple[ClassifierModule, MNISTDataModule]:
    datamodule = MNISTDataModule(
        dataset=recipe.dataset, split=recipe.split, batch_size=recipe.batch_size,
        scale=recipe.scale, shuffle=recipe.shuffle, drop_last=recipe.drop_last, augment=augment or recipe.augment,
        shift_low=recipe.shift_low, shift_high=recipe.shift_high, data_dir=data_dir, limit_train=limit_train,
        seed=seed,
    )
    module = ClassifierModule(**module_arguments(model_name, recipe), ensemble_mode=ensemble_mode)
    return module, datamodule


def module_arguments(model_name: str, recipe: Recipe) -> dict:
    """The `ClassifierModule` arguments of `recipe` (also what `parity convert` writes into a checkpoint)."""
    return {"model_name": model_name, "members": recipe.members, "optimizer": recipe.optimizer, "lr": recipe.lr,
            "epsilon": recipe.epsilon, "lr_decay_rate": recipe.lr_decay_rate,
            "lr_decay_epochs": recipe.lr_decay_epochs, "shared_optimizer": recipe.shared_optimizer,
            # tutorial 001's loop: eval-mode train accuracy and a second training-mode pass after each update
            "train_acc_after_step": recipe.loop == "tape", "second_pass": recipe.loop == "tape"}


def epoch_checkpoints(recipe: Recipe, dirpath: Path) -> ModelCheckpoint:
    """Every epoch's checkpoint for short recipes; for long ones `last.ckpt` and the 3 best by validation accuracy
    (never by test accuracy: that would select on the test set), or the latest alone where the split has no
    validation set."""
    if recipe.epochs <= 20:
        keep = {"save_top_k": -1, "monitor": None}
    elif recipe.split != "full":  # see parity.data.SPLITS: the other splits hold out a validation set
        keep = {"save_top_k": 3, "monitor": "val_acc", "mode": "max"}
    else:
        keep = {"save_top_k": 1, "monitor": None}
    return ModelCheckpoint(dirpath=dirpath, filename="epoch{epoch:03d}", auto_insert_metric_name=False,
                           save_last=True, **keep)


def resume_checkpoint(directory: Path) -> Path | None:
    """The newest of the run's `checkpoints/last.ckpt` and the `checkpoints/hpc_ckpt_<n>.ckpt` files Lightning
    writes when SLURM signals a requeue (the Trainer's default_root_dir is the checkpoint directory).

    A requeue signal can come mid-epoch, after the last epoch's checkpoint. Resuming from such a file restores the
    weights, optimizer and step counter exactly, but not the position in the epoch's data order (the batch sampler
    keeps no state, and Lightning replays the epoch's order from its start): the rest of that epoch sees its first
    batches again instead of its last ones. Later epochs are unaffected."""
    checkpoints = Path(directory) / "checkpoints"
    existing = [path for path in (checkpoints / "last.ckpt", *checkpoints.glob("hpc_ckpt_*.ckpt")) if path.is_file()]
    return max(existing, key=lambda path: path.stat().st_mtime_ns) if existing else None


def _set_aside_slurm_checkpoints(directory: Path) -> None:
    """A new run must not start from an earlier run's SLURM checkpoint: under SLURM, Lightning resumes from any
    `hpc_ckpt_<n>.ckpt` in the default_root_dir when no checkpoint is named. Moved, not deleted."""
    stale = sorted((Path(directory) / "checkpoints").glob("hpc_ckpt_*.ckpt"))
    if not stale:
        return
    # every process of a distributed run does this before Lightning looks for the files; the folder is named after
    # the files (not the clock), so all processes agree on it
    mtimes = []
    for path in stale:
        try:
            mtimes.append(path.stat().st_mtime)
        except FileNotFoundError:  # another process moved it first
            pass
    if not mtimes:
        return
    newest = time.strftime("%Y%m%dT%H%M%S", time.localtime(max(mtimes)))
    target = Path(directory) / f"hpc_checkpoints.replaced-{newest}"
    target.mkdir(parents=True, exist_ok=True)
    for path in stale:
        try:
            path.rename(target / path.name)
        except FileNotFoundError:  # another process moved it first
            pass
    print(f"a new run in {directory}: the earlier run's SLURM checkpoints are now in {target}", flush=True)


def _csv_version(directory: Path, resuming: bool) -> str:
    """Lightning's CSV log of the run: `csv/metrics.csv`, and for each resumed segment `csv/resume<k>/metrics.csv`
    (Lightning's CSVLogger deletes the metrics file it finds in its directory; history.json and history.csv, the
    project's own, continue in place)."""
    if not resuming or not (directory / "csv" / "metrics.csv").exists():
        return ""
    k = 1
    while (directory / "csv" / f"resume{k}").exists():
        k += 1
    return f"resume{k}"


def train(model_name: str, recipe: Recipe, *, seed: int = 0, out=None, data_dir=None, progress: bool = True,
          limit_train: int | None = None, resume: bool = False, deterministic: bool = False,
          augment: str | None = None, accelerator: str = "auto", devices: int = 1, num_nodes: int = 1,
          ensemble_mode: str = "loop", precision: str | None = None, trainer_kwargs: dict | None = None) -> dict:
    """Train `model_name` with `recipe`; returns the history dict (also written to the run directory)."""
    if ensemble_mode not in ENSEMBLE_MODES:
        raise ValueError(f"unknown ensemble mode {ensemble_mode!r}; choose one of: {', '.join(ENSEMBLE_MODES)}")
    if ensemble_mode != "loop" and recipe.members < 2:
        raise ValueError(f"--ensemble-mode {ensemble_mode} needs an ensemble (members > 1); "
                         f"{model_name} has {recipe.members} member(s): use --members N")
    trainer_kwargs = dict(trainer_kwargs or {}, **({"precision": precision} if precision else {}))
    if ensemble_mode == "members":
        return train_member_parallel(model_name, recipe, seed=seed, out=out, data_dir=data_dir, progress=progress,
                                     limit_train=limit_train, deterministic=deterministic, augment=augment,
                                     accelerator=accelerator, devices=devices, num_nodes=num_nodes, resume=resume,
                                     trainer_kwargs=trainer_kwargs)
    directory = run_dir(out, model_name, "torch", seed)
    return _fit(model_name, recipe, directory, seed=seed, data_dir=data_dir, progress=progress,
                limit_train=limit_train, resume=resume, deterministic=deterministic, augment=augment,
                accelerator=accelerator, devices=devices, num_nodes=num_nodes, ensemble_mode=ensemble_mode,
                trainer_kwargs=trainer_kwargs)


def _fit(model_name: str, recipe: Recipe, directory: Path, *, seed: int, data_dir, progress: bool,
         limit_train: int | None, resume: bool, deterministic: bool, augment: str | None, accelerator: str,
         devices, num_nodes: int, ensemble_mode: str, trainer_kwargs: dict | None) -> dict:
    keep_freed_memory()  # CPU speed: freed activations are reused instead of page-faulted in again (no effect on results)
    tensorboard_without_tensorflow()  # the TensorBoard logger would otherwise import TensorFlow when it is installed
    L.seed_everything(seed, workers=True, verbose=False)
    world_size = (devices if isinstance(devices, int) else len(devices)) * num_nodes
    module, datamodule = build(model_name, recipe, seed=seed, data_dir=data_dir, limit_train=limit_train,
                               augment=augment, ensemble_mode=ensemble_mode)
    history = HistoryWriter(str(directory), model_name=model_name, seed=seed, recipe=dataclasses.asdict(recipe))
    callbacks = [
        *([KerasProgressBar()] if progress else []),
        history,
        EpochSeed(seed),
        epoch_checkpoints(recipe, directory / "checkpoints"),
        LearningRateMonitor(logging_interval="epoch"),
    ]
    if recipe.early_stopping_patience:
        # Keras's EarlyStopping(patience=10, restore_best_weights=True) on val_loss
        callbacks += [KerasEarlyStopping(monitor="val_loss", patience=recipe.early_stopping_patience, mode="min"),
                      RestoreBestWeights(monitor="val_loss", mode="min")]
    ckpt_path = resume_checkpoint(directory) if resume else None
    distributed = {}
    if world_size > 1:
        # The looped ensemble backpropagates one member at a time: the others' parameters are unused in that pass.
        distributed["strategy"] = DDPStrategy(find_unused_parameters=module.automatic_optimization is False)
        if has_batchnorm(module):
            distributed["plugins"] = [KerasSyncBatchNorm()]
    trainer = L.Trainer(
        max_epochs=recipe.epochs,
        accelerator=accelerator,
        devices=devices,
        num_nodes=num_nodes,
        callbacks=callbacks,
        logger=[TensorBoardLogger(directory, name="tensorboard", version="lightning"),
                CSVLogger(directory, name="csv", version=_csv_version(directory, ckpt_path is not None))],
        enable_progress_bar=progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=deterministic,
        default_root_dir=directory / "checkpoints",  # where Lightning's SLURM requeue writes hpc_ckpt_<n>.ckpt
        use_distributed_sampler=False,  # the datamodule splits each global batch across processes itself
        **distributed,
        **(trainer_kwargs or {}),
    )
    if resume and ckpt_path is None:
        print(f"--resume: no checkpoints/last.ckpt or SLURM checkpoint in {directory}; starting a new run", flush=True)
    if ckpt_path is None:
        _set_aside_slurm_checkpoints(directory)
        trainer.callbacks.append(SetAsideCheckpoints(directory / "checkpoints"))
    started = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    train_seconds = time.perf_counter() - started
    module.reset_epoch_metrics()
    trainer.test(module, datamodule=datamodule, verbose=False)  # the final (for 003: the restored best) weights
    test = module.epoch_metrics(reset=True)  # reduced across processes
    final = {"test_loss": test.get("test_loss", float("nan")), "test_acc": test.get("test_acc", float("nan")),
             "train_seconds": train_seconds}
    if trainer.is_global_zero:
        history.history.finish(**final)
    else:
        history.history.final.update(final)
    result = history.history.as_dict()
    result["models"] = [module]
    result["is_global_zero"] = trainer.is_global_zero
    # an ensemble's member accuracies, agreement and every combine rule's accuracy (`parity train` prints them)
    result["members"] = {k: v for k, v in test.items() if k.startswith("member")}
    if trainer.world_size > 1:
        release_process_group()
    return result


# ---------------------------------------------------------------------------------------------- member-parallel
def train_member_parallel(model_name: str, recipe: Recipe, *, seed: int = 0, out=None, data_dir=None,
                          progress: bool = True, limit_train: int | None = None, deterministic: bool = False,
                          augment: str | None = None, accelerator: str = "auto", devices: int = 1,
                          num_nodes: int = 1, resume: bool = False, trainer_kwargs: dict | None = None) -> dict:
    """Each process trains its share of the members (member k on rank k % world size), each on the full data with
    its own optimizer and seed (`parity.runs.member_seed(seed, k)`); rank 0 then assembles the ensemble from the
    members' final weights into `checkpoints/ensemble.ckpt` and evaluates it.

    Under torchrun or srun every launched process takes its share; otherwise this spawns `devices` local
    processes. The members do not share an optimizer (the tutorial's shared step counter couples them), so this
    is the corrected "independent members" variant; its learning-rate schedule counts each member's own steps.
    `resume`: members that finished are kept, an interrupted member resumes from its own newest checkpoint.
    `trainer_kwargs` (e.g. `precision`) go to every member's Trainer; the ensemble is tested at the same precision.
    """
    directory = run_dir(out, model_name, "torch", seed)
    member_recipe = recipe.replace(members=1)
    kwargs = {"seed": seed, "data_dir": data_dir, "progress": progress, "limit_train": limit_train,
              "deterministic": deterministic, "augment": augment, "accelerator": accelerator, "resume": resume,
              "trainer_kwargs": dict(trainer_kwargs or {})}
    layout = launched_rank()
    started = time.perf_counter()
    if layout is not None:
        rank, world, local_rank = layout
        _train_members(rank, model_name, member_recipe, directory, recipe.members, world, local_rank, kwargs)
        if rank != 0:
            return {"is_global_zero": False}
        wait_for_members(directory, recipe.members)
    else:
        if num_nodes > 1:
            raise ValueError("member-parallel training across nodes is launched by srun or torchrun "
                             "(scripts/slurm_ensemble.sbatch); one process per device")
        world = devices if isinstance(devices, int) else len(devices)
        if world == 1:
            _train_members(0, model_name, member_recipe, directory, recipe.members, 1, 0, kwargs)
        else:
            torch.multiprocessing.start_processes(
                _spawned_worker, args=(model_name, member_recipe, directory, recipe.members, world, kwargs),
                nprocs=world, start_method="spawn")
    return assemble_members(model_name, recipe, directory, seed=seed, data_dir=data_dir, accelerator=accelerator,
                            train_seconds=time.perf_counter() - started,
                            precision=(trainer_kwargs or {}).get("precision"))


def _spawned_worker(rank, model_name, member_recipe, directory, members, world, kwargs) -> None:
    _train_members(rank, model_name, member_recipe, directory, members, world, rank, kwargs)


def member_dir(directory: Path, k: int) -> Path:
    path = Path(directory) / "members" / f"member{k}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _train_members(rank: int, model_name: str, member_recipe: Recipe, directory: Path, members: int, world: int,
                   local_rank: int, kwargs: dict) -> None:
    if world > 1 and kwargs["accelerator"] in ("cpu", "auto") and not torch.cuda.is_available():
        share_cpu_cores(world)
    member_name = get_spec(model_name).member or model_name
    todo = []
    for k in members_of_rank(members, rank, world):  # decided for all first: rank 0 waits for the others' `done`
        if kwargs["resume"] and _finished_with(member_dir(directory, k), member_recipe):
            print(f"--resume: member {k} finished this recipe before; kept", flush=True)
            continue
        clear_member(directory, k)
        todo.append(k)
    for k in todo:
        target = member_dir(directory, k)
        kw = dict(kwargs, seed=member_seed(kwargs["seed"], k))
        devices = [local_rank] if torch.cuda.is_available() and kwargs["accelerator"] != "cpu" else 1
        with single_process_rank():  # a member's run logs and checkpoints as the one process it is
            result = _fit(member_name, member_recipe, target, devices=devices, num_nodes=1,
                          ensemble_mode="loop", **kw)
        # the member as its run ended (for 003: the best epoch's weights, restored after the last checkpoint)
        finish_member(directory, k, result["models"][0])


def clear_member(directory: Path, k: int) -> None:
    """Member k is about to be trained again: its `done` marker and final weights from an earlier run go first, so
    that process 0, waiting for `done`, never assembles an earlier run's member (its checkpoints stay for
    resuming)."""
    target = member_dir(directory, k)
    (target / "done").unlink(missing_ok=True)
    (target / "final.pt").unlink(missing_ok=True)


def finish_member(directory: Path, k: int, module: ClassifierModule) -> None:
    """Member k's final weights, then its `done` marker: written last, since process 0 takes it as the signal that
    `final.pt` is complete."""
    target = member_dir(directory, k)
    torch.save(module.state_dict(), target / "final.pt")
    (target / "done").write_text("ok\n")


def _finished_with(target: Path, recipe: Recipe) -> bool:
    """Whether the member in `target` finished training with `recipe` (a resume with, e.g., more epochs continues
    it from its last checkpoint instead)."""
    if not ((target / "done").exists() and (target / "final.pt").exists() and (target / "history.json").exists()):
        return False
    recorded = json.loads((target / "history.json").read_text()).get("recipe")
    return recorded == json.loads(json.dumps(dataclasses.asdict(recipe)))


def wait_for_members(directory: Path, members: int, poll_seconds: float = 5.0) -> None:
    pending = [k for k in range(members) if not (member_dir(directory, k) / "done").exists()]
    if pending:
        print(f"rank 0: waiting for members {pending} (written by the other ranks)")
    while pending:
        time.sleep(poll_seconds)
        pending = [k for k in pending if not (member_dir(directory, k) / "done").exists()]


def assemble_members(model_name: str, recipe: Recipe, directory: Path, *, seed: int = 0, data_dir=None,
                     accelerator: str = "auto", train_seconds: float = float("nan"),
                     precision: str | None = None) -> dict:
    """The ensemble `ClassifierModule` from the members' final weights (`members/member<k>/final.pt`), evaluated on
    the test set and saved as `checkpoints/ensemble.ckpt` (it loads with `ClassifierModule.load_from_checkpoint`)."""
    module, datamodule = build(model_name, recipe, seed=seed, data_dir=data_dir)
    load_members(module, directory)
    test = evaluate_ensemble(module, datamodule, directory, accelerator=accelerator, precision=precision)
    history = History(directory, model_name, "torch", dataclasses.asdict(recipe), seed)
    history.finish(train_seconds=train_seconds, **{k: v for k, v in test.items() if k.startswith("test_")})
    result = history.as_dict()
    result.update(members={k: v for k, v in test.items() if k.startswith("member")}, models=[module],
                  is_global_zero=True)
    return result


def load_members(module: ClassifierModule, directory: Path) -> None:
    """Member k of the ensemble `module` takes the final weights member-parallel training left in
    `directory/members/member<k>/final.pt` (the state dict of a one-member `ClassifierModule`), in the dtype it
    was trained in (a float64 member stays float64; `load_state_dict` alone would round it to the module's)."""
    for k, member in enumerate(module.members):
        path = member_dir(directory, k) / "final.pt"
        if not path.exists():
            raise FileNotFoundError(f"member {k} has no final weights at {path}; train it first (its rank failed?)")
        state = torch.load(path, map_location="cpu", weights_only=True)
        prefix = "model.members.0."
        dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
        if len(dtypes) == 1:
            member.to(dtypes.pop())
        member.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})


def evaluate_ensemble(module: ClassifierModule, datamodule: MNISTDataModule, directory: Path, *,
                      accelerator: str = "auto", devices=1, precision: str | None = None) -> dict[str, float]:
    """Test metrics of the assembled ensemble (ensemble, member and combine-rule accuracies, agreement) on one
    device, at the members' training `precision` (Lightning's default if None); the ensemble is saved as
    `directory/checkpoints/ensemble.ckpt`."""
    trainer = L.Trainer(accelerator=accelerator, devices=devices, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False,
                        **({"precision": precision} if precision else {}))
    module.reset_epoch_metrics()
    with single_process_rank():
        trainer.test(module, datamodule=datamodule, verbose=False)
    test = module.epoch_metrics(reset=True)
    (directory / "checkpoints").mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(directory / "checkpoints" / "ensemble.ckpt")
    return test
