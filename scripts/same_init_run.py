"""Both frameworks from one initialization on the same batches (float32, or `--dtype float64`): does a run's fate
follow its start?

Builds the port's model with `--seed` (its initialization in a Lightning run of that seed), copies the weights into
the TF reference's model, and trains both with tutorial 003's optimizer (Keras's default RMSprop) on the batches of
that run's first epoch (the port's order for the seed, `GlobalBatchSampler`), printing both losses. RESULTS.md uses
it for the one Lightning run of `lenet_c` that never trained (seed 24, loss 2.30 from the first epoch on):

    .venv/bin/python scripts/same_init_run.py lenet_c --seed 24 --steps 600

With `--epochs E` it trains E whole epochs instead (epoch e in the port's order for the seed and epoch e, as in a
Lightning run) and evaluates both frameworks on tutorial 003's validation and test halves after every epoch: a
paired comparison of the two frameworks' float32 training, with the initialization and the data order taken out.
`--json` appends the run as one line; `--summary` prints the paired differences of such lines:

    OMP_NUM_THREADS=1 .venv/bin/python scripts/same_init_run.py lenet_d --seed 0 --epochs 2 --json paired.jsonl
    .venv/bin/python scripts/same_init_run.py --summary paired.jsonl

`--start tf` starts both from the TF reference's seed-S initialization instead, `--order tf` takes the reference's
data order (`tf_ref.train.fit_dataset`): with both, the pair starts as a TF run of the seed does.
"""

import argparse
import dataclasses
import json
import math
import statistics
import sys
from pathlib import Path

import numpy as np
import torch  # before TensorFlow
import torch.nn.functional as F

import torch_impl.lightning_module  # noqa: F401  (Lightning and its libraries load before TensorFlow)
from parity.catalog import recipe_for
from parity.crosscheck import keras_dtype
from parity.data import load_arrays, split_arrays
from parity.interchange import tf_to_torch, torch_to_tf
from torch_impl.datamodule import GlobalBatchSampler
from torch_impl.lightning_module import build_optimizer
from torch_impl.models import build_model, model_logits
from torch_impl.weights import get_weights
from torch_impl.weights import set_weights as torch_set


METRICS = ("train_loss", "val_loss", "val_acc", "test_acc")


def summary(path: Path) -> str:
    """Per model and epoch: the mean paired difference (port - TF) of every metric over the seeds, with its t 95% CI."""
    from parity.compare import t_quantile_975

    runs: dict[str, list[dict]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            run = json.loads(line)
            start, order = run.get("start", "torch"), run.get("order", "torch")
            runs.setdefault(f"`{run['model']}`, init {start}, order {order}", []).append(run)
    lines = ["| run | epoch | seeds | " + " | ".join(f"{m}: TF, port, paired diff [95% CI]" for m in METRICS) + " |",
             "|---|---|---|" + "---|" * len(METRICS)]
    for model, model_runs in runs.items():
        for e in range(min(len(run["tf"]) for run in model_runs)):
            cells = []
            for metric in METRICS:
                tf_values = [run["tf"][e][metric] for run in model_runs]
                torch_values = [run["torch"][e][metric] for run in model_runs]
                diffs = [b - a for a, b in zip(tf_values, torch_values)]
                scale, digits = (100, 2) if metric.endswith("acc") else (1, 4)
                mean = statistics.mean(diffs) * scale
                cell = (f"{statistics.mean(tf_values) * scale:.{digits}f}, "
                        f"{statistics.mean(torch_values) * scale:.{digits}f}, {mean:+.{digits}f}")
                if len(diffs) > 1:
                    half = t_quantile_975(len(diffs) - 1) * statistics.stdev(diffs) * scale / math.sqrt(len(diffs))
                    cell += f" [{mean - half:+.{digits}f}, {mean + half:+.{digits}f}]"
                cells.append(cell)
            lines.append(f"| {model} | {e + 1} | {len(model_runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--summary"]:
        if len(argv) != 2:
            print("usage: same_init_run.py --summary RESULTS.jsonl", file=sys.stderr)
            return 2
        print(summary(Path(argv[1])))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--every", type=int, default=50, help="print every N steps (and the first five)")
    parser.add_argument("--epochs", type=int,
                        help="train this many whole epochs instead of --steps, evaluating both after every epoch")
    parser.add_argument("--json", type=Path, metavar="PATH", help="with --epochs: append the run as one JSON line")
    parser.add_argument("--divergence", action="store_true",
                        help="with --steps: also print both validation losses and the largest weight difference")
    parser.add_argument("--start", choices=("torch", "tf"), default="torch",
                        help="whose seed-S initialization both frameworks start from (default: the port's)")
    parser.add_argument("--order", choices=("torch", "tf"), default="torch",
                        help="with --epochs: whose data order of seed S both frameworks take (default: the port's "
                             "GlobalBatchSampler; tf: tf_ref.train.fit_dataset)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                        help="both frameworks in this dtype (weights, activations, optimizer state)")
    parser.add_argument("--limit-train", type=int, metavar="N",
                        help="train on the first N training images only (a quick check of the script itself)")
    args = parser.parse_args(argv)
    if args.json and not args.epochs:
        parser.error("--json goes with --epochs")
    recipe = recipe_for(args.model)
    if recipe.optimizer != "rmsprop":
        parser.error(f"{args.model}'s recipe ({recipe.name}) is not tutorial 003's; this script runs RMSprop")

    import keras
    import tensorflow as tf

    from tf_ref.models import build_model as build_tf
    from tf_ref.train import make_optimizer
    from tf_ref.weights import get_weights as tf_get
    from tf_ref.weights import set_weights as tf_set

    split = split_arrays(load_arrays(recipe.dataset), recipe.split)
    if args.limit_train:
        n = args.limit_train
        split = dataclasses.replace(split, x_train=split.x_train[:n], y_train=split.y_train[:n])
    dtype = np.dtype(args.dtype)
    x = split.x_train.astype(dtype) / dtype.type(recipe.scale)
    y = split.y_train.astype(np.int64)
    batch = recipe.batch_size
    sampler = GlobalBatchSampler(len(x), batch, shuffle=True, seed=args.seed)
    batches = list(sampler)  # the run's first epoch
    if not args.epochs and args.steps > len(batches):
        parser.error(f"--steps {args.steps}: the first epoch has {len(batches)} batches")

    model = build_model(args.model, seed=args.seed).to(getattr(torch, args.dtype))
    with keras_dtype(args.dtype):
        keras_model = build_tf(args.model, seed=args.seed if args.start == "tf" else 0)
    if args.start == "tf":
        torch_set(model, tf_to_torch(args.model, tf_get(keras_model)))
    else:
        tf_set(keras_model, torch_to_tf(args.model, get_weights(model)))
    optimizer = build_optimizer(model.parameters(), recipe.optimizer, recipe.lr, recipe.epsilon)
    with keras_dtype(args.dtype):
        keras_optimizer = make_optimizer(recipe, steps_per_epoch=len(batches))
        keras_optimizer.build(keras_model.trainable_variables)
        loss_fn = keras.losses.SparseCategoricalCrossentropy()  # a Keras loss casts predictions to its dtype

    def torch_step(idx) -> float:
        """One update of the port's model on the batch x[idx]; returns its loss."""
        loss = F.cross_entropy(model_logits(model, torch.from_numpy(x[idx])[:, None]), torch.from_numpy(y[idx]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    @tf.function
    def tf_step(xb, yb):
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, keras_model(xb, training=True))
        keras_optimizer.apply_gradients(zip(tape.gradient(loss, keras_model.trainable_variables),
                                            keras_model.trainable_variables))
        return loss

    @tf.function
    def tf_eval(xb, yb):
        probabilities = keras_model(xb, training=False)
        return loss_fn(yb, probabilities), tf.argmax(probabilities, axis=-1)

    def scaled(images, labels) -> tuple[np.ndarray, np.ndarray]:
        return images.astype(dtype) / dtype.type(recipe.scale), labels.astype(np.int64)

    def evaluate(xs, ys) -> dict:
        """Both frameworks' mean loss and accuracy on scaled images xs and labels ys, in batches of 1,000."""
        out = {}
        with torch.no_grad():
            model.eval()
            logits = torch.cat([model_logits(model, torch.from_numpy(xs[i:i + 1000])[:, None])
                                for i in range(0, len(xs), 1000)])
            model.train()
        target = torch.from_numpy(ys)
        out["torch"] = (F.cross_entropy(logits, target).item(), (logits.argmax(1) == target).double().mean().item())
        losses, correct = [], 0
        for i in range(0, len(xs), 1000):
            loss, predicted = tf_eval(xs[i:i + 1000][..., None], ys[i:i + 1000])
            losses.append(float(loss) * len(xs[i:i + 1000]))
            correct += int(np.sum(predicted.numpy() == ys[i:i + 1000]))
        out["tf"] = (sum(losses) / len(xs), correct / len(xs))
        return out

    val_data = scaled(split.x_val, split.y_val)
    whose = "the port's" if args.start == "torch" else "TF's"
    print(f"{args.model}, {whose} seed-{args.seed} initialization in both frameworks, {args.dtype}, batch {batch}")
    if args.epochs:
        from tf_ref.train import fit_dataset

        def epoch_batches(epoch: int) -> list:
            if args.order == "tf":  # the reference's order: epoch e shuffled by the key (seed, e)
                indices, _ = fit_dataset(np.arange(len(x)), np.zeros(len(x), np.int64), batch, seed=args.seed,
                                         epochs=epoch + 1, initial_epoch=epoch)
                return [b.numpy() for b, _ in indices]
            sampler.set_epoch(epoch)
            return list(sampler)

        record = {"model": args.model, "seed": args.seed, "start": args.start, "order": args.order, "tf": [],
                  "torch": []}
        for epoch in range(args.epochs):
            train_loss = {"tf": 0.0, "torch": 0.0}
            order = epoch_batches(epoch)
            for idx in order:
                train_loss["torch"] += torch_step(idx) / len(order)
                train_loss["tf"] += float(tf_step(x[idx][..., None], y[idx])) / len(order)
            val, test = evaluate(*val_data), evaluate(*scaled(split.x_test, split.y_test))
            for fw in ("tf", "torch"):
                record[fw].append({"epoch": epoch + 1, "train_loss": train_loss[fw], "val_loss": val[fw][0],
                                   "val_acc": val[fw][1], "test_acc": test[fw][1]})
                row = record[fw][-1]
                print(f"epoch {epoch + 1} {fw:5s} train loss {row['train_loss']:.4f}  val loss {row['val_loss']:.4f}  "
                      f"val acc {row['val_acc'] * 100:.2f}%  test acc {row['test_acc'] * 100:.2f}%", flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(record) + "\n")
        return 0
    for i in range(args.steps):
        idx = batches[i]
        loss = torch_step(idx)
        tf_loss = tf_step(x[idx][..., None], y[idx])
        if i < 5 or i % args.every == 0 or i == args.steps - 1:
            line = f"step {i:4d}  torch loss {loss:.4f}  TF loss {float(tf_loss):.4f}"
            if args.divergence:
                val = evaluate(*val_data)
                weights, tf_weights = get_weights(model), tf_to_torch(args.model, tf_get(keras_model))
                apart = max(float(np.abs(np.asarray(w) - np.asarray(tf_weights[n])).max()) for n, w in weights.items())
                line += (f"  |  val loss torch {val['torch'][0]:.5f}  TF {val['tf'][0]:.5f}  |  "
                         f"largest weight difference {apart:.3e}")
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
