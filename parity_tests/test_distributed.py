"""Scaled-out training computes what one process computes: DDP across 2 CPU processes (gloo), Keras-semantics
synchronized BatchNorm, and member-parallel ensembles assembled from their members' checkpoints.

DDP and the spawned processes run `parity train` in subprocesses, as a user would (Lightning relaunches the
command for every rank, which cannot be done from inside pytest)."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from torch_impl.datamodule import GlobalBatchSampler
from torch_impl.distributed import (
    KerasSyncBatchNorm,
    SyncBatchNorm2d,
    convert_sync_batchnorm,
    members_of_rank,
    revert_sync_batchnorm,
)
from torch_impl.layers import BatchNorm1d, BatchNorm2d
from torch_impl.models import build_model

ROOT = Path(__file__).resolve().parents[1]

# Dropout masks are drawn per process, so no process layout can reproduce another's; everything else must match.
DRIVER = """
import sys
import torch
import torch_impl.layers
torch.nn.Dropout.forward = torch_impl.layers.Dropout.forward = lambda self, x: x
from parity.cli import main
if __name__ == "__main__":
    status = main(sys.argv[1:])
    # every process ends its DDP process group itself (one left open can abort the process at exit)
    assert not (torch.distributed.is_available() and torch.distributed.is_initialized()), "process group left open"
    sys.exit(status)
"""


def _parity_train(tmp_path: Path, out: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
    command = [sys.executable, str(driver), "train", *args, "--out", str(tmp_path / out), "--no-progress",
               "--accelerator", "cpu"]
    result = subprocess.run(command, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _last_state(tmp_path: Path, out: str, model: str) -> dict[str, torch.Tensor]:
    ckpt = torch.load(tmp_path / out / model / "torch" / "seed0" / "checkpoints" / "last.ckpt", map_location="cpu",
                      weights_only=False)
    return ckpt["state_dict"]


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("drop_last", [False, True])
def test_ranks_split_each_global_batch_of_one_process(shuffle, drop_last):
    single = GlobalBatchSampler(250, 100, shuffle=shuffle, seed=3, drop_last=drop_last)
    ranks = [GlobalBatchSampler(250, 100, shuffle=shuffle, seed=3, drop_last=drop_last, rank=r, world_size=2)
             for r in range(2)]
    for sampler in (single, *ranks):
        sampler.set_epoch(1)
    batches = list(single)
    assert len(batches) == len(single) == (2 if drop_last else 3)
    for step, (a, b) in enumerate(zip(*ranks, strict=True)):
        assert a + b == batches[step]  # the same global batch, in the same order
    seen = sorted(itertools.chain(*batches))
    assert len(seen) == len(set(seen)) == (200 if drop_last else 250)  # every image once per epoch
    assert (batches[0] != list(range(100))) == shuffle
    single.set_epoch(2)
    assert (list(single) != batches) == shuffle  # a new order each epoch, the same in every process
    with pytest.raises(ValueError, match="multiple of 3"):
        GlobalBatchSampler(250, 100, world_size=3)


def test_evaluation_batches_split_across_any_process_count():
    """An evaluation batch (1000 here) need not divide by the process count (3 here, e.g. 6 or 16 GPUs): each image is
    evaluated once by exactly one rank; the training batch keeps its rule."""
    from types import SimpleNamespace

    from torch_impl.datamodule import MNISTDataModule

    loaders = []
    for rank in range(3):
        dm = MNISTDataModule(batch_size=99, limit_train=300, eval_batch_size=1000)
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=3, training=False,
                                     strategy=SimpleNamespace(root_device=torch.device("cpu")))
        dm.setup("fit")
        loaders.append(dm.val_dataloader()[0])
        if rank == 0:
            dm.trainer.world_size = 4
            with pytest.raises(ValueError, match="multiple of 4"):
                dm.train_dataloader()
    shares = [[batch[1] for batch in loader] for loader in loaders]  # the labels each rank evaluates
    assert len({len(s) for s in shares}) == 1 == len({len(loader) for loader in loaders})  # same number of batches
    assert sorted(len(b) for b in (shares[0][0], shares[1][0], shares[2][0])) == [333, 333, 334]
    evaluated = torch.cat([b for rank_shares in zip(*shares) for b in rank_shares])
    assert torch.equal(evaluated, dm.eval_sets["test"].labels)  # every test image once, in order
    assert len(GlobalBatchSampler(2500, 1000, world_size=3, even=False)) == 3


def test_member_assignment_covers_every_member_once():
    shares = [members_of_rank(5, rank, 2) for rank in range(2)]
    assert shares == [[0, 2, 4], [1, 3]]
    assert sorted(itertools.chain(*shares)) == list(range(5))


def test_sync_batchnorm_conversion_keeps_tensors_and_single_process_numerics():
    model = build_model("bn_cnn", seed=0)
    reference = build_model("bn_cnn", seed=0)
    synced = convert_sync_batchnorm(model)
    kinds = {type(m) for m in synced.modules()}
    assert SyncBatchNorm2d in kinds and BatchNorm2d not in kinds and BatchNorm1d not in kinds
    x = torch.rand(8, 1, 28, 28)
    torch.manual_seed(1)
    out = synced(x)
    torch.manual_seed(1)
    expected = reference(x)  # no process group: the synchronized layer is the plain Keras BatchNorm
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(synced.conv1.bn.running_var, reference.conv1.bn.running_var, rtol=0, atol=0)
    reverted = revert_sync_batchnorm(synced)
    assert SyncBatchNorm2d not in {type(m) for m in reverted.modules()}
    assert reverted.conv1.bn.running_mean is synced.conv1.bn.running_mean


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process(tmp_path):
    """2 gloo processes x 50 images = the recipe's global batch of 100: after 4 batches of a 2-member `bn_cnn`
    ensemble (the tutorial's shared Adam stepped once per member, staircase decay halving the rate every 2 batches,
    BatchNorm in training mode, reshuffled order), the parameters and BN moving statistics equal one process's.

    In float64 (`--precision 64-true`): in float32 the conv biases in front of a BatchNorm have an analytically
    zero gradient (BN subtracts the batch mean), so their gradient is pure rounding noise, which Adam normalizes
    into steps of up to lr, different for any other summation order; float64 shrinks that noise below 1e-10."""
    common = ("bn_cnn", "--members", "2", "--limit-train", "400", "--epochs", "1", "--set", "augment=none",
              "--set", "lr_decay_epochs=0.5", "--precision", "64-true")
    _parity_train(tmp_path, "single", *common)
    _parity_train(tmp_path, "ddp", *common, "--devices", "2")
    single, ddp = _last_state(tmp_path, "single", "bn_cnn"), _last_state(tmp_path, "ddp", "bn_cnn")
    _assert_ddp_trained_as_one_process(single, ddp, "model.members.0.conv1.bn.running_var")


def _assert_ddp_trained_as_one_process(single: dict, ddp: dict, float64_buffer: str) -> None:
    """Two float64 runs of the 2-member `bn_cnn` ensemble: the same parameters and BN statistics to 1e-9, and trained
    (4 steps at lr 1e-3), so equality is not the initial weights'."""
    assert single.keys() == ddp.keys()
    assert single[float64_buffer].dtype == torch.float64
    for name, tensor in single.items():
        torch.testing.assert_close(ddp[name], tensor, rtol=0, atol=1e-9, msg=lambda m, n=name: f"{n}: {m}")
    initial = build_model("bn_cnn", seed=0)
    moved = (single["model.members.0.conv1.conv.weight"].float() - initial.conv1.conv.weight).abs().max()
    assert moved > 1e-4


@pytest.mark.slow
def test_member_parallel_assembles_the_ensemble(tmp_path):
    result = _parity_train(tmp_path, "runs", "cnn_ensemble3", "--limit-train", "200", "--epochs", "1",
                           "--ensemble-mode", "members", "--devices", "2")
    directory = tmp_path / "runs" / "cnn_ensemble3" / "torch" / "seed0"
    members = [directory / "members" / f"member{k}" / "checkpoints" / "last.ckpt" for k in range(3)]
    assert all(p.exists() for p in members)
    from torch_impl.lightning_module import ClassifierModule

    ensemble = ClassifierModule.load_from_checkpoint(directory / "checkpoints" / "ensemble.ckpt",
                                                     map_location="cpu").eval()
    singles = [ClassifierModule.load_from_checkpoint(p, map_location="cpu").eval() for p in members]
    x = torch.rand(16, 1, 28, 28)
    with torch.no_grad():
        summed = sum(m(x) for m in singles)  # the tutorial's prediction: the sum of the members' logits
        torch.testing.assert_close(ensemble(x), summed, rtol=1e-6, atol=1e-5)
        first = singles[0](x)
    assert not torch.allclose(first, singles[1](x))  # members have their own seeds
    assert "member0_test_acc" in result.stdout and "final test accuracy" in result.stdout


def test_member_parallel_rerun_assembles_the_new_members(tmp_path):
    """Training the members again in the same directory (no --resume) replaces the previous run: no versioned
    `last-v1.ckpt` beside the old `last.ckpt`, and the ensemble is assembled from the new members' final weights."""
    from parity.catalog import recipe_for
    from torch_impl.train import train_member_parallel

    recipe = recipe_for("cnn_ensemble3").replace(members=2)
    train_member_parallel("cnn_ensemble3", recipe.replace(epochs=1), out=tmp_path, progress=False,
                          limit_train=200, accelerator="cpu")
    result = train_member_parallel("cnn_ensemble3", recipe.replace(epochs=2), out=tmp_path, progress=False,
                                   limit_train=200, accelerator="cpu")
    members = tmp_path / "cnn_ensemble3" / "torch" / "seed0" / "members"
    for k, member in enumerate(result["models"][0].members):
        checkpoints = members / f"member{k}" / "checkpoints"
        assert sorted(p.name for p in checkpoints.glob("*.ckpt")) == ["epoch000.ckpt", "epoch001.ckpt", "last.ckpt"]
        assert len(list(checkpoints.parent.glob("checkpoints.replaced-*"))) == 1  # the first run's, kept
        second_epoch = torch.load(checkpoints / "epoch001.ckpt", map_location="cpu", weights_only=False)["state_dict"]
        for name, tensor in member.state_dict().items():
            torch.testing.assert_close(tensor, second_epoch[f"model.members.0.{name}"], rtol=0, atol=0)


def test_member_parallel_resume_keeps_finished_members_and_resumes_the_interrupted_one(tmp_path, monkeypatch):
    """A requeued member-parallel job (`--ensemble-mode members --resume`, as scripts/slurm_ensemble.sbatch runs
    it) trains only what is missing: a finished member is kept as it is, an interrupted one continues from its own
    last checkpoint instead of starting again."""
    import shutil

    import torch_impl.train
    from parity.catalog import recipe_for
    from torch_impl.train import train_member_parallel

    recipe = recipe_for("cnn_ensemble3").replace(members=2, epochs=2)
    kwargs = {"out": tmp_path, "progress": False, "limit_train": 200, "accelerator": "cpu"}
    train_member_parallel("cnn_ensemble3", recipe, **kwargs)
    members = tmp_path / "cnn_ensemble3" / "torch" / "seed0" / "members"
    kept = (members / "member0" / "final.pt").read_bytes()
    # member 1 interrupted after its first epoch: no final weights, its last checkpoint is the first epoch's
    (members / "member1" / "done").unlink()
    (members / "member1" / "final.pt").unlink()
    checkpoints = members / "member1" / "checkpoints"
    (checkpoints / "epoch001.ckpt").unlink()
    shutil.copy(checkpoints / "epoch000.ckpt", checkpoints / "last.ckpt")
    first_epoch_written = (checkpoints / "epoch000.ckpt").stat().st_mtime_ns

    fits = []
    real_fit = torch_impl.train._fit
    monkeypatch.setattr(torch_impl.train, "_fit", lambda name, r, directory, **kw: fits.append(
        (Path(directory).name, kw["resume"])) or real_fit(name, r, directory, **kw))
    result = train_member_parallel("cnn_ensemble3", recipe, resume=True, **kwargs)

    assert fits == [("member1", True)], f"expected only member 1 to be trained, resumed; got {fits}"
    assert (members / "member0" / "final.pt").read_bytes() == kept
    assert (checkpoints / "epoch000.ckpt").stat().st_mtime_ns == first_epoch_written, "member 1 started again"
    assert not list(checkpoints.parent.glob("checkpoints.replaced-*")), "member 1's checkpoints were set aside"
    second_epoch = torch.load(checkpoints / "epoch001.ckpt", map_location="cpu", weights_only=False)
    assert second_epoch["epoch"] == 1
    for name, tensor in result["models"][0].members[1].state_dict().items():
        torch.testing.assert_close(tensor, second_epoch["state_dict"][f"model.members.0.{name}"], rtol=0, atol=0)

    # a resume with another recipe (one more epoch) continues every member instead of keeping the finished ones
    fits.clear()
    train_member_parallel("cnn_ensemble3", recipe.replace(epochs=3), resume=True, **kwargs)
    assert fits == [("member0", True), ("member1", True)], fits
    assert (members / "member0" / "checkpoints" / "epoch002.ckpt").exists()


def test_resume_takes_the_newest_of_last_and_slurm_checkpoints(tmp_path):
    """Lightning writes `hpc_ckpt_<n>.ckpt` into the Trainer's default_root_dir (the run's checkpoint directory)
    when SLURM signals a requeue, possibly mid-epoch and after the last epoch's `last.ckpt`; `--resume` takes the
    newer."""
    from torch_impl.train import resume_checkpoint

    assert resume_checkpoint(tmp_path) is None
    (tmp_path / "checkpoints").mkdir()
    last, hpc = tmp_path / "checkpoints" / "last.ckpt", tmp_path / "checkpoints" / "hpc_ckpt_1.ckpt"
    for path, mtime in ((last, 1_000), (hpc, 2_000)):
        path.write_bytes(b"x")
        os.utime(path, (mtime, mtime))
    assert resume_checkpoint(tmp_path) == hpc
    os.utime(last, (3_000, 3_000))
    assert resume_checkpoint(tmp_path) == last


def test_a_new_run_sets_an_earlier_runs_slurm_checkpoint_aside(tmp_path):
    """Without --resume, an `hpc_ckpt` left by an earlier, preempted run must not become the new run's start (under
    SLURM Lightning would load it by itself): it is moved aside, not deleted. SLURM's checkpoints go to the run's
    checkpoint directory (the Trainer's default_root_dir)."""
    from parity.catalog import recipe_for
    from torch_impl.train import train

    run = tmp_path / "lenet_a" / "torch" / "seed0"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "hpc_ckpt_1.ckpt").write_bytes(b"an earlier run's")
    recipe = recipe_for("lenet_a").replace(epochs=1, early_stopping_patience=None)
    result = train("lenet_a", recipe, out=tmp_path, progress=False, limit_train=64)
    assert not list((run / "checkpoints").glob("hpc_ckpt_*"))
    (moved,) = run.glob("hpc_checkpoints.replaced-*/hpc_ckpt_1.ckpt")
    assert moved.read_bytes() == b"an earlier run's"
    assert Path(result["models"][0].trainer.default_root_dir) == run / "checkpoints"


# ------------------------------------------------------------------------- member-parallel from the LightningCLI
CONFIGS = ROOT / "configs"
CLI_MEMBERS = ("fit", "--config", str(CONFIGS / "tut001_ensemble.yaml"), "--model.ensemble_mode=members",
               "--trainer.max_epochs=1", "--data.limit_train=200", "--trainer.enable_progress_bar=false",
               "--trainer.accelerator=cpu")


def _final_weights(directory: Path, k: int) -> dict[str, torch.Tensor]:
    return torch.load(directory / "members" / f"member{k}" / "final.pt", map_location="cpu", weights_only=True)


def _assert_ensemble_is_the_members_sum(directory: Path, members: int) -> None:
    from torch_impl.lightning_module import ClassifierModule

    ensemble = ClassifierModule.load_from_checkpoint(directory / "checkpoints" / "ensemble.ckpt",
                                                     map_location="cpu").eval()
    singles = []
    for k in range(members):
        single = ClassifierModule("cnn").eval()
        single.load_state_dict(_final_weights(directory, k))
        singles.append(single)
    x = torch.rand(16, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(ensemble(x), sum(m(x) for m in singles), rtol=1e-6, atol=1e-5)
        assert not torch.allclose(singles[0](x), singles[1](x))  # members have their own seeds


def test_lightning_cli_selects_member_parallel_and_trains_the_members_parity_train_trains(tmp_path, capsys):
    """`--model.ensemble_mode=members` in the LightningCLI config (no code change) trains each member as a run of
    its own and assembles the ensemble: the members equal, bit for bit, those of `parity train --ensemble-mode
    members` with the same recipe and seed (same member seeds, data orders, dropout draws, one process each)."""
    import json

    from parity.cli import main as parity
    from torch_impl.cli import main as lightning_cli

    assert parity(["train", "cnn_ensemble3", "--framework", "torch", "--members", "2", "--ensemble-mode", "members",
                   "--epochs", "1", "--limit-train", "200", "--out", str(tmp_path / "runs"), "--no-progress",
                   "--accelerator", "cpu"]) == 0
    # a config as Lightning writes them (SaveConfigCallback, --print_config) also names the fit options
    config = tmp_path / "saved_config.yaml"
    config.write_text((CONFIGS / "tut001_ensemble.yaml").read_text() + "ckpt_path: null\nweights_only: null\n")
    cli = lightning_cli(["fit", "--config", str(config), *CLI_MEMBERS[3:], "--model.members=2",
                         f"--trainer.default_root_dir={tmp_path / 'cli'}"])
    printed = capsys.readouterr().out

    for k in range(2):
        want = _final_weights(tmp_path / "runs" / "cnn_ensemble3" / "torch" / "seed0", k)
        got = _final_weights(tmp_path / "cli", k)
        assert got.keys() == want.keys()
        for name, tensor in want.items():
            torch.testing.assert_close(got[name], tensor, rtol=0, atol=0, msg=lambda m, n=name: f"member {k} {n}: {m}")
    _assert_ensemble_is_the_members_sum(tmp_path / "cli", 2)
    history = json.loads((tmp_path / "cli" / "history.json").read_text())
    assert history["model"] == "cnn_ensemble3" and 0.1 < history["test_acc"] <= 1
    assert history["recipe"]["ensemble_mode"] == "members"
    assert "member1_test_acc" in printed and "members_vote_test_acc" in printed
    # the CLI's model is the assembled ensemble
    assert cli.model.members[1].state_dict().keys() and all(
        torch.equal(tensor, _final_weights(tmp_path / "cli", 1)[f"model.members.0.{name}"])
        for name, tensor in cli.model.members[1].state_dict().items())


def _assert_float64_ensemble(directory: Path, members: int) -> None:
    """Every member trained in float64 and the ensemble was assembled and tested in float64 (not rounded to float32
    when the members' weights were loaded): its checkpoint holds the members' float64 weights unchanged."""
    ensemble = torch.load(directory / "checkpoints" / "ensemble.ckpt", map_location="cpu", weights_only=False)
    for k in range(members):
        final = _final_weights(directory, k)
        assert {t.dtype for t in final.values() if t.is_floating_point()} == {torch.float64}
        for name, tensor in final.items():
            assembled = ensemble["state_dict"][name.replace("model.members.0.", f"model.members.{k}.")]
            assert assembled.dtype == tensor.dtype and torch.equal(assembled, tensor), f"member {k} {name}"


def test_member_parallel_trains_and_tests_at_the_precision_asked_for(tmp_path):
    """`parity train --ensemble-mode members --precision 64-true`: the members train in float64 (the option used to
    be dropped for member-parallel runs) and the ensemble is tested in float64."""
    from parity.cli import main as parity

    assert parity(["train", "cnn_ensemble3", "--framework", "torch", "--members", "2", "--ensemble-mode", "members",
                   "--epochs", "1", "--limit-train", "100", "--out", str(tmp_path), "--no-progress",
                   "--accelerator", "cpu", "--precision", "64-true"]) == 0
    _assert_float64_ensemble(tmp_path / "cnn_ensemble3" / "torch" / "seed0", 2)


def test_lightning_cli_member_runs_get_their_own_log_and_checkpoint_directories(tmp_path):
    """A config that names a logger's `save_dir` and a ModelCheckpoint `dirpath` would have every member's run write
    into the same directories (mixed logs, one `last.ckpt` overwriting the other): each member's run gets its own,
    under its member directory. At `--trainer.precision=64-true` the ensemble is assembled and tested in float64."""
    import yaml

    from torch_impl.cli import main as lightning_cli

    config = yaml.safe_load((CONFIGS / "tut001_ensemble.yaml").read_text())
    config["trainer"]["logger"] = {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                   "init_args": {"save_dir": str(tmp_path / "shared_logs")}}
    (checkpoint,) = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("ModelCheckpoint")]
    checkpoint["init_args"]["dirpath"] = str(tmp_path / "shared_checkpoints")
    path = tmp_path / "named_dirs.yaml"
    path.write_text(yaml.safe_dump(config))
    root = tmp_path / "run"
    lightning_cli(["fit", "--config", str(path), *CLI_MEMBERS[3:], "--model.members=2", "--data.limit_train=100",
                   "--trainer.precision=64-true", f"--trainer.default_root_dir={root}"])
    # nothing written where the config pointed (the parsing process's own logger leaves an empty version dir)
    assert not [p for p in (tmp_path / "shared_logs").rglob("*") if p.is_file()]
    assert not (tmp_path / "shared_checkpoints").exists()
    for k in range(2):
        member = root / "members" / f"member{k}"
        assert len(list((member / "shared_logs").glob("lightning_logs/version_*/metrics.csv"))) == 1
        assert (member / "shared_checkpoints" / "last.ckpt").exists()
        assert (member / "shared_checkpoints" / "epoch000.ckpt").exists()
    _assert_float64_ensemble(root, 2)


@pytest.mark.slow
def test_lightning_cli_member_parallel_spawns_one_process_per_device(tmp_path):
    """`--trainer.devices=2` on CPU without torchrun: two spawned processes train members {0, 2} and {1}, and the
    ensemble is assembled from all three. The members are bit-identical to one process's, which runs one thread as
    each spawned process does (with two threads the convolutions and BatchNorm's statistics sum in another order,
    and after two Adam steps the weights whose gradients are mostly rounding noise, which Adam normalizes into steps
    of up to lr, differed by up to 5e-5)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
    result = subprocess.run([sys.executable, "-m", "torch_impl.cli", *CLI_MEMBERS, "--model.members=3",
                             "--trainer.devices=2", f"--trainer.default_root_dir={tmp_path / 'spawned'}"],
                            check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "members_logits_test_acc" in result.stdout
    _assert_ensemble_is_the_members_sum(tmp_path / "spawned", 3)

    from torch_impl.cli import main as lightning_cli

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        lightning_cli([*CLI_MEMBERS, "--model.members=3", f"--trainer.default_root_dir={tmp_path / 'one'}"])
    finally:
        torch.set_num_threads(threads)
    for k in range(3):
        want, got = _final_weights(tmp_path / "one", k), _final_weights(tmp_path / "spawned", k)
        for name, tensor in want.items():
            torch.testing.assert_close(got[name], tensor, rtol=0, atol=0, msg=lambda m, n=name: f"{k} {n}: {m}")


def test_trainer_fit_refuses_a_member_parallel_module_and_the_cli_refuses_ckpt_path(tmp_path):
    import lightning as L

    from torch_impl.cli import main as lightning_cli
    from torch_impl.lightning_module import ClassifierModule

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.rand(8, 1, 28, 28),
                                                                        torch.randint(0, 10, (8,))), batch_size=4)
    trainer = L.Trainer(fast_dev_run=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="ensemble_mode='members' trains each member in a run of its own"):
        trainer.fit(ClassifierModule("cnn_ensemble3", ensemble_mode="members"), train_dataloaders=loader)
    with pytest.raises(ValueError, match="--ckpt_path does not resume a member-parallel run"):
        lightning_cli([*CLI_MEMBERS, "--model.members=2", f"--trainer.default_root_dir={tmp_path}",
                       f"--ckpt_path={tmp_path / 'last.ckpt'}"])
    assert not (tmp_path / "members").exists()  # refused before any member trained


# ------------------------------------------------------------------------------------------ DDP from the LightningCLI
CLI_DRIVER = """
import sys
import torch
import torch_impl.layers
torch.nn.Dropout.forward = torch_impl.layers.Dropout.forward = lambda self, x: x
from torch_impl.cli import main
if __name__ == "__main__":
    main(sys.argv[1:])
    assert not (torch.distributed.is_available() and torch.distributed.is_initialized()), "process group left open"
"""


def _cli_last_state(tmp_path: Path, *args: str) -> dict[str, torch.Tensor]:
    driver = tmp_path / "cli_driver.py"
    driver.write_text(CLI_DRIVER)
    root = tmp_path / "_".join(a.split("=")[-1] for a in args if a.startswith("--trainer.devices")) / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
    command = [sys.executable, str(driver), "fit", "--config", str(CONFIGS / "tut001_best.yaml"), *args,
               f"--trainer.default_root_dir={root}", "--trainer.enable_progress_bar=false",
               "--trainer.accelerator=cpu"]
    result = subprocess.run(command, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (last,) = root.glob("lightning_logs/version_*/checkpoints/last.ckpt")
    return torch.load(last, map_location="cpu", weights_only=False)["state_dict"]


@pytest.mark.slow
def test_lightning_cli_ddp_adds_keras_sync_batchnorm_and_equals_one_process(tmp_path):
    """`--trainer.devices=2` in the LightningCLI, with nothing else named, trains the tutorial's looped `bn_cnn`
    ensemble (shared Adam, staircase decay, BatchNorm) as one process does: the CLI adds Keras-semantics synchronized
    BatchNorm and `find_unused_parameters` as `parity train` does (without them the looped ensemble stops with DDP's
    unused-parameter error, and the moving statistics would be per process). Float64 for the reason given in
    test_ddp_two_processes_equal_one_process."""
    common = ("--model.members=2", "--data.limit_train=400", "--trainer.max_epochs=1", "--data.augment=null",
              "--model.lr_decay_epochs=0.5", "--trainer.precision=64-true")
    single = _cli_last_state(tmp_path, *common, "--trainer.devices=1")
    ddp = _cli_last_state(tmp_path, *common, "--trainer.devices=2")
    _assert_ddp_trained_as_one_process(single, ddp, "model.members.1.conv1.bn.running_var")


def test_lightning_cli_names_what_ddp_needs_only_where_the_config_leaves_it_open(tmp_path):
    from torch_impl.cli import main

    def strategy(config: str, *extra: str):
        cli = main(["--config", str(CONFIGS / f"{config}.yaml"), "--trainer.accelerator=cpu", *extra,
                    f"--trainer.default_root_dir={tmp_path}"], run=False)
        return cli.trainer.strategy

    looped_bn = strategy("tut001_best", "--trainer.devices=2")
    assert isinstance(looped_bn._layer_sync, KerasSyncBatchNorm)
    assert looped_bn._ddp_kwargs == {"find_unused_parameters": True}
    vectorized = strategy("tut001_best", "--trainer.devices=2", "--model.ensemble_mode=vectorized")
    assert isinstance(vectorized._layer_sync, KerasSyncBatchNorm) and vectorized._ddp_kwargs == {}
    single_model = strategy("tut001_cnn", "--trainer.devices=2")
    assert single_model._layer_sync is None and single_model._ddp_kwargs == {}
    named = strategy("tut001_ensemble", "--trainer.devices=2", "--trainer.strategy=ddp_find_unused_parameters_false")
    assert named._ddp_kwargs == {"find_unused_parameters": False}  # the config's own choice is kept
    given = strategy("tut001_best", "--trainer.devices=2", "--trainer.strategy=lightning.pytorch.strategies.DDPStrategy",
                     "--trainer.strategy.static_graph=true")  # a strategy object from the config is completed
    assert isinstance(given._layer_sync, KerasSyncBatchNorm) and given._ddp_kwargs["static_graph"] is True
    assert not isinstance(strategy("tut001_best", "--trainer.devices=2", "--trainer.sync_batchnorm=true")._layer_sync,
                          KerasSyncBatchNorm)  # Lightning's own, as asked
    assert getattr(strategy("tut001_best", "--trainer.devices=1"), "_layer_sync", None) is None


@pytest.mark.slow
def test_lightning_cli_member_parallel_under_torchrun(tmp_path):
    """Launched by torchrun (2 processes, 3 members): each launched process trains its own members (rank 1: member
    1) and rank 0 assembles the ensemble; every member's run writes its logs, whichever rank trained it (Lightning
    took the rank from RANK, and its loggers write on rank 0 only, so member 1 had no TensorBoard or CSV logs)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run([*torchrun, "-m", "torch_impl.cli", *CLI_MEMBERS, "--model.members=3",
                             "--trainer.devices=2", f"--trainer.default_root_dir={tmp_path / 'run'}"],
                            check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("members_logits_test_acc") == 1  # rank 0 alone assembles and reports
    _assert_ensemble_is_the_members_sum(tmp_path / "run", 3)
    for k in range(3):
        logs = tmp_path / "run" / "members" / f"member{k}" / "lightning_logs" / "version_0"
        assert list(logs.glob("events.out.tfevents.*")), f"member {k} has no TensorBoard log"
        assert (logs / "checkpoints" / "epoch000.ckpt").exists()


def test_member_runs_clear_their_earlier_done_markers_before_any_training(tmp_path, monkeypatch):
    """Rank 0 assembles the ensemble once every member's `done` marker exists. A marker (and final weights) left
    by an earlier run in the same directory must be gone before any of this run's training starts: else rank 0,
    done with its own members, could assemble a member another rank is still training from the earlier run's."""
    import torch_impl.train
    from parity.catalog import recipe_for
    from torch_impl.train import train_member_parallel

    members = tmp_path / "cnn_ensemble3" / "torch" / "seed0" / "members"
    for k in range(2):
        (members / f"member{k}").mkdir(parents=True)
        (members / f"member{k}" / "done").write_text("ok\n")
        (members / f"member{k}" / "final.pt").write_bytes(b"an earlier run's")
    seen = []
    real_fit = torch_impl.train._fit
    monkeypatch.setattr(torch_impl.train, "_fit", lambda name, r, directory, **kw: seen.append(
        sorted(p.parent.name for p in members.glob("*/done"))) or real_fit(name, r, directory, **kw))
    recipe = recipe_for("cnn_ensemble3").replace(members=2, epochs=1)
    train_member_parallel("cnn_ensemble3", recipe, out=tmp_path, progress=False, limit_train=64, accelerator="cpu")
    assert seen == [[], ["member0"]], seen  # member 1's old marker was gone while member 0 trained


def _launch_with_stubs(tmp_path: Path, script: str, env: dict, stubs: tuple[str, ...]) -> list[list[str]]:
    """Run a launcher from a copy of the repository layout whose `.venv/bin` programs (and `srun`) only record
    their arguments; returns the recorded command lines."""
    (tmp_path / "scripts").mkdir()
    copy = tmp_path / "scripts" / script
    copy.write_text((ROOT / "scripts" / script).read_text())
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    log = tmp_path / "calls.txt"
    for name in stubs:
        stub = (tmp_path / name) if name == "srun" else (bin_dir / name)
        stub.write_text(f'#!/bin/bash\nprintf "%s\\x1f" {name} "$@" >> "{log}"\necho >> "{log}"\n')
        stub.chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}", SLURM_SUBMIT_DIR=str(tmp_path), **env)
    subprocess.run(["bash", str(copy)], check=True, cwd=tmp_path, env=env, capture_output=True, timeout=60)
    return [line.rstrip("\x1f").split("\x1f") for line in log.read_text().splitlines() if line]


def _option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


@pytest.mark.parametrize("mode", ["loop", "members"])
def test_slurm_launcher_matches_lightnings_slurm_layout(tmp_path, mode):
    """One task per GPU: ntasks-per-node is --devices, nodes is --num-nodes (Lightning checks both against SLURM's
    variables), the global batch splits over them, and a requeued job resumes."""
    header = (ROOT / "scripts" / "slurm_ensemble.sbatch").read_text()
    sbatch = dict((line[len("#SBATCH --"):] + "=").split("=")[:2]  # "--requeue" has no value
                  for line in header.splitlines() if line.startswith("#SBATCH --"))
    env = {"MODE": mode, "SLURM_JOB_NUM_NODES": sbatch["nodes"], "SLURM_NTASKS_PER_NODE": sbatch["ntasks-per-node"]}
    calls = _launch_with_stubs(tmp_path, "slurm_ensemble.sbatch", env, ("parity", "srun"))
    assert calls[0][:2] == ["parity", "fetch"]  # before the ranks start
    train = calls[1]
    assert train[:4] == ["srun", ".venv/bin/parity", "train", "bn_cnn"]
    assert _option(train, "--devices") == sbatch["ntasks-per-node"] == sbatch["gpus-per-node"]
    assert _option(train, "--num-nodes") == sbatch["nodes"]
    assert _option(train, "--ensemble-mode") == mode and "--resume" in train
    assert "SIGUSR1@" in sbatch["signal"] and "requeue" in sbatch
    processes = int(sbatch["nodes"]) * int(sbatch["ntasks-per-node"])
    assert int(_option(train, "--batch-size")) % processes == 0


def test_torchrun_launcher_keeps_the_recipes_global_batch(tmp_path):
    """Default: one node, 4 processes, tutorial 001's batch 100 as the global batch (25 per process)."""
    run = _launch_with_stubs(tmp_path, "torchrun_ensemble.sh", {}, ("parity", "torchrun"))[-1]
    assert run[0] == "torchrun" and run[run.index("-m") + 1:run.index("-m") + 4] == ["parity.cli", "train", "bn_cnn"]
    assert _option(run, "--nproc_per_node") == _option(run, "--devices") == "4"
    assert _option(run, "--nnodes") == _option(run, "--num-nodes") == "1"
    assert _option(run, "--batch-size") == "100" and 100 % 4 == 0


def test_torchrun_launcher_passes_the_node_layout_through(tmp_path):
    env = {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "node0", "BATCH": "104", "MODE": "vectorized"}
    run = _launch_with_stubs(tmp_path, "torchrun_ensemble.sh", env, ("parity", "torchrun"))[-1]
    assert _option(run, "--nnodes") == _option(run, "--num-nodes") == "2"
    assert _option(run, "--node_rank") == "1" and _option(run, "--master_addr") == "node0"
    assert _option(run, "--batch-size") == "104" and _option(run, "--ensemble-mode") == "vectorized"
