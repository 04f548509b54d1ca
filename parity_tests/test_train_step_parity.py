"""Training-step equivalence (level 3): from identical weights and batches, with dropout off, the recipe's
optimizer (Keras / TF1 semantics), BatchNorm in training mode and the LR schedule give the same parameters after
one step (1e-5) and the same loss curve over 50 steps (1e-3 relative), in each framework.

Ensembles are covered by stepping one optimizer over 2 members, once per member per batch, as tutorial 001 does.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from parity.catalog import TRAINABLE_MODEL_NAMES, get_spec, recipe_for
from parity.interchange import tf_to_torch, torch_to_tf

STEPS = 50
BATCH = 32


def _batches(mnist, scale: float, steps: int):
    x = (mnist["x_train"][: steps * BATCH].astype(np.float32) / np.float32(scale))[..., None]
    y = mnist["y_train"][: steps * BATCH].astype(np.int64)
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


def run_both(name: str, steps: int, members: int = 1, decay_steps: int | None = None, dtype: str = "float32"):
    import keras

    floatx, policy = keras.config.floatx(), keras.config.dtype_policy()
    # the TF side's weights, optimizer slots and schedule in this dtype; the global dtype policy is set too,
    # because once anything has read it, it no longer follows floatx
    keras.config.set_floatx(dtype)
    keras.config.set_dtype_policy(dtype)
    try:
        return _run_both(name, steps, members, decay_steps, dtype)
    finally:
        keras.config.set_floatx(floatx)
        keras.config.set_dtype_policy(policy)


def _run_both(name, steps, members, decay_steps, dtype):
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
    for step, (x, y) in enumerate(_batches(_mnist(), recipe.scale, steps)):
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


@pytest.mark.parametrize("name", TRAINABLE_MODEL_NAMES)
def test_training_steps_match_float64(tf, name):
    """50 updates in float64: any difference in the recipe's semantics would show far above rounding."""
    members = 2 if get_spec(name).members > 1 else 1
    tf_losses, torch_losses, first_step = run_both(name, STEPS, members=members, dtype="float64")
    assert first_step <= 1e-10, f"{name}: parameters differ by {first_step:.3g} after one step (tolerance 1e-10)"
    rel = np.abs(tf_losses - torch_losses) / np.maximum(np.abs(tf_losses), 1e-12)
    worst = int(rel.argmax())
    assert rel.max() <= 1e-9, (f"{name}: loss curves drift apart: relative diff {rel.max():.3g} at update {worst} "
                               f"(tf {tf_losses[worst]:.10g} vs torch {torch_losses[worst]:.10g}); tolerance 1e-9")


@pytest.mark.parametrize("name", TRAINABLE_MODEL_NAMES)
def test_training_steps_match_float32(tf, name):
    """float32: one update leaves the parameters within 1e-5, and the first 10 updates' losses agree to 1e-3.

    Over longer runs float32 rounding (different summation orders in the two frameworks' kernels) is amplified
    by Adam / RMSprop, whose steps are nearly sign-like where the second moment is tiny: after ~30 updates the
    curves separate by 1e-4 to 1e-1 relative (largest for lenet_d on unscaled 0-255 inputs). The float64 test
    above shows that this is rounding, not a difference in the recipe.
    """
    members = 2 if get_spec(name).members > 1 else 1
    tf_losses, torch_losses, first_step = run_both(name, 10, members=members, dtype="float32")
    # The named exception: bn_cnn. Behind BatchNorm, many kernel entries get gradients at float32 rounding level
    # (BatchNorm removes the mean and scale they would change), and Adam's first step is about lr * sign(g), so
    # those entries step in opposite directions in the two frameworks (differences of up to 2 * lr). Its one-step
    # parameter equality is proven in float64 (test above, 1e-10); in float32 its losses are checked below.
    # For the same reason its float32 losses separate quickly (1.7e-2 relative by update 8); only the first two
    # updates, before the flipped steps have compounded, are compared.
    if name != "bn_cnn":
        assert first_step <= 1e-5, f"{name}: parameters differ by {first_step:.3g} after one step (tolerance 1e-5)"
    else:
        tf_losses, torch_losses = tf_losses[:2], torch_losses[:2]
    rel = np.abs(tf_losses - torch_losses) / np.maximum(np.abs(tf_losses), 1e-8)
    worst = int(rel.argmax())
    assert rel.max() <= 1e-3, (f"{name}: relative loss diff {rel.max():.3g} at update {worst} "
                               f"(tf {tf_losses[worst]:.6g} vs torch {torch_losses[worst]:.6g}); tolerance 1e-3")


def test_shared_optimizer_with_staircase_decay(tf):
    """Tutorial 001's best recipe in small: 2 BatchNorm members, one Adam, a schedule that halves every 4 updates."""
    tf_losses, torch_losses, first_step = run_both("bn_cnn", 12, members=2, decay_steps=4, dtype="float64")
    assert first_step <= 1e-10, f"parameters differ by {first_step:.3g} after one step"
    rel = np.abs(tf_losses - torch_losses) / np.abs(tf_losses)
    assert rel.max() <= 1e-9, f"relative loss difference {rel.max():.3g}"
