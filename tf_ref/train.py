"""The tutorials' training procedures in TensorFlow 2 / Keras 3.

- "tape" (tutorial 001): a custom `tf.GradientTape` loop; for an ensemble one Adam is shared by all members and
  applied once per member per batch; train accuracy is measured in eval mode after the step, on the batch just
  trained on; a checkpoint every epoch.
- "tf1" (tutorials 002, 004): the TF1 session loops as `tf.function` steps: Adam with TF1's epsilon 1e-8,
  validation (002) and the full test set (004) evaluated after every epoch; 004 walks the data in a fixed order
  and drops the last partial batch.
- "fit" (tutorial 003): `model.compile()` with no optimizer named (Keras's default RMSprop) and `model.fit` with
  EarlyStopping(patience=10, restore_best_weights=True) and the TensorBoard callback.

Every run writes the history file, TensorBoard scalars and checkpoints described in `parity.runs`.
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from parity import data as pdata
from parity.catalog import Recipe, get_spec
from parity.runs import TB_TAGS, History, member_seed, run_dir
from tf_ref.models import build_member


def prepare(x: np.ndarray, scale: float) -> np.ndarray:
    """uint8 (N, 28, 28) -> float32 (N, 28, 28, 1) NHWC, divided by the recipe's scale."""
    if x.ndim != 3 or x.shape[1:] != (28, 28):
        raise ValueError(f"expected images of shape (N, 28, 28), got {x.shape}")
    return (x.astype(np.float32) / np.float32(scale))[..., None]


def fit_dataset(x: np.ndarray, y: np.ndarray, batch_size: int, *, seed: int, epochs: int, initial_epoch: int = 0,
                shuffle: bool = True) -> tuple[tf.data.Dataset, int]:
    """The training set for `model.fit`, epochs `initial_epoch`..`epochs - 1` in one dataset; returns it and the
    steps per epoch (pass both: `model.fit(dataset, steps_per_epoch=steps, ...)`).

    Epoch e is ordered by a stateless shuffle keyed by (seed, e): a new order every epoch, the same in every run of
    the seed, and the same after a resume. Why not `model.fit(x, y, shuffle=True)`, as tutorial 003 wrote it: Keras
    draws each epoch's permutation with a stateful `tf.random.shuffle` inside a `tf.data` map that it instantiates
    again for every epoch. Once a global seed is set (`keras.utils.set_random_seed`, which a reproducible run needs),
    that op starts from the same seed each time and **every epoch replays the first epoch's order**. The unseeded
    tutorial reshuffles. Batches are as Keras cuts them: in order, the last one partial.
    """
    n = len(x)
    if len(y) != n:
        raise ValueError(f"{n} images but {len(y)} labels")

    def epoch_batches(epoch):
        indices = tf.range(n, dtype=tf.int64)
        if shuffle:
            key = tf.stack([tf.constant(seed, tf.int64), epoch])
            indices = tf.random.experimental.stateless_shuffle(indices, seed=key)
        return tf.data.Dataset.from_tensor_slices(indices).batch(batch_size)

    index_batches = tf.data.Dataset.range(initial_epoch, epochs).flat_map(epoch_batches)
    arrays = tf.data.Dataset.from_tensors((x, y)).repeat()
    dataset = tf.data.Dataset.zip((index_batches, arrays)).map(
        lambda i, xy: (tf.gather(xy[0], i), tf.gather(xy[1], i)), num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.prefetch(tf.data.AUTOTUNE), -(-n // batch_size)


def make_optimizer(recipe: Recipe, steps_per_epoch: int):
    if recipe.optimizer == "rmsprop":
        return keras.optimizers.RMSprop(learning_rate=recipe.lr, rho=0.9, epsilon=recipe.epsilon)
    lr = recipe.lr
    if recipe.lr_decay_rate is not None:
        # the tutorial: decay_steps = X_train.shape[0] / batch_size * 5 * 5 = 25 epochs of batches; with one
        # optimizer stepping once per member per batch, that is 5 epochs for 5 members (a quirk kept as is)
        lr = keras.optimizers.schedules.ExponentialDecay(
            recipe.lr, decay_steps=steps_per_epoch * recipe.lr_decay_epochs, decay_rate=recipe.lr_decay_rate,
            staircase=True,
        )
    return keras.optimizers.Adam(learning_rate=lr, epsilon=recipe.epsilon)


def _tb_write(writer, row: dict) -> None:
    with writer.as_default():
        for key, value in row.items():
            if key in TB_TAGS:
                tf.summary.scalar(TB_TAGS[key], value, step=row["epoch"])
    writer.flush()


def _load(recipe: Recipe, seed: int, data_dir, limit_train: int | None):
    split = pdata.load_split(recipe.dataset, recipe.split, source_dir=data_dir)
    x_train, y_train = split.x_train, split.y_train
    if limit_train:  # before augmentation: N originals (and their copies)
        x_train, y_train = x_train[:limit_train], y_train[:limit_train]
    if recipe.augment == "tut001":
        from parity.augment import cached_augment_tut001

        x_train, y_train = cached_augment_tut001(
            x_train, y_train, seed=seed, cache_dir=pdata.default_cache_dir() / "augmented",
            shift_low=recipe.shift_low, shift_high=recipe.shift_high,
        )
    return split, x_train, y_train


def train(model_name: str, recipe: Recipe, *, seed: int = 0, out=None, data_dir=None, progress: bool = True,
          limit_train: int | None = None, resume: bool = False, deterministic: bool = False) -> dict:
    """Train `model_name` with `recipe`; returns the history dict (also written to the run directory)."""
    get_spec(model_name)  # an unknown name fails here, listing the valid ones
    if deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(seed)
    directory = run_dir(out, model_name, "tf", seed)
    history = History(directory, model_name, "tf", recipe, seed)
    split, x_train, y_train = _load(recipe, seed, data_dir, limit_train)
    if recipe.loop == "fit":
        return _train_fit(model_name, recipe, split, x_train, y_train, directory, history, seed, progress, resume)

    members = [build_member(model_name, seed=member_seed(seed, i)) for i in range(recipe.members)]
    n_batches = len(x_train) // recipe.batch_size if recipe.drop_last else -(-len(x_train) // recipe.batch_size)
    if recipe.shared_optimizer or len(members) == 1:
        # the tutorial: one optimizer for all members, stepped once per member per batch
        optimizer = make_optimizer(recipe, n_batches)
        optimizer.build([v for m in members for v in m.trainable_variables])  # Keras 3: all variables up front
        optimizers = [optimizer] * len(members)
        saved_optimizers = {"optimizer": optimizer}
    else:  # the corrected ensemble: each member its own optimizer, step counter and schedule
        optimizers = [make_optimizer(recipe, n_batches) for _ in members]
        for opt, m in zip(optimizers, members):
            opt.build(m.trainable_variables)
        optimizer = optimizers[0]
        saved_optimizers = {f"optimizer{i}": opt for i, opt in enumerate(optimizers)}

    epoch_var = tf.Variable(0, dtype=tf.int64, name="epoch")
    checkpoint = tf.train.Checkpoint(**saved_optimizers, epoch=epoch_var,
                                     **{f"member{i}": m for i, m in enumerate(members)})
    manager = tf.train.CheckpointManager(checkpoint, directory / "checkpoints", max_to_keep=3)
    if resume and manager.latest_checkpoint:
        _check_resume_layout(manager.latest_checkpoint, recipe, [*saved_optimizers, "epoch"], len(members))
        checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
        previous = directory / "history.json"
        if previous.exists():
            history.epochs = [r for r in json.loads(previous.read_text())["epochs"] if r["epoch"] <= int(epoch_var)]

    def loss_fn(logits, labels):
        return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits))

    def make_step(model, optimizer):
        @tf.function(reduce_retracing=True)
        def step(images, labels):
            with tf.GradientTape() as tape:
                logits = model(images, training=True)
                loss = loss_fn(logits, labels)
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            correct = tf.equal(tf.argmax(logits, 1, output_type=tf.int64), labels)
            if recipe.loop == "tape":
                # tutorial 001: `loss = loss_fn(model, images, labels)` after the update, in training mode: the loss
                # it prints; the pass also updates BatchNorm's moving statistics a second time
                loss = loss_fn(model(images, training=True), labels)
            return loss, tf.reduce_mean(tf.cast(correct, tf.float32))

        return step

    steps = [make_step(m, opt) for m, opt in zip(members, optimizers)]

    @tf.function(reduce_retracing=True)
    def predict(images):
        return tf.add_n([m(images, training=False) for m in members])

    def evaluate(x, y, batch=1000):
        total_loss, correct = 0.0, 0
        for i in range(0, len(x), batch):
            xb = prepare(x[i:i + batch], recipe.scale)
            yb = y[i:i + batch].astype(np.int64)
            logits = predict(xb).numpy()
            total_loss += float(loss_fn(logits, yb)) * len(yb)
            correct += int((logits.argmax(1) == yb).sum())
        return total_loss / len(x), correct / len(x)

    writer = tf.summary.create_file_writer(str(directory / "tensorboard"))
    y_train64 = y_train.astype(np.int64)
    scale = np.float32(recipe.scale)

    def to_float(images, labels):  # scaled per batch: the 300k augmented images stay uint8 in memory
        return tf.cast(images, tf.float32)[..., None] / scale, labels
    started = time.perf_counter()
    for epoch in range(int(epoch_var) + 1, recipe.epochs + 1):
        t0 = time.perf_counter()
        ds = tf.data.Dataset.from_tensor_slices((x_train, y_train64))
        if recipe.shuffle:
            ds = ds.shuffle(buffer_size=len(x_train), seed=seed + epoch, reshuffle_each_iteration=False)
        ds = ds.batch(recipe.batch_size, drop_remainder=recipe.drop_last).map(to_float).prefetch(tf.data.AUTOTUNE)
        bar = keras.utils.Progbar(n_batches, verbose=1 if progress else 0, unit_name="step")
        sum_loss = sum_acc = 0.0
        for i, (images, labels) in enumerate(ds):
            losses, accs = [], []
            for step in steps:
                loss, acc = step(images, labels)
                losses.append(float(loss))
                accs.append(float(acc))
            if recipe.loop == "tape":
                # tutorial 001: train accuracy of the (ensemble) prediction in eval mode, after the step
                accs = [float(np.mean(np.argmax(predict(images).numpy(), 1) == labels.numpy()))]
            sum_loss += float(np.mean(losses))
            sum_acc += float(np.mean(accs))
            bar.update(i + 1, values=[("loss", float(np.mean(losses))), ("acc", float(np.mean(accs)))])
        row = {"epoch": epoch, "train_loss": sum_loss / n_batches, "train_acc": sum_acc / n_batches,
               "lr": current_lr_at(optimizer)}
        if split.x_val is not None:
            row["val_loss"], row["val_acc"] = evaluate(split.x_val, split.y_val)
        row["test_loss"], row["test_acc"] = evaluate(split.x_test, split.y_test)
        row["seconds"] = time.perf_counter() - t0
        history.add_epoch(row)
        _tb_write(writer, row)
        epoch_var.assign(epoch)
        manager.save(checkpoint_number=epoch)
        if progress:
            print(_epoch_line(row))
    test_loss, test_acc = evaluate(split.x_test, split.y_test)
    history.finish(test_loss=test_loss, test_acc=test_acc, train_seconds=time.perf_counter() - started)
    result = history.as_dict()
    result["models"] = members
    return result


def _check_resume_layout(path: str, recipe: Recipe, names: list[str], members: int) -> None:
    """A checkpoint of another member count or optimizer sharing would fail deep in `tf.train.Checkpoint`; say
    which setting differs instead."""
    from tensorflow.core.protobuf.trackable_object_graph_pb2 import TrackableObjectGraph

    graph = TrackableObjectGraph()  # the checkpoint's objects (variable names follow their first path only)
    graph.ParseFromString(tf.train.load_checkpoint(path).get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
    saved = {child.local_name for child in graph.nodes[0].children} - {"save_counter"}
    saved_members = sum(name.startswith("member") for name in saved)
    if saved_members != members:
        raise ValueError(f"this checkpoint holds {saved_members} member(s), but {members} were asked for; resume it "
                         f"with --members {saved_members}, or start a new run in another --out directory")
    saved_shared = "optimizer" in saved
    if {n for n in saved if not n.startswith("member")} != set(names):
        raise ValueError(f"this checkpoint was trained with shared_optimizer={saved_shared}, but "
                         f"shared_optimizer={recipe.shared_optimizer} was asked for; resume it with "
                         f"--set shared_optimizer={str(saved_shared).lower()}, or start a new run in another "
                         f"--out directory")


def current_lr_at(optimizer) -> float:
    """The rate the optimizer's next step will use (a schedule is evaluated at its step counter)."""
    lr = optimizer.learning_rate
    if isinstance(optimizer._learning_rate, keras.optimizers.schedules.LearningRateSchedule):
        lr = optimizer._learning_rate(optimizer.iterations)
    return float(keras.ops.convert_to_numpy(lr))


def _epoch_line(row: dict) -> str:
    parts = [f"Epoch {row['epoch']}"]
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc"):
        if key in row:
            parts.append(f"{key}: {row[key]:.4f}")
    return " - ".join(parts)


class _HistoryCallback(keras.callbacks.Callback):
    """Writes the shared history format and TensorBoard tags; evaluates the test split after every epoch."""

    def __init__(self, history: History, writer, x_test, y_test, progress: bool):
        super().__init__()
        self.history_file, self.writer = history, writer
        self.x_test, self.y_test, self.progress = x_test, y_test, progress
        self.t0 = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self.t0 = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        test_loss, test_acc = self.model.evaluate(self.x_test, self.y_test, batch_size=1000, verbose=0)
        row = {"epoch": epoch + 1, "train_loss": logs.get("loss"), "train_acc": logs.get("accuracy"),
               "val_loss": logs.get("val_loss"), "val_acc": logs.get("val_accuracy"), "test_loss": test_loss,
               "test_acc": test_acc, "lr": current_lr_at(self.model.optimizer),
               "seconds": time.perf_counter() - self.t0}
        self.history_file.add_epoch(row)
        _tb_write(self.writer, row)


class _FitCheckpoint(keras.callbacks.Callback):
    """Checkpoint and resume for `model.fit`: after every epoch, the model with its optimizer (`save_weights`),
    the epoch, and EarlyStopping's state with its best weights, written together and swapped in as one directory
    so that they always belong to the same epoch. Keras's `BackupAndRestore` keeps the first two only: a resumed
    run would forget its best epoch and restore the wrong weights at the end. List it after the EarlyStopping."""

    def __init__(self, directory: Path, early_stopping: keras.callbacks.EarlyStopping | None):
        super().__init__()
        self.directory, self.early_stopping = Path(directory), early_stopping
        self._restored_state: dict | None = None

    def restore(self, model: keras.Model) -> int:
        """Load the last checkpoint into `model` (compiled); returns the epoch to start from (0: none saved)."""
        if not (self.directory / "state.json").exists():
            return 0
        model.optimizer.build(model.trainable_variables)  # its variables must exist to receive the saved ones
        with warnings.catch_warnings():  # Keras only warns when it skips the optimizer's state: resume wrongly
            warnings.filterwarnings("error", message="Skipping variable loading")
            try:
                model.load_weights(self.directory / "model.weights.h5")
            except (UserWarning, ValueError) as error:
                raise ValueError(f"cannot resume from {self.directory}: {error}. Was the run directory written by "
                                 "another model or recipe? Use another --out, or run without --resume.") from None
        self._restored_state = json.loads((self.directory / "state.json").read_text())
        return self._restored_state["epoch"]

    def on_train_begin(self, logs=None):  # after EarlyStopping.on_train_begin, which resets its state
        stopping, state = self.early_stopping, (self._restored_state or {}).get("early_stopping")
        if stopping is None or state is None:
            return
        stopping.wait, stopping.best = state["wait"], state["best"]
        stopping.best_epoch, stopping.stopped_epoch = state["best_epoch"], state["stopped_epoch"]
        best = self.directory / "best_weights.npz"
        if best.exists():
            with np.load(best) as arrays:
                stopping.best_weights = [arrays[f"arr_{i}"] for i in range(len(arrays.files))]

    def on_epoch_end(self, epoch, logs=None):
        staging = self.directory.with_name(self.directory.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        self.model.save_weights(staging / "model.weights.h5")
        state: dict = {"epoch": epoch + 1}
        stopping = self.early_stopping
        if stopping is not None:
            state["early_stopping"] = {"wait": stopping.wait, "best_epoch": stopping.best_epoch,
                                       "stopped_epoch": stopping.stopped_epoch,
                                       "best": None if stopping.best is None else float(stopping.best)}
            if stopping.best_weights is not None:
                np.savez(staging / "best_weights.npz", *stopping.best_weights)
        (staging / "state.json").write_text(json.dumps(state))
        previous = self.directory.with_name(self.directory.name + ".previous")
        shutil.rmtree(previous, ignore_errors=True)
        if self.directory.exists():
            self.directory.rename(previous)
        staging.rename(self.directory)
        shutil.rmtree(previous, ignore_errors=True)


def _train_fit(model_name, recipe, split, x_train, y_train, directory: Path, history: History, seed, progress,
               resume: bool = False):
    from tf_ref.models import build_model

    model = build_model(model_name, seed=seed)
    model.compile(optimizer=make_optimizer(recipe, 0), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    x_val, x_test = prepare(split.x_val, recipe.scale), prepare(split.x_test, recipe.scale)
    y_val, y_test = split.y_val.astype(np.int64), split.y_test.astype(np.int64)
    writer = tf.summary.create_file_writer(str(directory / "tensorboard"))
    stopping = None
    if recipe.early_stopping_patience:
        stopping = keras.callbacks.EarlyStopping(patience=recipe.early_stopping_patience, restore_best_weights=True)
    checkpoint = _FitCheckpoint(directory / "checkpoints" / "resume", stopping)
    initial_epoch = checkpoint.restore(model) if resume else 0
    if initial_epoch:
        previous = directory / "history.json"
        if previous.exists():
            history.epochs = [r for r in json.loads(previous.read_text())["epochs"] if r["epoch"] <= initial_epoch]
    callbacks = [
        keras.callbacks.TensorBoard(str(directory / "tensorboard" / "keras")),
        _HistoryCallback(history, writer, x_test, y_test, progress),
        keras.callbacks.ModelCheckpoint(str(directory / "checkpoints" / "last.weights.h5"), save_weights_only=True),
        *([stopping] if stopping else []),
        checkpoint,
    ]
    (directory / "checkpoints").mkdir(exist_ok=True)
    started = time.perf_counter()
    dataset, steps = fit_dataset(prepare(x_train, recipe.scale), y_train.astype(np.int64), recipe.batch_size,
                                 seed=seed, epochs=recipe.epochs, initial_epoch=initial_epoch, shuffle=recipe.shuffle)
    model.fit(dataset, steps_per_epoch=steps, epochs=recipe.epochs, initial_epoch=initial_epoch,
              validation_data=(x_val, y_val), validation_batch_size=recipe.batch_size, callbacks=callbacks,
              verbose=1 if progress else 0, shuffle=False)  # the dataset shuffles (fit_dataset)
    test_loss, test_acc = model.evaluate(x_test, y_test, batch_size=1000, verbose=0)
    model.save(directory / "checkpoints" / "best.keras")
    history.finish(test_loss=test_loss, test_acc=test_acc, train_seconds=time.perf_counter() - started)
    result = history.as_dict()
    result["models"] = [model]
    return result
