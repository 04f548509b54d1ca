"""Training-step equivalence (level 3): from identical weights and batches, with dropout off, the recipe's
optimizer (Keras / TF1 semantics), BatchNorm in training mode and the LR schedule give the same parameters after
one step (1e-5) and the same loss curve over 50 steps (1e-3 relative), in each framework.

Ensembles are covered by stepping one optimizer over 2 members, once per member per batch, as tutorial 001 does.
The residual block has no recipe and outputs a feature map: it is trained with Keras's default Adam on a regression
to random targets (`parity.crosscheck.run_both`).
"""

from __future__ import annotations

import numpy as np
import pytest

from parity.catalog import MODEL_NAMES, get_spec
from parity.crosscheck import STEPS, run_both

@pytest.mark.parametrize("name", MODEL_NAMES)
def test_training_steps_match_float64(tf, name):
    """50 updates in float64: any difference in the recipe's semantics would show far above rounding."""
    members = 2 if get_spec(name).members > 1 else 1
    tf_losses, torch_losses, first_step = run_both(name, STEPS, members=members, dtype="float64")
    assert first_step <= 1e-10, f"{name}: parameters differ by {first_step:.3g} after one step (tolerance 1e-10)"
    rel = np.abs(tf_losses - torch_losses) / np.maximum(np.abs(tf_losses), 1e-12)
    worst = int(rel.argmax())
    assert rel.max() <= 1e-9, (f"{name}: loss curves drift apart: relative diff {rel.max():.3g} at update {worst} "
                               f"(tf {tf_losses[worst]:.10g} vs torch {torch_losses[worst]:.10g}); tolerance 1e-9")


@pytest.mark.parametrize("name", MODEL_NAMES)
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

