"""Forward equivalence (level 2): after a weight transfer in either direction, in inference mode, every layer's
output and the final output agree to 1e-5 (float32; relative to the activation's size where it exceeds 1) on random
inputs and on real MNIST test images, and to 1e-10 absolute in float64.

Why the float32 bound is relative: tutorial 003's models take raw 0-255 pixels, so their activations reach the
hundreds, where one float32 rounding step (2**-24 relative) is already ~1e-5 and the two frameworks' different
summation orders differ by a few of them (up to 5.3e-5 measured, lenet_d conv2). The float64 test has no such
allowance: every op of every catalog model has a float64 kernel in both frameworks, and all of them agree to ~1e-13
or better, absolute, including the LeNets' large activations.
"""

from __future__ import annotations

import numpy as np
import pytest
from parity.catalog import MODEL_NAMES, get_spec, recipe_for
from parity.interchange import WeightTransferError, tf_to_torch

ATOL = 1e-5
ATOL_FLOAT64 = 1e-10


def _inputs(name: str, source: str, mnist, rng) -> np.ndarray:
    spec = get_spec(name)
    if source == "random" or spec.input_shape != (28, 28, 1):
        return rng.random((8, *spec.input_shape), dtype=np.float32)
    scale = recipe_for(name).scale  # the recipe's input range: [0, 1], or raw 0-255 for tutorial 003
    return (mnist["x_test"][:64].astype(np.float32) / np.float32(scale))[..., None]


@pytest.mark.parametrize("source", ["random", "mnist"])
@pytest.mark.parametrize("direction", ["tf_to_torch", "torch_to_tf"])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_equivalence(tf, mnist, rng, name, direction, source):
    from parity.crosscheck import first_divergence, forward_diffs

    result = forward_diffs(name, direction, _inputs(name, source, mnist, rng))
    divergence = first_divergence(result["layers"], ATOL)
    assert divergence is None, (
        f"{name} ({direction}, {source}): first diverging layer {divergence[0]!r}: max abs diff "
        f"{divergence[1]:.3g} > {divergence[2]:.3g} (tolerance {ATOL} x max(1, |activation|max))"
    )
    if source == "mnist" and name != "residual_block":
        tf_pred, torch_pred = result["tf_out"].argmax(-1), result["torch_out"].argmax(-1)
        assert (tf_pred == torch_pred).all(), f"{name}: predicted classes differ"


@pytest.mark.parametrize("direction", ["tf_to_torch", "torch_to_tf"])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_equivalence_float64(tf, mnist, rng, name, direction):
    """Both models in float64 (TF through the Keras dtype policy, torch through `.double()`), real test images; the
    output compared is the model's own (probabilities for the softmax models, whose Dense fuses the softmax)."""
    from parity.crosscheck import forward_diffs

    x = _inputs(name, "mnist", mnist, rng).astype(np.float64)
    result = forward_diffs(name, direction, x, dtype="float64")
    assert result["tf_out"].dtype == result["torch_out"].dtype == np.float64, "a framework did not compute in float64"
    diverging = [(layer, diff) for layer, (diff, _) in result["layers"].items() if diff > ATOL_FLOAT64]
    assert not diverging, (f"{name} ({direction}, float64): first diverging layer {diverging[0][0]!r}: max abs diff "
                           f"{diverging[0][1]:.3g} > {ATOL_FLOAT64}")


def test_transfer_names_the_bad_tensor(tf):
    from torch_impl.models import build_model as build_torch
    from torch_impl.weights import set_weights as torch_set

    from tf_ref.models import build_model as build_tf
    from tf_ref.weights import get_weights as tf_get

    weights = tf_to_torch("cnn", tf_get(build_tf("cnn", seed=0)))
    weights["dense4.weight"] = weights["dense4.weight"][:, :100]
    del weights["conv2.bias"]
    weights["extra.weight"] = np.zeros(3)
    with pytest.raises(WeightTransferError) as info:
        torch_set(build_torch("cnn"), weights)
    message = str(info.value)
    assert "conv2.bias" in message and "extra.weight" in message and "dense4.weight: expected (256, 2048)" in message


def test_wrong_model_weights_are_refused(tf):
    from torch_impl.models import build_model as build_torch
    from torch_impl.weights import set_weights as torch_set

    from tf_ref.models import build_model as build_tf
    from tf_ref.weights import get_weights as tf_get

    with pytest.raises(WeightTransferError, match=r"unexpected \['conv6.weight'"):
        torch_set(build_torch("lenet_a"), tf_to_torch("lenet_d", tf_get(build_tf("lenet_d", seed=0))))


def test_compare_models_compares_the_models_it_is_given(tf, rng):
    """`compare_models` runs the caller's own pair: after a transfer they agree; a change to one weight of the torch
    model is found at that layer and not before it."""
    import torch

    from parity.crosscheck import compare_models, first_divergence
    from tf_ref.models import build_model as build_tf
    from tf_ref.weights import get_weights as tf_weights
    from torch_impl.models import build_model as build_torch
    from torch_impl.weights import set_weights as set_torch_weights

    keras_model, torch_model = build_tf("cnn", seed=5), build_torch("cnn", seed=6)
    set_torch_weights(torch_model, tf_to_torch("cnn", tf_weights(keras_model)))
    x = rng.random((4, 28, 28, 1), dtype=np.float32)
    assert first_divergence(compare_models("cnn", keras_model, torch_model, x)["layers"]) is None
    with torch.no_grad():
        torch_model.conv2.weight[0, 0, 1, 1] += 0.5
    layer, diff, _ = first_divergence(compare_models("cnn", keras_model, torch_model, x)["layers"])
    assert layer == "conv2" and diff > 1e-3, (layer, diff)


def test_softmax_models_compare_their_logits_too(tf, rng):
    """For the softmax models (tutorial 003), the logits behind Keras's fused softmax are compared, just before the
    output: adding the same constant to every logit leaves the probabilities unchanged, and is still found."""
    import torch

    from parity.catalog import get_spec
    from parity.crosscheck import compare_models, first_divergence
    from tf_ref.models import build_model as build_tf
    from tf_ref.weights import get_weights as tf_weights
    from torch_impl.models import build_model as build_torch
    from torch_impl.weights import set_weights as set_torch_weights

    name = "lenet_a"
    last = get_spec(name).layers[-1].name
    keras_model, torch_model = build_tf(name, seed=5), build_torch(name, seed=6)
    set_torch_weights(torch_model, tf_to_torch(name, tf_weights(keras_model)))
    x = rng.random((4, 28, 28, 1), dtype=np.float32) * 255
    result = compare_models(name, keras_model, torch_model, x)
    assert list(result["layers"])[-2:] == [f"{last}_logits", last]
    assert first_divergence(result["layers"]) is None
    final = dict(torch_model.named_modules())[last]
    with torch.no_grad():
        final.bias += 1.0
    result = compare_models(name, keras_model, torch_model, x)
    assert result["layers"][last][0] < 1e-6  # the probabilities cannot show it
    assert first_divergence(result["layers"])[0] == f"{last}_logits"
