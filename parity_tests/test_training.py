"""Every recipe runs in both frameworks; the LightningCLI configs are the recipes; runs resume; checkpoints of
the wrong model are refused; the torch side works without TensorFlow; and two real epochs of `cnn` train to
>= 98.5% in both frameworks, within 0.5 points of each other (level 4, CI's short form)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from parity.catalog import RECIPES, recipe_for
from parity.runs import EPOCH_COLUMNS, load_history

CONFIGS = sorted(Path(__file__).resolve().parent.parent.joinpath("configs").glob("*.yaml"))
SMOKE_MODELS = {"tut001_cnn": "cnn", "tut001_ensemble": "cnn_ensemble3", "tut001_best": "bn_cnn",
                "tut002": "convpool", "tut003": "lenet_c", "tut004": "datacamp"}


def test_every_recipe_has_a_config():
    assert sorted(p.stem for p in CONFIGS) == sorted(RECIPES)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_is_the_recipe(config):
    cfg = yaml.safe_load(config.read_text())
    recipe = RECIPES[config.stem]
    model, data = cfg["model"], cfg["data"]
    expected = {
        "members": recipe.members, "optimizer": recipe.optimizer, "lr": recipe.lr, "epsilon": recipe.epsilon,
        "lr_decay_rate": recipe.lr_decay_rate, "lr_decay_epochs": recipe.lr_decay_epochs,
        "shared_optimizer": recipe.shared_optimizer, "train_acc_after_step": recipe.loop == "tape", "second_pass": recipe.loop == "tape",
    }
    assert {k: model[k] for k in expected} == expected
    expected_data = {"dataset": recipe.dataset, "split": recipe.split, "batch_size": recipe.batch_size,
                     "scale": recipe.scale, "shuffle": recipe.shuffle, "drop_last": recipe.drop_last,
                     "augment": recipe.augment}
    assert {k: data[k] for k in expected_data} == expected_data
    assert cfg["trainer"]["max_epochs"] == recipe.epochs
    # the checkpoints `parity train` keeps (Lightning's own default would keep only the newest epoch's)
    from torch_impl.train import epoch_checkpoints

    wanted = epoch_checkpoints(recipe, Path("unused"))
    (checkpoint,) = [c["init_args"] for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("ModelCheckpoint")]
    assert checkpoint.get("save_top_k", 1) == wanted.save_top_k
    # the same file names (epoch000.ckpt; with Lightning's default the template would give epochepoch=000.ckpt)
    assert checkpoint.get("auto_insert_metric_name", True) == wanted.auto_insert_metric_name
    assert checkpoint["filename"] == wanted.filename
    assert checkpoint.get("monitor") == wanted.monitor
    if wanted.monitor:
        assert checkpoint.get("mode", "min") == wanted.mode
    # EarlyStopping with Keras's rule and restore_best_weights exactly where the recipe has it (tutorial 003)
    stopping = [c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("EarlyStopping")]
    restoring = [c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("RestoreBestWeights")]
    if recipe.early_stopping_patience is None:
        assert not stopping and not restoring
    else:
        assert [c["class_path"] for c in stopping] == ["torch_impl.callbacks.KerasEarlyStopping"]
        args = stopping[0]["init_args"]
        assert args["patience"] == recipe.early_stopping_patience and args["monitor"] == "val_loss"
        assert len(restoring) == 1


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_fast_dev_run(config, tmp_path):
    from torch_impl.cli import main

    cli = main(["fit", "--config", str(config), "--trainer.fast_dev_run=true", "--data.limit_train=200",
                f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false"])
    assert cli.trainer.state.finished, f"{config.stem}: fit did not finish ({cli.trainer.state})"
    assert cli.trainer.global_step >= 1


@pytest.mark.parametrize("framework", ["torch", "tf"])
@pytest.mark.parametrize("recipe_name", sorted(SMOKE_MODELS))
def test_recipe_runs_two_steps(request, framework, recipe_name, tmp_path):
    if framework == "tf":
        request.getfixturevalue("tf")
        from tf_ref.train import train
    else:
        from torch_impl.train import train
    model = SMOKE_MODELS[recipe_name]
    base = recipe_for(model, recipe_name)
    recipe = base.replace(epochs=1)
    # two batches of originals (tutorial 001's best recipe turns them into 5x as many augmented images)
    limit = 2 * recipe.batch_size if recipe.augment is None else max(1, 2 * recipe.batch_size // 5)
    history = train(model, recipe, seed=0, out=tmp_path, progress=False, limit_train=limit)
    on_disk = load_history(tmp_path / model / framework / "seed0")
    assert on_disk["framework"] == framework and on_disk["model"] == model
    assert [row["epoch"] for row in on_disk["epochs"]] == [1]
    row = on_disk["epochs"][0]
    assert set(row) <= set(EPOCH_COLUMNS)
    for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
        assert key in row, f"{framework} {recipe_name}: history row lacks {key}: {row}"
    if recipe.split != "full":
        assert "val_acc" in row
    assert 0.0 <= history["test_acc"] <= 1.0
    csv_header = (tmp_path / model / framework / "seed0" / "history.csv").read_text().splitlines()[0]
    assert csv_header == ",".join(EPOCH_COLUMNS)
    # TensorBoard: the same tags in both frameworks (so the two runs overlay), one value per epoch column, at step 1
    from parity.runs import TB_TAGS

    steps = _tensorboard_steps(tmp_path / model / framework / "seed0" / "tensorboard")
    wanted = {TB_TAGS[key] for key in row if key in TB_TAGS}
    assert {TB_TAGS["train_loss"], TB_TAGS["test_acc"]} <= wanted
    assert {tag: steps.get(tag) for tag in wanted} == {tag: [1] for tag in wanted}


def _tensorboard_steps(directory: Path) -> dict[str, list[int]]:
    """Every scalar tag in the event files under `directory` and its steps: Lightning's writer stores scalars,
    `tf.summary.scalar` stores tensors with the scalars plugin; both are read here without TensorFlow."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps: dict[str, list[int]] = {}
    for path in sorted(directory.rglob("events.out.tfevents*")):
        events = EventAccumulator(str(path))
        events.Reload()
        tags = events.Tags()
        for tag in tags.get("scalars", []):
            steps.setdefault(tag, []).extend(e.step for e in events.Scalars(tag))
        for tag in tags.get("tensors", []):
            steps.setdefault(tag, []).extend(e.step for e in events.Tensors(tag))
    return steps


def test_torch_run_resumes(tmp_path):
    from torch_impl.train import train

    recipe = recipe_for("lenet_a").replace(epochs=1, early_stopping_patience=None)
    train("lenet_a", recipe, out=tmp_path, progress=False, limit_train=64)
    run = tmp_path / "lenet_a" / "torch" / "seed0"
    first_segment = (run / "csv" / "metrics.csv").read_text()
    history = train("lenet_a", recipe.replace(epochs=2), out=tmp_path, progress=False, limit_train=64, resume=True)
    assert [row["epoch"] for row in history["epochs"]] == [1, 2], history["epochs"]
    # train_seconds covers both processes: at least every epoch's recorded seconds
    assert history["train_seconds"] >= sum(row["seconds"] for row in history["epochs"]) - 1e-6
    # Lightning's CSV log of the first segment survives (its CSVLogger deletes the metrics file it finds)
    assert (run / "csv" / "metrics.csv").read_text() == first_segment
    assert (run / "csv" / "resume1" / "metrics.csv").exists()


def test_tf_run_resumes(tf, tmp_path):
    from tf_ref.train import train

    recipe = recipe_for("cnn").replace(epochs=1)
    train("cnn", recipe, out=tmp_path, progress=False, limit_train=200)
    history = train("cnn", recipe.replace(epochs=2), out=tmp_path, progress=False, limit_train=200, resume=True)
    assert [row["epoch"] for row in history["epochs"]] == [1, 2], history["epochs"]
    # train_seconds covers both processes: at least every epoch's recorded seconds
    assert history["train_seconds"] >= sum(row["seconds"] for row in history["epochs"]) - 1e-6


def test_history_train_seconds_count_the_epochs_before_a_resume(tmp_path):
    from parity.runs import History

    history = History(tmp_path, "cnn", "torch", {"name": "tut001_cnn"}, seed=0)
    history.epochs = [{"epoch": 1, "seconds": 10.0}, {"epoch": 2, "seconds": 12.0}]  # restored from a checkpoint
    history.add_epoch({"epoch": 2, "seconds": 11.0})  # the interrupted epoch, trained again
    history.add_epoch({"epoch": 3, "seconds": 9.0})
    history.finish(train_seconds=21.0, test_acc=0.99)
    assert history.final["train_seconds"] == 31.0  # this process's 21 s + epoch 1's 10 s
    assert json.loads((tmp_path / "history.json").read_text())["train_seconds"] == 31.0
    fresh = History(tmp_path / "fresh", "cnn", "torch", {"name": "tut001_cnn"}, seed=0)
    (tmp_path / "fresh").mkdir()
    fresh.add_epoch({"epoch": 1, "seconds": 10.0})
    fresh.finish(train_seconds=10.5)
    assert fresh.final["train_seconds"] == 10.5


def test_checkpoint_of_another_model_is_refused(tmp_path):
    import torch

    from torch_impl.lightning_module import ClassifierModule

    module = ClassifierModule("lenet_a", optimizer="rmsprop")
    path = tmp_path / "lenet_a.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": "2.6.6"}, path)
    with pytest.raises(ValueError, match="holds a 'lenet_a' model, but a 'cnn' model was asked for"):
        ClassifierModule.load_from_checkpoint(path, model_name="cnn")
    restored = ClassifierModule.load_from_checkpoint(path)
    assert restored.hparams.model_name == "lenet_a"


def test_resume_with_another_member_count_is_a_clear_error(tmp_path):
    """A 1-member `cnn` run resumed with --members 3 used to end in a state_dict traceback."""
    from parity.cli import main

    common = ["train", "cnn", "--framework", "torch", "--out", str(tmp_path), "--no-progress", "--epochs", "1",
              "--limit-train", "100"]
    assert main(common) == 0
    with pytest.raises(ValueError, match=r"trained with members=1, but members=3 was asked for.*--members"):
        from torch_impl.lightning_module import ClassifierModule

        ClassifierModule.load_from_checkpoint(tmp_path / "cnn" / "torch" / "seed0" / "checkpoints" / "last.ckpt",
                                              members=3)
    assert main([*common, "--members", "3", "--resume"]) == 2


def test_torch_training_does_not_import_installed_tensorflow(tf, tmp_path):
    """With TensorFlow installed, a torch run (TensorBoard logger included) still never imports it: tensorboard would,
    for +0.5 GB of memory per process (torch_impl.cpu_tuning.tensorboard_without_tensorflow)."""
    code = (
        "import sys\n"
        "from parity.catalog import recipe_for\n"
        "from torch_impl.train import train\n"
        f"h = train('lenet_a', recipe_for('lenet_a').replace(epochs=1), out={str(tmp_path)!r}, progress=False, "
        "limit_train=64)\n"
        "print('tensorflow' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "False", "the torch run imported TensorFlow"
    assert list((tmp_path / "lenet_a" / "torch" / "seed0" / "tensorboard").rglob("events.out.tfevents.*"))


def test_torch_side_runs_without_tensorflow(tmp_path):
    """Import the torch side and train two steps in a process where `import tensorflow` fails."""
    code = (
        "import sys; sys.modules['tensorflow'] = None\n"  # any import of tensorflow now raises ImportError
        "from parity.catalog import MODEL_NAMES, recipe_for\n"
        "from torch_impl.models import build_model\n"
        "from torch_impl.summary import summarize\n"
        "from torch_impl.train import train\n"
        "for name in MODEL_NAMES: summarize(name)\n"
        f"h = train('cnn', recipe_for('cnn').replace(epochs=1), out={str(tmp_path)!r}, progress=False, "
        "limit_train=200)\n"
        "import json; print(json.dumps({'acc': h['test_acc'], 'tf': 'tensorflow' in sys.modules and "
        "sys.modules['tensorflow'] is not None}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["tf"] is False and 0.0 <= result["acc"] <= 1.0


@pytest.mark.slow
def test_two_real_epochs_of_cnn_in_both_frameworks(tf, tmp_path):
    """Level 4, short form: two epochs of tutorial 001's recipe on all of MNIST, one seed per framework.

    Both must reach 98.5% test accuracy and be within 0.5 points of each other. Why two epochs: accuracy after a
    short run is a draw from a seed distribution, measured here (RESULTS.md, "short runs, five seeds"). After one
    epoch it is TF 98.57 +- 0.15% and Lightning 98.51 +- 0.17% (98.45 +- 0.22% for seeds 0-3 after later changes
    to the random draws): a 98.5% bar sits in the middle of both (the TF
    reference itself misses it on one seed in five). After two epochs it is TF 98.93 +- 0.11% (98.79-99.09) and
    Lightning 99.03 +- 0.07% (98.91-99.10): 98.5% is four standard deviations under the TF mean. A broken port
    (wrong init, optimizer or scaling) lands far below it (untrained: ~10%). Level 3 is the precise check; this one
    proves the recipe trains end to end in both frameworks. The two epochs cost about one minute more than one.
    """
    from tf_ref.train import train as train_tf
    from torch_impl.train import train as train_torch

    recipe = recipe_for("cnn").replace(epochs=2)
    acc_tf = train_tf("cnn", recipe, seed=0, out=tmp_path, progress=False)["test_acc"]
    acc_torch = train_torch("cnn", recipe, seed=0, out=tmp_path, progress=False)["test_acc"]
    assert acc_tf >= 0.985, f"TF: {acc_tf:.4f} < 0.985 after two epochs"
    assert acc_torch >= 0.985, f"torch: {acc_torch:.4f} < 0.985 after two epochs"
    assert abs(acc_tf - acc_torch) <= 0.005, f"TF {acc_tf:.4f} vs torch {acc_torch:.4f}: more than 0.5 points apart"


@pytest.mark.slow
def test_two_real_epochs_of_cnn_in_the_port_alone(tmp_path):
    """The same bar for the Lightning port on its own, with another seed, so that the pass of the suite without
    TensorFlow (scripts/test.sh) trains a real recipe to a real accuracy too. Lightning after two epochs over five
    seeds: 99.03 +- 0.07% (98.91-99.10, RESULTS.md), so 98.5% is seven standard deviations under its mean."""
    from torch_impl.train import train as train_torch

    recipe = recipe_for("cnn").replace(epochs=2)
    history = train_torch("cnn", recipe, seed=1, out=tmp_path, progress=False)
    assert history["test_acc"] >= 0.985, f"torch, seed 1: {history['test_acc']:.4f} < 0.985 after two epochs"
    epochs = json.loads((tmp_path / "cnn" / "torch" / "seed1" / "history.json").read_text())["epochs"]
    assert [row["epoch"] for row in epochs] == [1, 2] and epochs[1]["test_acc"] == pytest.approx(history["test_acc"])
    if os.environ.get("PARITY_REQUIRE_TF") == "0":  # the pass without TensorFlow: it must really be absent
        assert sys.modules.get("tensorflow") is None


def test_restore_best_weights_puts_back_the_best_epoch():
    """Keras's restore_best_weights: at the end of fit the weights of the lowest-val_loss epoch come back."""
    from types import SimpleNamespace

    import torch

    from torch_impl.callbacks import RestoreBestWeights

    module = torch.nn.Linear(2, 1)
    callback = RestoreBestWeights(monitor="val_loss")
    trainer = SimpleNamespace(sanity_checking=False, callback_metrics={}, current_epoch=0, is_global_zero=True)
    for epoch, val_loss in enumerate([0.9, 0.5, 0.7, 0.8]):  # best: epoch 2 (index 1)
        with torch.no_grad():
            module.weight.fill_(float(epoch))
        trainer.current_epoch, trainer.callback_metrics = epoch, {"val_loss": torch.tensor(val_loss)}
        callback.on_validation_end(trainer, module)
    callback.on_fit_end(trainer, module)
    assert callback.best_epoch == 2
    assert torch.all(module.weight == 1.0), f"expected the weights of epoch 2 (all 1.0), got {module.weight}"


def test_restore_best_weights_survives_a_resume():
    """A run checkpointed after its best epoch and resumed must still end on the best epoch's weights."""
    from types import SimpleNamespace

    import torch

    from torch_impl.callbacks import RestoreBestWeights

    module = torch.nn.Linear(2, 1)
    before = RestoreBestWeights(monitor="val_loss")
    trainer = SimpleNamespace(sanity_checking=False, callback_metrics={}, current_epoch=0, is_global_zero=True)
    for epoch, val_loss in enumerate([0.9, 0.5, 0.7]):  # best: epoch 2; the checkpoint is taken after epoch 3
        with torch.no_grad():
            module.weight.fill_(float(epoch))
        trainer.current_epoch, trainer.callback_metrics = epoch, {"val_loss": torch.tensor(val_loss)}
        before.on_validation_end(trainer, module)
    after = RestoreBestWeights(monitor="val_loss")  # a new process, restored from the checkpoint
    after.load_state_dict(torch.load(_saved(before.state_dict()), weights_only=True))
    with torch.no_grad():
        module.weight.fill_(3.0)
    trainer.current_epoch, trainer.callback_metrics = 3, {"val_loss": torch.tensor(0.8)}  # epoch 4: no better
    after.on_validation_end(trainer, module)
    after.on_fit_end(trainer, module)
    assert after.best_epoch == 2
    assert torch.all(module.weight == 1.0), f"expected the weights of epoch 2 (all 1.0), got {module.weight}"


def _saved(obj):
    """`obj` through torch.save into memory, as a checkpoint stores callback state."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


def test_tf_fit_run_resumes(tf, tmp_path, monkeypatch):
    """Tutorial 003's `model.fit` recipe resumes from its last epoch, as the GradientTape loops do."""
    from tf_ref.train import train

    import tf_ref.train

    datasets = []

    def recorded(*args, **kwargs):  # the order of the resumed epoch must follow from its number (fit_dataset)
        datasets.append({k: kwargs[k] for k in ("seed", "epochs", "initial_epoch")})
        return fit_dataset(*args, **kwargs)

    fit_dataset = tf_ref.train.fit_dataset
    monkeypatch.setattr(tf_ref.train, "fit_dataset", recorded)
    recipe = recipe_for("lenet_a").replace(epochs=1)
    train("lenet_a", recipe, out=tmp_path, progress=False, limit_train=64, seed=5)
    history = train("lenet_a", recipe.replace(epochs=2), out=tmp_path, progress=False, limit_train=64, seed=5,
                    resume=True)
    assert [row["epoch"] for row in history["epochs"]] == [1, 2], history["epochs"]
    assert datasets == [{"seed": 5, "epochs": 1, "initial_epoch": 0}, {"seed": 5, "epochs": 2, "initial_epoch": 1}]
    # train_seconds covers both processes: at least every epoch's recorded seconds
    assert history["train_seconds"] >= sum(row["seconds"] for row in history["epochs"]) - 1e-6
    assert "test_acc" in history


def _fit_orders(fit) -> list[list[int]]:
    """The order in which `fit(model)` feeds training examples 0..9 (the input is the example's index), one list per
    epoch: a first layer records every batch it sees in training."""
    import keras
    import tensorflow as tf

    batches = []

    def record(x):
        batches.append(x.numpy().ravel().astype(int).tolist())
        return x

    class Record(keras.layers.Layer):
        def call(self, x, training=False):
            if not training:
                return x
            y = tf.py_function(record, [x], tf.float32)
            y.set_shape(x.shape)
            return y

    inputs = keras.Input((1,))
    model = keras.Model(inputs, keras.layers.Dense(1)(Record()(inputs)))
    model.compile(optimizer="rmsprop", loss="mse")
    fit(model)
    orders, epoch = [], []
    for batch in batches:
        epoch += batch
        if len(epoch) == 10:
            orders.append(epoch)
            epoch = []
    assert not epoch, batches
    return orders


def test_keras_fit_on_arrays_replays_one_order_once_a_seed_is_set(tf):
    """Why tutorial 003's recipe does not call `model.fit(x, y, shuffle=True)` (`tf_ref.train.fit_dataset`): with a
    global seed set, Keras draws the same permutation for every epoch. If this test fails, Keras reshuffles seeded
    runs now and `fit_dataset` could go."""
    import keras

    x = np.arange(10, dtype="float32")[:, None]
    keras.utils.set_random_seed(0)
    orders = _fit_orders(lambda model: model.fit(x, x, batch_size=4, epochs=3, shuffle=True, verbose=0))
    assert sorted(orders[0]) == list(range(10)) and orders[0] != list(range(10))
    assert orders[1] == orders[0] and orders[2] == orders[0]


def test_tf_fit_reshuffles_every_epoch_reproducibly_and_resumes_in_order(tf):
    """`fit_dataset` under `model.fit`: every epoch a new permutation of the whole set, in batches of 4, 4 and 2 as
    Keras cuts them; the same orders for the same seed; a run resumed at epoch 3 sees epoch 3 and 4's orders."""
    import keras

    from tf_ref.train import fit_dataset

    x = np.arange(10, dtype="float32")[:, None]

    def fit(seed, initial_epoch=0):
        def run(model):
            dataset, steps = fit_dataset(x, x, 4, seed=seed, epochs=4, initial_epoch=initial_epoch)
            assert steps == 3
            model.fit(dataset, steps_per_epoch=steps, epochs=4, initial_epoch=initial_epoch, verbose=0, shuffle=False)
        keras.utils.set_random_seed(0)  # as `tf_ref.train.train` does: the case where Keras's own shuffle replays
        return _fit_orders(run)

    orders = fit(seed=3)
    assert len(orders) == 4 and all(sorted(order) == list(range(10)) for order in orders)
    assert len({tuple(order) for order in orders}) == 4, orders
    assert fit(seed=3) == orders
    assert fit(seed=4) != orders
    assert fit(seed=3, initial_epoch=2) == orders[2:]
    unshuffled, _ = fit_dataset(x, x, 4, seed=3, epochs=1, shuffle=False)
    assert [b[0].numpy().ravel().tolist() for b in unshuffled] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_tf_early_stopping_survives_a_resume(tf, tmp_path):
    """The TF twin of the test above: a `model.fit` run checkpointed after its best epoch and resumed in a new
    process keeps EarlyStopping's patience count and still ends on the best epoch's weights."""
    import keras

    from tf_ref.train import _FitCheckpoint

    def fresh():
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        model.compile(optimizer="rmsprop", loss="mse")
        model.optimizer.build(model.trainable_variables)  # as model.fit does
        stopping = keras.callbacks.EarlyStopping(patience=2, restore_best_weights=True)
        checkpoint = _FitCheckpoint(tmp_path / "resume", stopping)
        for callback in (stopping, checkpoint):
            callback.set_model(model)
        return model, stopping, checkpoint

    def epoch_end(model, callbacks, epoch, val_loss):
        for callback in callbacks:
            callback.on_epoch_end(epoch, {"val_loss": val_loss})

    model, stopping, checkpoint = fresh()
    stopping.on_train_begin(), checkpoint.on_train_begin()
    for epoch, val_loss in enumerate([0.9, 0.5, 0.7]):  # best: epoch 2; the last checkpoint is after epoch 3
        model.set_weights([np.full((2, 1), float(epoch), "float32"), np.zeros(1, "float32")])
        epoch_end(model, (stopping, checkpoint), epoch, val_loss)

    model, stopping, checkpoint = fresh()  # a new process
    assert checkpoint.restore(model) == 3
    np.testing.assert_array_equal(model.get_weights()[0], 2.0)  # the last epoch's weights
    stopping.on_train_begin(), checkpoint.on_train_begin()
    assert (stopping.wait, stopping.best_epoch, stopping.best) == (1, 1, 0.5)
    model.set_weights([np.full((2, 1), 3.0, "float32"), np.zeros(1, "float32")])
    epoch_end(model, (stopping, checkpoint), 3, 0.8)  # epoch 4: no better; patience 2 is used up
    assert model.stop_training
    stopping.on_train_end()
    np.testing.assert_array_equal(model.get_weights()[0], 1.0)  # the weights of epoch 2


def test_tf_fit_resume_refuses_a_checkpoint_of_another_model(tf, tmp_path):
    """Resuming a run directory written by another architecture is a clear error, not a partial load."""
    import keras

    from tf_ref.train import _FitCheckpoint

    def model_with(units):
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(units)])
        model.compile(optimizer="rmsprop", loss="mse")
        model.optimizer.build(model.trainable_variables)
        return model

    saved = _FitCheckpoint(tmp_path / "resume", None)
    saved.set_model(model_with(1))
    saved.on_epoch_end(0)
    with pytest.raises(ValueError, match="cannot resume from .*resume"):
        _FitCheckpoint(tmp_path / "resume", None).restore(model_with(3))

def test_tf_summaries_work_after_a_torch_run_in_the_same_process(tf, tmp_path):
    """A torch run switches tensorboard to its TF-free writer; TensorFlow imported later in the same process (a
    user's script, a test session) must still write its summaries."""
    code = (
        "import sys\n"
        "from torch_impl.cpu_tuning import tensorboard_without_tensorflow\n"
        "assert tensorboard_without_tensorflow()\n"
        "from torch.utils.tensorboard import SummaryWriter\n"
        f"w = SummaryWriter({str(tmp_path / 'torch')!r}); w.add_scalar('a', 1.0, 1); w.close()\n"
        "import tf_ref\n"
        "import tensorflow as tf\n"
        "from tf_ref.train import _tb_write\n"
        f"writer = tf.summary.create_file_writer({str(tmp_path / 'tf')!r})\n"
        "_tb_write(writer, {'epoch': 1, 'train_loss': 0.5})\n"
        "writer.flush()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert any((tmp_path / "tf").rglob("events.out.tfevents*"))


def test_epoch_seed_differs_per_rank_and_epoch_and_repeats_on_resume():
    """Under DDP every process is seeded alike: without `EpochSeed` the ranks would draw the same dropout masks
    and augmentations for their shares of a batch, and a resumed run would replay its first epoch's draws."""
    from types import SimpleNamespace

    import torch

    from torch_impl.callbacks import EpochSeed

    def draws(epoch, rank):
        torch.manual_seed(123)  # whatever state the process is in
        EpochSeed(seed=0).on_train_epoch_start(SimpleNamespace(current_epoch=epoch, global_rank=rank), None)
        return torch.rand(4)

    untouched = draws(0, 0)
    torch.manual_seed(123)
    assert torch.equal(untouched, torch.rand(4)), "rank 0's first epoch must keep seed_everything's stream"
    seeded = {(e, r): draws(e, r) for e in (0, 1, 2) for r in (0, 1)}
    keys = list(seeded)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            assert not torch.equal(seeded[a], seeded[b]), f"epoch/rank {a} and {b} draw the same numbers"
    assert torch.equal(draws(1, 1), seeded[(1, 1)])  # a resumed epoch draws what it drew the first time


def test_torch_resume_continues_the_same_run_with_dropout(tmp_path):
    """`cnn` has Dropout(0.4): two epochs in one go and one epoch + a resumed one end on the same weights (same
    data order, optimizer state and random draws)."""
    import torch

    from torch_impl.train import train

    recipe = recipe_for("cnn").replace(epochs=2)
    straight = train("cnn", recipe, out=tmp_path / "straight", progress=False, limit_train=300, deterministic=True)
    train("cnn", recipe.replace(epochs=1), out=tmp_path / "resumed", progress=False, limit_train=300,
          deterministic=True)
    resumed = train("cnn", recipe, out=tmp_path / "resumed", progress=False, limit_train=300, deterministic=True,
                    resume=True)
    assert [row["epoch"] for row in resumed["epochs"]] == [1, 2]
    for (name, a), b in zip(straight["models"][0].state_dict().items(), resumed["models"][0].state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")


def test_runs_of_different_seeds_share_no_member_initialization():
    """`seed + i` gave run 0's member 1 the init of run 1's member 0 (4 of 5 members shared between consecutive
    runs of the best recipe), so runs over seeds were not independent samples."""
    from parity.runs import member_seed

    seeds = {(run, member): member_seed(run, member) for run in range(10) for member in range(5)}
    assert len(set(seeds.values())) == len(seeds)
    assert all(member_seed(run, 0) == run for run in range(10))  # a single model's init seed is the run's seed


def test_a_new_run_sets_earlier_checkpoints_aside_and_a_failed_start_keeps_them(tmp_path, monkeypatch):
    """Nothing lost: a run that fails before training (here: its data cannot be read) leaves the directory's
    checkpoints alone; a new run that starts moves them to checkpoints.replaced-<time> instead of writing
    last-v1.ckpt beside them (where a later --resume would take the old last.ckpt)."""
    from torch_impl.datamodule import MNISTDataModule
    from torch_impl.train import train

    recipe = recipe_for("lenet_a").replace(epochs=1, early_stopping_patience=None)
    train("lenet_a", recipe, out=tmp_path, progress=False, limit_train=64)
    checkpoints = tmp_path / "lenet_a" / "torch" / "seed0" / "checkpoints"
    earlier = {p.name: p.read_bytes() for p in checkpoints.iterdir()}
    assert "last.ckpt" in earlier

    def unreadable(self, stage=None):
        raise OSError("the data file is corrupt")

    with monkeypatch.context() as patch:
        patch.setattr(MNISTDataModule, "setup", unreadable)
        with pytest.raises(OSError, match="corrupt"):
            train("lenet_a", recipe, out=tmp_path, progress=False, limit_train=64)
    assert {p.name: p.read_bytes() for p in checkpoints.iterdir()} == earlier

    train("lenet_a", recipe, out=tmp_path, progress=False, limit_train=64)
    (kept,) = checkpoints.parent.glob("checkpoints.replaced-*")
    assert {p.name: p.read_bytes() for p in kept.iterdir()} == earlier
    assert sorted(p.name for p in checkpoints.iterdir()) == sorted(earlier)  # no last-v1.ckpt


@pytest.mark.parametrize("bad", [["--epochs", "0"], ["--set", "scale=0"], ["--set", "epochs=abc"],
                                 ["--batch-size", "-5"], ["--set", "dataset=nosuch"], ["--set", "drop_last=maybe"]])
def test_nonsense_recipe_values_are_refused_before_anything_runs(tmp_path, capsys, bad):
    """`--set scale=0 --epochs 0` used to "train" and report 9.8% accuracy over the run's history."""
    from parity.cli import main

    assert main(["train", "cnn", "--framework", "torch", "--out", str(tmp_path), "--no-progress", *bad]) == 2
    err = capsys.readouterr().err
    assert "parity train: error: recipe tut001_cnn: invalid" in err and "expected" in err, err
    assert not (tmp_path / "cnn").exists()


@pytest.mark.parametrize("framework", ["tf", "torch"])
def test_tutorial_001_second_pass_updates_batchnorm_statistics_twice(framework, tmp_path, request):
    """Tutorial 001 runs `loss = loss_fn(model, images, labels)` (training mode) after each update: BatchNorm's
    moving mean, starting at 0 with momentum 0.99, is about 0.0199 x the batch mean after one step instead of 0.01 x.
    One step of `bn_cnn` with the tutorial's loop ("tape") against the same step without the second pass ("tf1")."""
    if framework == "tf":
        request.getfixturevalue("tf")
        from tf_ref.train import train
        from tf_ref.weights import get_weights

        def first_moving_mean(result):
            return np.asarray(get_weights(result["models"][0])["conv1/bn/moving_mean"])
    else:
        from torch_impl.train import train

        def first_moving_mean(result):
            return result["models"][0].model.members[0].conv1.bn.running_mean.numpy()

    recipe = recipe_for("bn_cnn").replace(members=1, augment=None, epochs=1, shuffle=False)
    means = {loop: first_moving_mean(train("bn_cnn", recipe.replace(loop=loop), out=tmp_path / loop,
                                           progress=False, limit_train=100))
             for loop in ("tape", "tf1")}
    ratio = np.abs(means["tape"]).sum() / np.abs(means["tf1"]).sum()
    assert 1.8 < ratio < 2.2, f"moving mean after one step: {ratio:.3f} x the single-update one (expected ~1.99)"


@pytest.mark.parametrize("shared", [True, False], ids=["shared_optimizer", "per_member_optimizers"])
def test_ensemble_optimizer_sharing_steps_the_schedule_alike_in_both_frameworks(tf, tmp_path, shared):
    """Tutorial 001's one Adam for all members steps its schedule once per member per batch (the quirk); with
    `shared_optimizer=False` (`--fix-quirks`) each member's own Adam steps it once per batch. One batch per epoch,
    a schedule that halves every epoch of batches, 2 members: the rates after epochs 1 and 2 are 1e-3 / 4, 1e-3 / 16
    shared, and 1e-3 / 2, 1e-3 / 4 per member, in both frameworks."""
    from tf_ref.train import train as tf_train
    from torch_impl.train import train as torch_train

    recipe = recipe_for("bn_cnn").replace(members=2, augment=None, epochs=2, lr_decay_epochs=1.0,
                                          shared_optimizer=shared)
    expected = [1e-3 / 4, 1e-3 / 16] if shared else [1e-3 / 2, 1e-3 / 4]
    for train in (torch_train, tf_train):
        history = train("bn_cnn", recipe, seed=0, out=tmp_path, progress=False, limit_train=recipe.batch_size)
        np.testing.assert_allclose([row["lr"] for row in history["epochs"]], expected, rtol=1e-6,
                                   err_msg=f"{train.__module__}, shared_optimizer={shared}")


def test_fix_quirks_keeps_tutorial_001s_decay_period_with_per_member_optimizers():
    """The corrected best recipe gives each member its own Adam; its schedule must still halve the rate every 5
    epochs, as the tutorial's shared optimizer (25 epochs of steps, counted 5x per batch) did."""
    from parity.cli import build_parser, recipe_from_args

    def halving_period(recipe):  # in epochs of batches
        return recipe.lr_decay_epochs / (recipe.members if recipe.shared_optimizer else 1)

    quirky = recipe_from_args(build_parser().parse_args(["train", "bn_cnn"]))
    fixed = recipe_from_args(build_parser().parse_args(["train", "bn_cnn", "--fix-quirks"]))
    assert quirky.shared_optimizer and not fixed.shared_optimizer
    assert halving_period(quirky) == halving_period(fixed) == 5
    assert (quirky.shift_high, fixed.shift_high) == (2, 3)
    ensemble = recipe_from_args(build_parser().parse_args(["train", "cnn_ensemble3", "--fix-quirks"]))
    assert ensemble.shared_optimizer is False and ensemble.lr_decay_rate is None


def test_tf_resume_with_other_optimizer_sharing_is_a_clear_error(tf, tmp_path):
    from tf_ref.train import train

    recipe = recipe_for("cnn_ensemble3").replace(members=2, epochs=1)
    train("cnn_ensemble3", recipe, out=tmp_path, progress=False, limit_train=100)
    with pytest.raises(ValueError, match=r"shared_optimizer=True, but shared_optimizer=False.*"
                                         r"--set shared_optimizer=true"):
        train("cnn_ensemble3", recipe.replace(epochs=2, shared_optimizer=False), out=tmp_path, progress=False,
              limit_train=100, resume=True)
    with pytest.raises(ValueError, match=r"holds 2 member\(s\), but 3 were asked for.*--members 2"):
        train("cnn_ensemble3", recipe.replace(epochs=2, members=3), out=tmp_path, progress=False,
              limit_train=100, resume=True)
    history = train("cnn_ensemble3", recipe.replace(epochs=2), out=tmp_path, progress=False, limit_train=100,
                    resume=True)
    assert [row["epoch"] for row in history["epochs"]] == [1, 2]


@pytest.mark.parametrize("recipe_name", sorted(RECIPES))
def test_long_runs_keep_checkpoints_chosen_without_the_test_set(recipe_name, tmp_path):
    """Tutorial 004 evaluates the test set every epoch; keeping the checkpoints with the best test accuracy would
    select a model on the test set. Long runs keep the best by validation accuracy, or the latest without one."""
    from torch_impl.train import epoch_checkpoints

    recipe = RECIPES[recipe_name]
    for epochs in (recipe.epochs, 200):
        callback = epoch_checkpoints(recipe.replace(epochs=epochs), tmp_path)
        assert callback.monitor is None or not callback.monitor.startswith("test"), (recipe_name, callback.monitor)
        if epochs <= 20:
            assert callback.save_top_k == -1  # every epoch
        elif recipe.split == "full":
            assert (callback.monitor, callback.save_top_k) == (None, 1)
        else:
            assert (callback.monitor, callback.mode, callback.save_top_k) == ("val_acc", "max", 3)


NAN, INF = float("nan"), float("inf")


def _keras_early_stopping(values, patience):
    """(epochs run, best epoch, 1-based) of Keras's EarlyStopping(restore_best_weights=True) fed `values`."""
    import keras

    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    model.stop_training = False
    callback = keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience, restore_best_weights=True)
    callback.set_model(model)
    callback.on_train_begin()
    for epoch, value in enumerate(values):
        callback.on_epoch_end(epoch, {"val_loss": value})
        if model.stop_training:
            break
    return epoch + 1, callback.best_epoch + 1


def _lightning_early_stopping(values, patience):
    """The same through `Trainer.fit` with the port's KerasEarlyStopping and RestoreBestWeights."""
    import lightning as L
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from torch_impl.callbacks import KerasEarlyStopping, RestoreBestWeights

    class Scripted(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch, batch_idx):
            return (self.w - 1.0).pow(2).sum()

        def validation_step(self, batch, batch_idx):
            self.log("val_loss", torch.tensor(values[self.current_epoch]))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    loader = DataLoader(TensorDataset(torch.zeros(1, 1)), batch_size=1)
    restore = RestoreBestWeights(monitor="val_loss")
    trainer = L.Trainer(max_epochs=len(values), accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[KerasEarlyStopping(monitor="val_loss", patience=patience), restore])
    trainer.fit(Scripted(), loader, loader)
    return trainer.current_epoch, restore.best_epoch


# (val_loss per epoch, (epochs run, best epoch)) with patience 3, by Keras's rule: an epoch improves if its value is
# below the best so far, the first epoch's value is the first best whatever it is (NaN included), and training
# stops after `patience` epochs in a row without improvement
EARLY_STOPPING_CASES = [
    pytest.param([1.0, 0.9, 0.8, 0.85, 0.86, 0.87, 0.9, 0.95], (6, 3), id="finite"),  # stops 3 epochs after the best
    pytest.param([1.0, 0.9, NAN, NAN, NAN, 0.5, 0.4, 0.3], (5, 2), id="nan_mid_run"),  # NaN: no improvement
    pytest.param([NAN, 1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4], (4, 1), id="nan_first"),  # a NaN first best, for good
    pytest.param([INF, 1.0, 0.9, 1.1, 1.2, 1.3, 1.4, 1.5], (6, 3), id="inf_first"),
    pytest.param([1.0, 0.9, INF, 0.8, INF, INF, INF, 0.1], (7, 4), id="inf_mid_run"),
]


@pytest.mark.parametrize(("values", "expected"), EARLY_STOPPING_CASES)
def test_early_stopping_stops_and_restores_where_keras_does(tf, values, expected):
    """Lightning's EarlyStopping stops at once on a NaN or infinite val_loss; Keras counts it as an epoch without
    improvement. The port's KerasEarlyStopping must stop after as many epochs as Keras's and restore the same epoch."""
    assert _keras_early_stopping(values, patience=3) == expected
    assert _lightning_early_stopping(values, patience=3) == expected


@pytest.mark.parametrize(("values", "expected"), EARLY_STOPPING_CASES)
def test_keras_early_stopping_by_the_rule_alone(values, expected):
    """The same cases without TensorFlow: the port's callbacks against the expected (epochs run, best epoch)."""
    assert _lightning_early_stopping(values, patience=3) == expected


def test_keras_early_stopping_resumes_from_lightnings_checkpoint_state():
    """Same state key as Lightning's EarlyStopping (checkpoints of either resume with the other); a saved state
    without `seen_first` is read from its best score."""
    import torch
    from lightning.pytorch.callbacks import EarlyStopping

    from torch_impl.callbacks import KerasEarlyStopping

    ours, lightnings = KerasEarlyStopping("val_loss", patience=10), EarlyStopping("val_loss", patience=10)
    assert ours.state_key == lightnings.state_key
    for best, seen in ((torch.tensor(0.3), True), (torch.tensor(INF), False)):
        lightnings.best_score, lightnings.wait_count = best, 4
        resumed = KerasEarlyStopping("val_loss", patience=10)
        resumed.load_state_dict(torch.load(_saved(lightnings.state_dict()), weights_only=False))
        assert (resumed.seen_first, resumed.wait_count) == (seen, 4)


def test_torch_resume_with_other_optimizer_sharing_is_a_clear_error(tmp_path):
    from torch_impl.train import train

    recipe = recipe_for("cnn_ensemble3").replace(members=2, epochs=1)
    train("cnn_ensemble3", recipe, out=tmp_path, progress=False, limit_train=100)
    with pytest.raises(ValueError, match=r"shared_optimizer=True, but shared_optimizer=False.*"
                                         r"--set shared_optimizer="):
        train("cnn_ensemble3", recipe.replace(epochs=2, shared_optimizer=False), out=tmp_path, progress=False,
              limit_train=100, resume=True)


@pytest.mark.parametrize("name", ["lenet_a", "lenet_c", "lenet_d", "inception_e"])
def test_lightning_fit_takes_keras_fits_steps_from_one_initialization(tf, name, tmp_path, monkeypatch):
    """The two whole training pipelines of tutorial 003, not only their update step: `torch_impl.train.train`
    (Lightning's Trainer, the datamodule, the callbacks) and `tf_ref.train.train` (`model.fit` on `fit_dataset`,
    EarlyStopping, the callbacks), started from one initialization on the same batches (unshuffled, so both take
    the first images in order), end with the same weights and the same history rows. Two epochs of three steps, so
    that what runs between epochs (validation, checkpoints, early stopping's bookkeeping, the history) is between
    them too. (`lenet_b` is left out: each framework draws its own dropout masks.)

    Tolerance: float32. From one initialization the two frameworks' float32 trajectories agree to rounding for the
    first 10-60 steps of this recipe and then part (`results/same_init_divergence/`: RMSprop on raw 0-255 pixels
    amplifies rounding), so the run stops after 6 steps, where they agree to about 1e-6; a step taken differently
    (another batch, scaling, loss or update) moves weights by about lr * 3 = 3e-3.
    """
    import copy

    import torch_impl.lightning_module as lightning_module
    import tf_ref.models
    from parity.interchange import tf_to_torch, torch_to_tf
    from tf_ref.train import train as train_tf
    from tf_ref.weights import get_weights as tf_get
    from tf_ref.weights import set_weights as tf_set
    from torch_impl.models import build_member
    from torch_impl.train import train as train_torch
    from torch_impl.weights import get_weights

    steps, epochs = 3, 2
    recipe = recipe_for(name).replace(epochs=epochs, shuffle=False)
    start = build_member(name, seed=5)
    monkeypatch.setattr(lightning_module, "build_member", lambda model_name, seed=None: copy.deepcopy(start))
    build_tf = tf_ref.models.build_model

    def tf_from_the_same_start(model_name, **kwargs):
        model = build_tf(model_name, **kwargs)
        tf_set(model, torch_to_tf(name, get_weights(start)))
        return model

    monkeypatch.setattr(tf_ref.models, "build_model", tf_from_the_same_start)
    runs = {fw: train(name, recipe, seed=0, out=tmp_path, progress=False, limit_train=steps * recipe.batch_size)
            for fw, train in (("torch", train_torch), ("tf", train_tf))}
    torch_weights = get_weights(runs["torch"]["models"][0].model.members[0])
    tf_weights = tf_to_torch(name, tf_get(runs["tf"]["models"][0]))
    moved = max(float(np.abs(w - get_weights(start)[k]).max()) for k, w in torch_weights.items())
    assert moved > 1e-3, f"{name}: the weights hardly moved ({moved:.2g}): the run did not train"
    apart = {k: float(np.abs(w - tf_weights[k]).max()) for k, w in torch_weights.items()}
    worst = max(apart, key=apart.get)
    assert apart[worst] <= 2e-5, (f"{name}: after {steps} steps {worst} differs by {apart[worst]:.3g} "
                                  f"(moved {moved:.3g})")
    assert [len(run["epochs"]) for run in runs.values()] == [epochs, epochs]
    for torch_row, tf_row in zip(runs["torch"]["epochs"], runs["tf"]["epochs"]):
        for key in ("train_loss", "val_loss", "val_acc", "test_acc"):
            assert torch_row[key] == pytest.approx(tf_row[key], rel=1e-4, abs=1e-6), (name, key, torch_row, tf_row)
    assert runs["torch"]["test_acc"] == pytest.approx(runs["tf"]["test_acc"], abs=1e-6)
