"""Training-step equivalence (level 3): from identical weights and batches, with dropout off, the recipe's
optimizer (Keras / TF1 semantics), BatchNorm in training mode and the LR schedule give the same parameters after
one step (1e-5) and the same loss curve over 50 steps (1e-3 relative), in each framework.

Ensembles are covered by stepping one optimizer over 2 members, once per member per batch, as tutorial 001 does.
"""

from __future__ import annotations

import numpy as np
import pytest

from parity.catalog import TRAINABLE_MODEL_NAMES, get_spec
from parity.crosscheck import STEPS, run_both

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


def test_residual_block_training_steps_match_float64(tf):
    """The residual block has no recipe (tutorial 001 only builds it), so the other level-3 tests, which run a
    recipe's optimizer on MNIST, skip it. Here: Keras's default Adam on a regression to a random target, 20 updates
    in float64 from transferred weights, through the skip connection and all three convolutions."""
    import keras
    import tensorflow as tf_
    import torch

    from parity.crosscheck import keras_dtype
    from parity.interchange import tf_to_torch, torch_to_tf
    from tf_ref.models import build_model as build_tf
    from tf_ref.weights import get_weights as tf_get
    from torch_impl.lightning_module import build_optimizer
    from torch_impl.models import build_model as build_torch
    from torch_impl.weights import get_weights as torch_get
    from torch_impl.weights import set_weights as torch_set

    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 28, 28, 256))
    target = rng.standard_normal((4, 28, 28, 256))
    with keras_dtype("float64"):
        tf_model = build_tf("residual_block", seed=0)
        torch_model = build_torch("residual_block", seed=1).double()
        torch_set(torch_model, tf_to_torch("residual_block", tf_get(tf_model)))
        tf_opt = keras.optimizers.Adam(learning_rate=1e-3, epsilon=1e-7)
        torch_opt = build_optimizer(torch_model.parameters(), "adam", 1e-3, 1e-7)
        x_nchw, target_nchw = (torch.from_numpy(a).permute(0, 3, 1, 2) for a in (x, target))
        tf_losses, torch_losses, first_step = [], [], None
        for step in range(20):
            with tf_.GradientTape() as tape:
                loss = tf_.reduce_mean(tf_.square(tf_model(x, training=True) - target))
            tf_opt.apply_gradients(zip(tape.gradient(loss, tf_model.trainable_variables),
                                       tf_model.trainable_variables))
            torch_loss = torch.mean((torch_model(x_nchw) - target_nchw) ** 2)
            torch_opt.zero_grad(set_to_none=True)
            torch_loss.backward()
            torch_opt.step()
            tf_losses.append(float(loss))
            torch_losses.append(float(torch_loss.detach()))
            if step == 0:
                tf_weights = tf_get(tf_model)
                converted = torch_to_tf("residual_block", torch_get(torch_model))
                first_step = max(float(np.abs(tf_weights[k] - converted[k]).max()) for k in tf_weights)
    assert first_step <= 1e-10, f"parameters differ by {first_step:.3g} after one step (tolerance 1e-10)"
    tf_losses, torch_losses = np.array(tf_losses), np.array(torch_losses)
    assert tf_losses[-1] < tf_losses[0], "the regression did not train: the check would compare idle weights"
    rel = np.abs(tf_losses - torch_losses) / np.abs(tf_losses)
    assert rel.max() <= 1e-9, f"relative loss difference {rel.max():.3g} at update {int(rel.argmax())}"
