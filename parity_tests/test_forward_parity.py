"""Forward equivalence (level 2): after a weight transfer in either direction, in inference mode, every layer's
output and the final output agree to 1e-5 (float32), on random inputs and on real MNIST test images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from parity.catalog import MODEL_NAMES, get_spec, recipe_for
from parity.interchange import WeightTransferError, tf_to_torch, torch_activation_to_tf, torch_to_tf

ATOL = 1e-5


def _inputs(name: str, source: str, mnist, rng) -> np.ndarray:
    spec = get_spec(name)
    if source == "random" or spec.input_shape != (28, 28, 1):
        return rng.random((8, *spec.input_shape), dtype=np.float32)
    scale = recipe_for(name).scale  # the recipe's input range: [0, 1], or raw 0-255 for tutorial 003
    return (mnist["x_test"][:64].astype(np.float32) / np.float32(scale))[..., None]


def compare_layers(name: str, tf_outputs: dict, torch_outputs: dict, atol: float = ATOL) -> dict[str, float]:
    """Max abs difference per layer; fails naming the first layer that diverges and by how much."""
    diffs = {}
    for layer, tf_value in tf_outputs.items():
        torch_value = torch_activation_to_tf(name, layer, torch_outputs[layer].detach().numpy())
        tf_value = np.asarray(tf_value)
        assert tf_value.shape == torch_value.shape, f"{name}/{layer}: shape tf {tf_value.shape} vs torch {torch_value.shape}"
        scale = max(1.0, float(np.abs(tf_value).max()))  # unscaled 0-255 inputs give activations in the hundreds
        diffs[layer] = float(np.abs(tf_value - torch_value).max())
        assert diffs[layer] <= atol * scale, (
            f"{name}: first diverging layer {layer!r}: max abs diff {diffs[layer]:.3g} > {atol * scale:.3g} "
            f"(tolerance {atol} x max(1, |activation|max={scale:.3g}))"
        )
    return diffs


@pytest.mark.parametrize("source", ["random", "mnist"])
@pytest.mark.parametrize("direction", ["tf_to_torch", "torch_to_tf"])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_equivalence(tf, mnist, rng, name, direction, source):
    from tf_ref.models import build_model as build_tf
    from tf_ref.models import intermediate_outputs as tf_intermediates
    from tf_ref.weights import get_weights as tf_get
    from tf_ref.weights import set_weights as tf_set
    from torch_impl.models import build_model as build_torch
    from torch_impl.models import intermediate_outputs as torch_intermediates
    from torch_impl.weights import get_weights as torch_get
    from torch_impl.weights import set_weights as torch_set

    tf_model, torch_model = build_tf(name, seed=1), build_torch(name, seed=2).eval()
    if direction == "tf_to_torch":
        torch_set(torch_model, tf_to_torch(name, tf_get(tf_model)))
    else:
        tf_set(tf_model, torch_to_tf(name, torch_get(torch_model)))
    x = _inputs(name, source, mnist, rng)
    tf_outputs = tf_intermediates(tf_model, x, training=False)
    torch_outputs = torch_intermediates(torch_model, name, torch.from_numpy(x).permute(0, 3, 1, 2))
    assert list(tf_outputs) == list(torch_outputs)
    diffs = compare_layers(name, tf_outputs, torch_outputs)
    if source == "mnist" and name not in ("residual_block",):
        last = list(tf_outputs)[-1]
        tf_pred = np.asarray(tf_outputs[last]).argmax(-1)
        torch_pred = torch_outputs[last].numpy().argmax(-1)
        assert (tf_pred == torch_pred).all(), f"{name}: predicted classes differ (max diff {diffs[last]:.3g})"


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
