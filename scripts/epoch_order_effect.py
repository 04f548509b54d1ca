"""How the order of the training set across epochs changes tutorial 003's training: one run, one JSON line.

Tutorial 003's recipe (RMSprop with Keras's defaults, batch 32, the 60,000 raw 0-255 MNIST training images, no
early stopping) for a fixed number of epochs, four ways; the line holds the mean training loss of every epoch:

- ``torch``: a bare PyTorch loop (the port's model and ``KerasRMSprop``), a new permutation every epoch;
- ``tf_tape``: a bare ``tf.GradientTape`` loop, the same permutations;
- ``keras_fit``: ``model.fit(x, y, shuffle=True)`` after ``keras.utils.set_random_seed(seed)``, as the reference
  ran before ``tf_ref.train.fit_dataset``: Keras then replays the first epoch's order in every epoch;
- ``fit_dataset``: ``model.fit`` on ``tf_ref.train.fit_dataset``, the reference's recipe now.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/epoch_order_effect.py ARM MODEL SEED EPOCHS >> results.jsonl
    .venv/bin/python scripts/epoch_order_effect.py summary results.jsonl     # the table

Single-threaded in both frameworks, so two runs can share a 2-core machine. RESULTS.md has the table.
"""

import json
import sys

import numpy as np

ARMS = ("torch", "tf_tape", "keras_fit", "fit_dataset")


def summary(path: str) -> str:
    """A markdown table of the runs in a JSON-lines file: per arm, the seeds and the mean (sd) loss of each epoch."""
    import statistics

    runs: dict[str, list[list[float]]] = {}
    for line in open(path):
        if line.strip():
            run = json.loads(line)
            runs.setdefault(run["arm"], []).append(run["train_loss"])
    epochs = min(len(losses) for curves in runs.values() for losses in curves)
    lines = ["| arm | seeds | " + " | ".join(f"epoch {e + 1}" for e in range(epochs)) + " |",
             "|---|---|" + "---|" * epochs]
    for arm in ARMS:
        curves = runs.get(arm)
        if curves:
            cells = []
            for e in range(epochs):
                values = [c[e] for c in curves]
                sd = statistics.stdev(values) if len(values) > 1 else float("nan")
                cells.append(f"{statistics.mean(values):.4f} ({sd:.4f})")
            lines.append(f"| `{arm}` | {len(curves)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "summary":
        print(summary(argv[1]))
        return 0
    if len(argv) != 4 or argv[0] not in ARMS:
        print(f"usage: epoch_order_effect.py {{{','.join(ARMS)}}} MODEL SEED EPOCHS\n"
              "       epoch_order_effect.py summary RESULTS.jsonl", file=sys.stderr)
        return 2
    arm, model, seed, epochs = argv[0], argv[1], int(argv[2]), int(argv[3])
    if arm == "torch":
        import torch  # before TensorFlow would be imported; torch's arm imports no TensorFlow

        torch.set_num_threads(1)
    from parity.data import load_arrays

    d = load_arrays("mnist")
    x = d["x_train"].astype(np.float32)[..., None]
    y = d["y_train"].astype(np.int64)
    n, batch = len(x), 32
    steps = n // batch  # 1,875: no partial batch
    rng = np.random.default_rng(1000 + seed)  # the permutations of the two bare loops
    losses = []
    if arm == "torch":
        import torch.nn.functional as F

        from torch_impl.models import build_model, model_logits
        from torch_impl.optim import KerasRMSprop

        m = build_model(model, seed=seed)
        opt = KerasRMSprop(m.parameters())
        xt, yt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(y)
        for _ in range(epochs):
            perm, total = torch.from_numpy(rng.permutation(n)), 0.0
            for i in range(steps):
                idx = perm[i * batch:(i + 1) * batch]
                loss = F.cross_entropy(model_logits(m, xt[idx]), yt[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item()
            losses.append(total / steps)
    else:
        import keras
        import tensorflow as tf

        from tf_ref.models import build_model

        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
        if arm != "tf_tape":
            keras.utils.set_random_seed(seed)  # as tf_ref.train.train does
        m = build_model(model, seed=seed)
        optimizer = keras.optimizers.RMSprop(learning_rate=1e-3, rho=0.9, epsilon=1e-7)
        if arm == "tf_tape":
            loss_fn = keras.losses.SparseCategoricalCrossentropy()

            @tf.function
            def step(xb, yb):
                with tf.GradientTape() as tape:
                    loss = loss_fn(yb, m(xb, training=True))
                optimizer.apply_gradients(zip(tape.gradient(loss, m.trainable_variables), m.trainable_variables))
                return loss

            for _ in range(epochs):
                perm, total = rng.permutation(n), 0.0
                for i in range(steps):
                    idx = perm[i * batch:(i + 1) * batch]
                    total += float(step(x[idx], y[idx]))
                losses.append(total / steps)
        else:
            m.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
            if arm == "keras_fit":
                history = m.fit(x, y, batch_size=batch, epochs=epochs, shuffle=True, verbose=0)
            else:
                from tf_ref.train import fit_dataset

                dataset, steps = fit_dataset(x, y, batch, seed=seed, epochs=epochs)
                history = m.fit(dataset, steps_per_epoch=steps, epochs=epochs, shuffle=False, verbose=0)
            losses = history.history["loss"]
    print(json.dumps({"arm": arm, "model": model, "seed": seed, "train_loss": losses}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
