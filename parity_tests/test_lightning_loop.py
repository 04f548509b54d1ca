"""What the Lightning training loop shows and logs, and what it costs per step (torch only).

The port keeps per-step work out of `Trainer.fit` (BENCHMARKS.md, "Lightning overhead"): the per-step loss is
logged only on the batches whose values Lightning writes to the loggers, and the progress bar is redrawn on a
timer. These tests check that nothing a user sees is lost by that: the loggers get the loss of the very step they
are stamped with, and the bar shows the epoch's running means.
"""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import yaml
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from torch_impl.callbacks import EpochSeed, KerasProgressBar
from torch_impl.lightning_module import ClassifierModule


def _loader(n: int = 80, batch: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)),
                      batch_size=batch)


class _StepLosses(L.Callback):
    """Each batch's training loss, as the optimization loop returned it."""

    def __init__(self):
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses[batch_idx] = float(outputs["loss"])


@pytest.mark.parametrize("every", [1, 3])
def test_per_step_loss_reaches_the_logger_at_the_steps_lightning_writes(tmp_path, every):
    torch.manual_seed(0)
    module = ClassifierModule(model_name="cnn")
    recorder = _StepLosses()
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=10, log_every_n_steps=every,
                        logger=CSVLogger(tmp_path, name="csv", version=""), callbacks=[recorder],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=_loader())
    with open(tmp_path / "csv" / "metrics.csv") as f:
        logged = {int(row["step"]): float(row["train_loss"]) for row in csv.DictReader(f) if row.get("train_loss")}
    # Lightning writes on the batches k with (k + 1) % every == 0, stamped step = k (batches stepped before it)
    assert sorted(logged) == [k for k in range(10) if (k + 1) % every == 0]
    for step, value in logged.items():
        assert value == pytest.approx(recorder.losses[step], rel=1e-6), f"step {step} logged a stale loss"


def test_per_step_loss_is_not_logged_on_the_other_steps(monkeypatch):
    """The point of the gate: `self.log` runs only where the loggers write (here every 4th of 12 batches)."""
    calls = []
    original = ClassifierModule.log

    def counting_log(self, name, *args, **kwargs):
        if name == "train_loss":
            calls.append(self.trainer.fit_loop.epoch_loop.batch_idx)
        return original(self, name, *args, **kwargs)

    monkeypatch.setattr(ClassifierModule, "log", counting_log)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=12, log_every_n_steps=4, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(ClassifierModule(model_name="cnn"), train_dataloaders=_loader(96))
    assert calls == [3, 7, 11]


def test_progress_bar_shows_the_running_means_of_the_epoch():
    module = ClassifierModule(model_name="cnn")
    for loss, acc in ((1.0, 0.25), (2.0, 0.5), (4.5, 1.0)):
        module.train_loss.update(torch.tensor(loss))
        module.train_acc.update(torch.tensor(acc))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_model_summary=False,
                        callbacks=[KerasProgressBar()])
    metrics = KerasProgressBar().get_metrics(trainer, module)
    assert metrics["loss"] == f"{2.5:.4f}" and metrics["acc"] == f"{1.75 / 3:.4f}"


def test_progress_bar_redraws_on_a_timer_and_at_the_end(monkeypatch):
    bar = KerasProgressBar(interval=0.1)
    now = [100.0]
    monkeypatch.setattr("torch_impl.callbacks.time.monotonic", lambda: now[0])
    draws = []
    for batch in range(1, 11):  # ten batches, 30 ms apart: drawn at the first, then once 0.1 s has passed
        now[0] += 0.03
        if bar._should_update(batch, 10):
            draws.append(batch)
    assert draws == [1, 5, 9, 10]  # 10: the last batch of the epoch is always drawn


def test_a_diverged_loss_shows_as_nan_instead_of_stopping_the_run():
    """Keras prints `loss: nan` and goes on; torchmetrics' default would raise at the first nan."""
    module = ClassifierModule(model_name="cnn")
    module.train_loss.update(torch.tensor(float("nan")))
    module.train_loss.update(torch.tensor(1.0))
    assert torch.isnan(module.train_loss.compute())


@pytest.mark.parametrize("extra, expected", [([], KerasProgressBar), (["--trainer.enable_progress_bar=false"], None)])
def test_lightning_cli_trains_with_the_keras_style_bar_unless_the_bar_is_off(tmp_path, extra, expected):
    from torch_impl.cli import main

    cli = main(["fit", "--config", str(Path(__file__).parent.parent / "configs" / "tut001_cnn.yaml"), "--trainer.fast_dev_run=true", "--data.limit_train=200",
                f"--trainer.default_root_dir={tmp_path}", *extra])
    bar = cli.trainer.progress_bar_callback
    assert (type(bar) if bar is not None else None) is expected
    assert cli.trainer.state.finished
    (seeding,) = [c for c in cli.trainer.callbacks if isinstance(c, EpochSeed)]  # from the config's seed_everything
    assert seeding.seed == cli.config.fit.seed_everything


@pytest.mark.parametrize("extra, data_seed",
                         [(["--seed_everything=7"], 7), (["--seed_everything=7", "--data.seed=3"], 3)])
def test_lightning_cli_seeds_the_data_order_and_keeps_its_own_batch_split(tmp_path, extra, data_seed):
    """Each `seed_everything` draws its own data order (before, every CLI seed shuffled with data seed 0), unless
    `data.seed` is given; and the Trainer leaves the datamodule's sampler alone (Lightning's default,
    use_distributed_sampler=True, would wrap GlobalBatchSampler's sampler in a DistributedSampler under DDP)."""
    from torch_impl.cli import main

    cli = main(["fit", "--config", str(Path(__file__).parent.parent / "configs" / "tut001_cnn.yaml"),
                "--trainer.fast_dev_run=true", "--data.limit_train=200", "--trainer.enable_progress_bar=false",
                f"--trainer.default_root_dir={tmp_path}", *extra])
    assert cli.datamodule.hparams.seed == data_seed
    assert cli.trainer.train_dataloader.batch_sampler.seed == data_seed
    assert cli.trainer._accelerator_connector.use_distributed_sampler is False


def test_lightning_cli_writes_the_shared_history_and_tensorboard_tags(tmp_path):
    """A LightningCLI run writes what `parity train` writes for both frameworks (history.json with the same row
    columns, history.csv, TensorBoard under the shared tags) into its log directory, so it overlays TF runs too."""
    import json

    from parity.runs import EPOCH_COLUMNS, TB_TAGS
    from torch_impl.cli import main

    cli = main(["fit", "--config", str(Path(__file__).parent.parent / "configs" / "tut001_cnn.yaml"),
                "--trainer.max_epochs=2", "--trainer.limit_test_batches=1", "--data.limit_train=200",
                "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}"])
    run = Path(cli.trainer.log_dir)
    assert run.parent.parent == tmp_path  # lightning_logs/version_0
    history = json.loads((run / "history.json").read_text())
    assert history["model"] == "cnn" and history["framework"] == "torch" and history["seed"] == 0
    assert [row["epoch"] for row in history["epochs"]] == [1, 2]
    assert set(history["epochs"][0]) <= set(EPOCH_COLUMNS) and "train_acc" in history["epochs"][0]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert {TB_TAGS["train_loss"], TB_TAGS["train_acc"], TB_TAGS["lr"]} <= set(events.Tags()["scalars"])
    # Lightning's own loggers, TensorBoard and CSV, share that directory
    assert list(run.glob("events.out.tfevents.*")), f"no TensorBoardLogger events in {run}"
    import csv

    rows = [row for row in csv.DictReader((run / "csv" / "metrics.csv").open()) if row["test_acc"]]
    assert [int(row["epoch"]) + 1 for row in rows] == [1, 2]
    for row, epoch in zip(rows, history["epochs"]):
        assert float(row["test_acc"]) == pytest.approx(epoch["test_acc"])


def test_lightning_cli_print_config_prints_a_config_that_runs(tmp_path, capsys):
    """`--print_config` prints the whole parsed configuration (the recipe's values included) as YAML that the CLI
    takes back as its `--config`."""
    from torch_impl.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(Path(__file__).parent.parent / "configs" / "tut003.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["model_name"] == "lenet_a" and printed["model"]["optimizer"] == "rmsprop"
    assert printed["data"]["batch_size"] == 32 and printed["trainer"]["max_epochs"] == 100
    config = tmp_path / "printed.yaml"
    config.write_text(yaml.safe_dump(printed))
    cli = main(["fit", "--config", str(config), "--trainer.fast_dev_run=true", "--data.limit_train=64",
                "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}"])
    assert cli.trainer.global_step == 1 and cli.model.hparams.model_name == "lenet_a"


def test_lightning_cli_resumes_from_ckpt_path(tmp_path):
    """`fit --ckpt_path=.../last.ckpt` continues the run: epoch, step counter, optimizer state and weights come back,
    so one epoch plus a resumed one end on the weights of two epochs in one go (dropout and data order are drawn
    from (seed, epoch), so the resumed epoch replays the same draws)."""
    from torch_impl.cli import main

    def fit(root, epochs, *extra):
        return main(["fit", "--config", str(Path(__file__).parent.parent / "configs" / "tut001_cnn.yaml"),
                     f"--trainer.max_epochs={epochs}", "--trainer.limit_test_batches=1", "--data.limit_train=200",
                     "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={root}", *extra])

    whole = fit(tmp_path / "whole", 2)
    first = fit(tmp_path / "split", 1)
    last = Path(first.trainer.log_dir) / "checkpoints" / "last.ckpt"
    assert first.trainer.global_step == 2 and last.is_file()
    resumed = fit(tmp_path / "split", 2, f"--ckpt_path={last}")
    assert resumed.trainer.global_step == whole.trainer.global_step == 4
    assert resumed.trainer.current_epoch == 2
    # the resumed process itself ran the second epoch only: its CSV log (a new version directory) starts there
    import csv

    logged = list(csv.DictReader((Path(resumed.trainer.log_dir) / "csv" / "metrics.csv").open()))
    assert {row["epoch"] for row in logged if row["test_acc"]} == {"1"}
    assert Path(resumed.trainer.log_dir) != Path(first.trainer.log_dir)
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), f"{name} differs after the resume"


class _Indices(torch.utils.data.Dataset):
    def __len__(self):
        return 40

    def __getitems__(self, indices):
        return torch.tensor(indices)


class _OrderRecorder(L.LightningModule):
    """Records the indices of every training batch, per epoch."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.orders: dict[int, list[int]] = {}

    def training_step(self, batch, batch_idx):
        self.orders.setdefault(self.current_epoch, []).extend(batch.tolist())
        return (self.weight * 0).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_training_order_is_reshuffled_every_epoch_under_trainer_fit():
    """The recipe's shuffle draws a new permutation every epoch (seed + epoch), as Keras and tf.data do: Lightning
    must reach GlobalBatchSampler.set_epoch (it only looks at `batch_sampler.sampler`)."""
    from torch_impl.datamodule import GlobalBatchSampler

    sampler = GlobalBatchSampler(40, 8, shuffle=True, seed=3)
    loader = DataLoader(_Indices(), batch_sampler=sampler, collate_fn=lambda batch: batch)
    module = _OrderRecorder()
    trainer = L.Trainer(accelerator="cpu", max_epochs=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=loader)
    for epoch in range(3):
        expected = torch.randperm(40, generator=torch.Generator().manual_seed(3 + epoch)).tolist()
        assert module.orders[epoch] == expected, f"epoch {epoch} did not use the permutation of seed + epoch"
    assert module.orders[0] != module.orders[1] != module.orders[2]


def test_training_batches_are_fetched_whole_with_getitems(monkeypatch):
    """`tf.data`'s batched slicing, not PyTorch's per-sample `__getitem__` + collate: the DataLoader hands each
    batch's indices to `InMemoryImages.__getitems__` in one call, which gathers the batch in one indexing op."""
    from torch_impl.datamodule import InMemoryImages, MNISTDataModule

    def per_sample(self, index):
        raise AssertionError("a per-sample __getitem__ call: the batch should be fetched whole")

    calls: list[torch.Tensor] = []
    whole = InMemoryImages.__getitems__

    def recorded(self, indices):
        calls.append(torch.as_tensor(indices))
        return whole(self, indices)

    monkeypatch.setattr(InMemoryImages, "__getitem__", per_sample)
    monkeypatch.setattr(InMemoryImages, "__getitems__", recorded)
    datamodule = MNISTDataModule(limit_train=100, batch_size=32, drop_last=False)
    datamodule.setup("fit")
    batches = list(datamodule.train_dataloader())
    assert [len(c) for c in calls] == [32, 32, 32, 4] and len(batches) == 4
    for indices, (images, labels, _) in zip(calls, batches):
        assert torch.equal(images, datamodule.train_set.images[indices])
        assert torch.equal(labels, datamodule.train_set.labels[indices])
    assert sorted(torch.cat(calls).tolist()) == list(range(100))  # one epoch: every image once


def test_datasets_move_to_a_gpu_once_and_batches_are_gathered_there():
    """On a CUDA device the uint8 datasets move there in `setup` (a batch is then one indexing op on the device,
    with no host-to-device copy of images per step); `data_on_device=None` leaves them on the CPU elsewhere and when
    DataLoader workers would have to index them. No GPU here: a stand-in trainer names the device, and the 'meta'
    device plays the GPU to show that setup moves every dataset and that batches come out on the data's device."""
    from types import SimpleNamespace

    from torch_impl.datamodule import MNISTDataModule

    def on(device: str, **kwargs) -> MNISTDataModule:
        datamodule = MNISTDataModule(limit_train=64, **kwargs)
        datamodule.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)),
                                             global_rank=0, world_size=1)
        return datamodule

    assert on("cuda:1").data_device() == torch.device("cuda:1")
    assert on("cuda:1", num_workers=2).data_device() == torch.device("cpu")
    assert on("cuda:1", data_on_device=False).data_device() == torch.device("cpu")
    assert on("cpu").data_device() == torch.device("cpu")
    with pytest.raises(ValueError, match="data_on_device=True needs num_workers=0"):
        MNISTDataModule(data_on_device=True, num_workers=2)

    datamodule = on("meta", data_on_device=True)
    datamodule.setup("fit")
    for dataset in (datamodule.train_set, *datamodule.eval_sets.values()):
        assert dataset.images.device.type == dataset.labels.device.type == "meta"
    images, labels, augment = next(iter(datamodule.train_dataloader()))
    assert images.device.type == labels.device.type == augment.device.type == "meta"
    assert images.shape == (64, 28, 28) and images.dtype == torch.uint8
    on_cpu = on("cpu")
    on_cpu.setup("fit")
    assert on_cpu.train_set.images.device.type == "cpu"
