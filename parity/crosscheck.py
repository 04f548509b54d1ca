"""Cross-framework checks that need both TensorFlow and torch in one process (used by `parity compare` and the
tests). Import order matters: the torch side is loaded first (triton's native library crashes when loaded after
TensorFlow's), so import this module before anything imports TensorFlow.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch  # noqa: F401  (before TensorFlow, see above)
import torch.nn.functional as F

import torch_impl.lightning_module  # noqa: F401  (loads Lightning / torchmetrics / triton before TensorFlow)
from parity.catalog import get_spec, recipe_for
from parity.interchange import tf_to_torch, torch_activation_to_tf, torch_to_tf

STEPS = 50
BATCH = 32


def _batches(mnist, scale: float, steps: int, first_batch: int = 0):
    window = slice(first_batch * BATCH, (first_batch + steps) * BATCH)
    x = (mnist["x_train"][window].astype(np.float32) / np.float32(scale))[..., None]
    y = mnist["y_train"][window].astype(np.int64)
    return [(x[i * BATCH:(i + 1) * BATCH], y[i * BATCH:(i + 1) * BATCH]) for i in range(steps)]


def _no_dropout_tf(model):
    import keras

    from tf_ref.models.datacamp import DataCampCNN

    if isinstance(model, DataCampCNN):
        model.dropout = False
        return
    for layer in model._flatten_layers():
        if isinstance(layer, keras.layers.Dropout):
            layer.rate = 0.0


def _no_dropout_torch(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


@contextlib.contextmanager
def keras_dtype(dtype: str):
    """Keras models built inside compute in `dtype` (weights, activations, optimizer slots and schedule); the global
    dtype policy is set as well as floatx, because once anything has read the policy it no longer follows floatx."""
    import keras

    floatx, policy = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx(dtype)
    keras.config.set_dtype_policy(dtype)
    try:
        yield
    finally:
        keras.config.set_floatx(floatx)
        keras.config.set_dtype_policy(policy)


def run_both(name: str, steps: int, members: int = 1, decay_steps: int | None = None, dtype: str = "float32",
             first_batch: int = 0):
    """`steps` optimizer steps in each framework from the same weights on the same batches (MNIST's training images
    from batch `first_batch` on); returns the two loss curves and the largest parameter difference after the first
    step."""
    with keras_dtype(dtype):
        if not get_spec(name).recipe:
            return _run_regression(name, steps, dtype)
        return _run_both(name, steps, members, decay_steps, dtype, first_batch)


def _run_regression(name, steps, dtype):
    """A model without a recipe (the residual block: tutorial 001 only builds it, and its output is a feature map,
    not logits): Keras's default Adam on a regression of random inputs to random targets (mean squared error)."""
    import keras
    import tensorflow as tf

    from tf_ref.models import build_model as build_tf
    from tf_ref.weights import get_weights as tf_get
    from torch_impl.lightning_module import build_optimizer
    from torch_impl.models import build_model as build_torch
    from torch_impl.weights import get_weights as torch_get
    from torch_impl.weights import set_weights as torch_set

    spec = get_spec(name)
    tf_model = build_tf(name, seed=0)
    torch_model = build_torch(name, seed=1).to(getattr(torch, dtype))
    torch_set(torch_model, tf_to_torch(name, tf_get(tf_model)))
    tf_opt = keras.optimizers.Adam(learning_rate=1e-3, epsilon=1e-7)
    torch_opt = build_optimizer(torch_model.parameters(), "adam", 1e-3, 1e-7)
    rng = np.random.default_rng(0)
    out_shape = (4, *spec.layers[-1].output_shape)
    tf_losses, torch_losses, first_step = [], [], None
    for step in range(steps):
        x = rng.standard_normal((4, *spec.input_shape)).astype(dtype)
        target = rng.standard_normal(out_shape).astype(dtype)
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(tf_model(x, training=True) - target))
        tf_opt.apply_gradients(zip(tape.gradient(loss, tf_model.trainable_variables), tf_model.trainable_variables))
        out = torch_model(torch.from_numpy(x).permute(0, 3, 1, 2))
        torch_loss = torch.mean((out - torch.from_numpy(target).permute(0, 3, 1, 2)) ** 2)
        torch_opt.zero_grad(set_to_none=True)
        torch_loss.backward()
        torch_opt.step()
        tf_losses.append(float(loss))
        torch_losses.append(float(torch_loss.detach()))
        if step == 0:
            pairs = _paired(name, tf_get(tf_model), torch_get(torch_model))
            first_step = max(float(np.abs(a - b).max()) for a, b in pairs)
    return np.array(tf_losses), np.array(torch_losses), first_step


def _run_both(name, steps, members, decay_steps, dtype, first_batch=0):
    import tensorflow as tf

    from tf_ref.models import build_member
    from tf_ref.train import make_optimizer
    from tf_ref.weights import get_weights as tf_get
    from torch_impl.lightning_module import build_optimizer
    from torch_impl.models import build_member as build_torch_member
    from torch_impl.models import model_logits
    from torch_impl.optim import exponential_decay_lambda
    from torch_impl.weights import get_weights as torch_get
    from torch_impl.weights import set_weights as torch_set

    recipe = recipe_for(name, members=members)
    if decay_steps:
        recipe = recipe.replace(lr_decay_rate=0.5, lr_decay_epochs=1.0)
    member_name = get_spec(name).member or name
    softmax = get_spec(member_name).output == "softmax"

    tf_members = [build_member(name, seed=10 + i) for i in range(members)]
    torch_members = [build_torch_member(name, seed=i) for i in range(members)]
    for tf_m, torch_m in zip(tf_members, torch_members):
        torch_m.to(getattr(torch, dtype))
        torch_set(torch_m, tf_to_torch(member_name, tf_get(tf_m)))
        _no_dropout_tf(tf_m)
        _no_dropout_torch(torch_m)
        torch_m.train()

    tf_opt = make_optimizer(recipe, steps_per_epoch=decay_steps or 1)
    tf_vars = [v for m in tf_members for v in m.trainable_variables]
    tf_opt.build(tf_vars)
    torch_params = [p for m in torch_members for p in m.parameters()]
    torch_opt = build_optimizer(torch_params, recipe.optimizer, recipe.lr, recipe.epsilon)
    scheduler = None
    if recipe.lr_decay_rate is not None:  # the same ExponentialDecay, stepped once per optimizer step
        schedule = exponential_decay_lambda(recipe.lr, int((decay_steps or 1) * recipe.lr_decay_epochs),
                                            recipe.lr_decay_rate, staircase=True)
        scheduler = torch.optim.lr_scheduler.LambdaLR(torch_opt, schedule)

    def tf_loss(model, x, y):
        out = model(x, training=True)
        if softmax:  # what model.fit's "sparse_categorical_crossentropy" computes on a softmax output
            import keras

            return tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, out))
        return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=out))

    tf_losses, torch_losses = [], []
    first_step = None
    for step, (x, y) in enumerate(_batches(_mnist(), recipe.scale, steps, first_batch)):
        x = x.astype(dtype)
        for tf_m, torch_m in zip(tf_members, torch_members):
            with tf.GradientTape() as tape:
                loss = tf_loss(tf_m, x, y)
            grads = tape.gradient(loss, tf_m.trainable_variables)
            tf_opt.apply_gradients(zip(grads, tf_m.trainable_variables))
            tf_losses.append(float(loss))

            torch_loss = F.cross_entropy(model_logits(torch_m, torch.from_numpy(x).permute(0, 3, 1, 2)),
                                         torch.from_numpy(y))
            torch_opt.zero_grad(set_to_none=True)
            torch_loss.backward()
            torch_opt.step()
            if scheduler is not None:
                scheduler.step()
            torch_losses.append(float(torch_loss.detach()))
        if step == 0:
            first_step = max(
                float(np.abs(a - b).max())
                for tf_m, torch_m in zip(tf_members, torch_members)
                for a, b in _paired(member_name, tf_get(tf_m), torch_get(torch_m))
            )
    return np.array(tf_losses), np.array(torch_losses), first_step


def _paired(member_name, tf_weights, torch_weights):
    """(tf, torch) arrays per weight, except the biases of layers followed by BatchNorm.

    BatchNorm subtracts the batch mean, so those biases have a gradient that is exactly zero in exact arithmetic;
    what each framework computes is rounding noise (~1e-13 in float64, ~1e-8 in float32), which Adam, dividing
    by sqrt(v) + epsilon, turns into updates of different signs. They cannot change any output (BatchNorm removes
    them again), so comparing them would compare noise.
    """
    converted = torch_to_tf(member_name, torch_weights)
    bn_fed = ("/conv/bias", "/dense/bias")
    return [(tf_weights[k], converted[k]) for k in tf_weights if not k.endswith(bn_fed)]


_MNIST = {}


def _mnist():
    if not _MNIST:
        from parity.data import load_arrays

        _MNIST.update(load_arrays("mnist"))
    return _MNIST


def forward_diffs(name: str, direction: str, x: np.ndarray, tf_seed: int = 1, torch_seed: int = 2,
                  dtype: str = "float32") -> dict:
    """Build both models in `dtype` ("float32" or "float64"), transfer weights in `direction`, run `x` (NHWC) in
    inference mode.

    Returns {"layers": {layer: (max_abs_diff, max_abs_activation)}, "tf_out": array, "torch_out": array}, the
    torch activations compared in TF's layout (NHWC, and a flatten in (H, W, C) order).
    """
    if dtype not in ("float32", "float64"):
        raise ValueError(f"unknown dtype {dtype!r}; choose 'float32' or 'float64'")
    with keras_dtype(dtype):
        return _forward_diffs(name, direction, x.astype(dtype), tf_seed, torch_seed, dtype)


def _forward_diffs(name, direction, x, tf_seed, torch_seed, dtype):
    from tf_ref.models import build_model as build_tf
    from tf_ref.weights import get_weights as tf_get
    from tf_ref.weights import set_weights as tf_set
    from torch_impl.models import build_model as build_torch
    from torch_impl.weights import get_weights as torch_get
    from torch_impl.weights import set_weights as torch_set

    if direction not in ("tf_to_torch", "torch_to_tf"):
        raise ValueError(f"unknown direction {direction!r}; choose 'tf_to_torch' or 'torch_to_tf'")
    tf_model = build_tf(name, seed=tf_seed)
    torch_model = build_torch(name, seed=torch_seed).to(getattr(torch, dtype)).eval()
    if direction == "tf_to_torch":
        torch_set(torch_model, tf_to_torch(name, tf_get(tf_model)))
    else:
        tf_set(tf_model, torch_to_tf(name, torch_get(torch_model)))
    return compare_models(name, tf_model, torch_model, x)


def compare_models(name: str, keras_model, torch_model, x: np.ndarray) -> dict:
    """Run the given Keras and torch models of catalog architecture `name` (e.g. a user's trained model and its
    transferred twin) on `x` (NHWC, in the models' dtype) in inference mode and compare every layer.

    Returns {"layers": {layer: (max_abs_diff, max_abs_activation)}, "tf_out": array, "torch_out": array}, the
    torch activations compared in TF's layout (NHWC, and a flatten in (H, W, C) order); `first_divergence(result
    ["layers"])` names the first layer that differs. The models' layers must carry the catalog's names (those
    `tf_ref.models.build_model` gives, which weight transfer needs too).
    """
    from tf_ref.models import intermediate_outputs as tf_intermediates
    from torch_impl.models import intermediate_outputs as torch_intermediates

    torch_model.eval()
    tf_outputs = tf_intermediates(keras_model, x, training=False)
    with torch.no_grad():
        torch_outputs = torch_intermediates(torch_model, name, torch.from_numpy(x).permute(0, 3, 1, 2))
    if list(tf_outputs) != list(torch_outputs):
        raise AssertionError(f"{name}: layer lists differ: {list(tf_outputs)} vs {list(torch_outputs)}")
    layers = {}
    for layer, tf_value in tf_outputs.items():
        tf_value = np.asarray(tf_value)
        torch_value = torch_activation_to_tf(name, layer, torch_outputs[layer].detach().numpy())
        if tf_value.shape != torch_value.shape:
            raise AssertionError(f"{name}/{layer}: shape tf {tf_value.shape} vs torch {torch_value.shape}")
        layers[layer] = (float(np.abs(tf_value - torch_value).max()), float(np.abs(tf_value).max()))
    last = list(tf_outputs)[-1]
    if getattr(torch_model, "output", "logits") == "softmax":
        # Keras's last Dense carries the softmax, which squashes differences in its input (a logit off by 1e-3 can
        # move a probability by far less): the pre-softmax logits are compared too, just before the output
        tf_logits, torch_logits = _pre_softmax_logits(keras_model, torch_model, x)
        logits = (float(np.abs(tf_logits - torch_logits).max()), float(np.abs(tf_logits).max()))
        layers = {**{k: v for k, v in layers.items() if k != last}, f"{last}_logits": logits, last: layers[last]}
    return {"layers": layers, "tf_out": np.asarray(tf_outputs[last]),
            "torch_out": torch_activation_to_tf(name, last, torch_outputs[last].detach().numpy())}


def _pre_softmax_logits(keras_model, torch_model, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The last Dense layer's pre-activation in Keras (its input times its kernel plus its bias, as the layer computes
    before the softmax) and the torch model's `logits`."""
    import keras

    from torch_impl.models import model_logits

    dense = keras_model.layers[-1]
    if dense.get_config().get("activation") != "softmax":
        raise ValueError(f"{keras_model.name}: the last layer {dense.name!r} has no softmax to look behind")
    features = keras.Model(keras_model.inputs[0], dense.input)(x, training=False)
    tf_logits = np.asarray(keras.ops.add(keras.ops.matmul(features, dense.kernel), dense.bias))
    with torch.no_grad():
        torch_logits = model_logits(torch_model, torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    return tf_logits, torch_logits


def first_divergence(layers: dict, atol: float = 1e-5) -> tuple[str, float, float] | None:
    """The first layer whose difference exceeds atol * max(1, |activation|max), or None."""
    for layer, (diff, magnitude) in layers.items():
        limit = atol * max(1.0, magnitude)  # unscaled 0-255 inputs give activations in the hundreds
        if diff > limit:
            return layer, diff, limit
    return None
