"""Both frameworks from one initialization on the same batches, in float32: does a run's fate follow its start?

Builds the port's model with `--seed` (its initialization in a Lightning run of that seed), copies the weights into
the TF reference's model, and trains both with tutorial 003's optimizer (Keras's default RMSprop) on the batches of
that run's first epoch (the port's order for the seed, `GlobalBatchSampler`), printing both losses. RESULTS.md uses
it for the one Lightning run of `lenet_c` that never trained (seed 24, loss 2.30 from the first epoch on):

    .venv/bin/python scripts/same_init_run.py lenet_c --seed 24 --steps 600
"""

import argparse

import numpy as np
import torch  # before TensorFlow
import torch.nn.functional as F

import torch_impl.lightning_module  # noqa: F401  (Lightning and its libraries load before TensorFlow)
from parity.catalog import recipe_for
from parity.data import load_arrays
from parity.interchange import torch_to_tf
from torch_impl.datamodule import GlobalBatchSampler
from torch_impl.lightning_module import build_optimizer
from torch_impl.models import build_model, model_logits
from torch_impl.weights import get_weights


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--every", type=int, default=50, help="print every N steps (and the first five)")
    args = parser.parse_args(argv)
    recipe = recipe_for(args.model)
    if recipe.optimizer != "rmsprop":
        parser.error(f"{args.model}'s recipe ({recipe.name}) is not tutorial 003's; this script runs RMSprop")

    import keras
    import tensorflow as tf

    from tf_ref.models import build_model as build_tf
    from tf_ref.train import make_optimizer
    from tf_ref.weights import set_weights as tf_set

    data = load_arrays("mnist")
    x = (data["x_train"].astype(np.float32) / np.float32(recipe.scale))
    y = data["y_train"].astype(np.int64)
    batch = recipe.batch_size
    batches = list(GlobalBatchSampler(len(x), batch, shuffle=True, seed=args.seed))  # the run's first epoch
    if args.steps > len(batches):
        parser.error(f"--steps {args.steps}: the first epoch has {len(batches)} batches")

    model = build_model(args.model, seed=args.seed)
    keras_model = build_tf(args.model, seed=0)
    tf_set(keras_model, torch_to_tf(args.model, get_weights(model)))
    optimizer = build_optimizer(model.parameters(), recipe.optimizer, recipe.lr, recipe.epsilon)
    keras_optimizer = make_optimizer(recipe, steps_per_epoch=len(batches))
    loss_fn = keras.losses.SparseCategoricalCrossentropy()

    @tf.function
    def tf_step(xb, yb):
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, keras_model(xb, training=True))
        keras_optimizer.apply_gradients(zip(tape.gradient(loss, keras_model.trainable_variables),
                                            keras_model.trainable_variables))
        return loss

    print(f"{args.model}, the port's seed-{args.seed} initialization in both frameworks, float32, batch {batch}")
    for i in range(args.steps):
        idx = batches[i]
        loss = F.cross_entropy(model_logits(model, torch.from_numpy(x[idx])[:, None]), torch.from_numpy(y[idx]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        tf_loss = tf_step(x[idx][..., None], y[idx])
        if i < 5 or i % args.every == 0 or i == args.steps - 1:
            print(f"step {i:4d}  torch loss {loss.item():.4f}  TF loss {float(tf_loss):.4f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
