"""Structure (level 1): every catalog model, in both frameworks, has the tutorials' parameter counts and
per-layer output shapes; the three Keras styles of `cnn` agree; custom Keras layers load in safe mode."""

from __future__ import annotations

import numpy as np
import pytest

from parity.catalog import MODEL_NAMES, get_spec, recipe_for
from parity.summary import check_against_catalog


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_torch_model_matches_catalog(name):
    from torch_impl.summary import summarize

    problems = check_against_catalog(summarize(name))
    assert not problems, f"{name} (torch) differs from the catalog: {problems}"


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_tf_model_matches_catalog(tf, name):
    from tf_ref.summary import summarize

    problems = check_against_catalog(summarize(name))
    assert not problems, f"{name} (tf) differs from the catalog: {problems}"


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_summaries_agree_across_frameworks(tf, name):
    from tf_ref.summary import summarize as tf_summary
    from torch_impl.summary import summarize as torch_summary

    a, b = tf_summary(name), torch_summary(name)
    for key in ("total_params", "trainable_params", "non_trainable_params"):
        assert a[key] == b[key], f"{name} {key}: tf {a[key]} vs torch {b[key]}"
    rows = lambda s: [(layer["name"], tuple(layer["output_shape"]), layer["params"]) for layer in s["layers"]]  # noqa
    assert rows(a) == rows(b)


@pytest.mark.parametrize("style", ["sequential", "subclass"])
def test_cnn_keras_styles_agree(tf, style, rng):
    from tf_ref.models import build_model
    from tf_ref.weights import get_weights, set_weights

    reference = build_model("cnn", style="functional", seed=0)
    other = build_model("cnn", style=style, seed=1)
    assert sorted(get_weights(reference)) == sorted(get_weights(other)), "the styles must share one weight layout"
    set_weights(other, get_weights(reference))
    x = rng.random((8, 28, 28, 1), dtype=np.float32)
    diff = np.abs(reference(x, training=False).numpy() - other(x, training=False).numpy()).max()
    assert diff == 0.0, f"functional vs {style}: max abs diff {diff}"


@pytest.mark.parametrize("name", ["lenet_c", "inception_e"])
def test_custom_layers_load_in_safe_mode(tf, name, tmp_path, rng):
    import keras

    from tf_ref.models import build_model

    model = build_model(name, seed=0)
    path = tmp_path / f"{name}.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)  # a Lambda layer would be refused here
    x = rng.random((4, 28, 28, 1), dtype=np.float32) * 255
    np.testing.assert_array_equal(model(x).numpy(), loaded(x).numpy())


def test_ensemble_survives_keras_save_and_load(tf, tmp_path, rng):
    """A saved tutorial-001 ensemble reloads with all its members and their weights (safe mode)."""
    import keras

    from tf_ref.models import build_model

    model = build_model("cnn_ensemble3", seed=0)
    path = tmp_path / "cnn_ensemble3.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert len(loaded.members) == 3 and [m.name for m in loaded.members] == ["member0", "member1", "member2"]
    x = rng.random((4, 28, 28, 1), dtype=np.float32)
    np.testing.assert_array_equal(model(x, training=False).numpy(), loaded(x, training=False).numpy())


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="choose one of: cnn, cnn_ensemble3"):
        get_spec("resnet50")
    with pytest.raises(ValueError, match="tut001_cnn"):
        recipe_for("cnn", "tut999")
    with pytest.raises(ValueError, match="building block"):
        recipe_for("residual_block")


def test_torch_builder_rejects_unknown_model():
    from torch_impl.models import build_model

    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        build_model("vgg")


def test_wrong_input_shape_says_what_was_expected(tf):
    from tf_ref.train import prepare

    with pytest.raises(ValueError, match=r"expected images of shape \(N, 28, 28\), got \(5, 32, 32\)"):
        prepare(np.zeros((5, 32, 32), np.uint8), 255.0)


def test_torch_dataset_rejects_mismatched_arrays():
    from torch_impl.datamodule import InMemoryImages

    with pytest.raises(ValueError, match="expected images of shape"):
        InMemoryImages(np.zeros((5, 784), np.uint8), np.zeros(5))
    with pytest.raises(ValueError, match="5 images but 4 labels"):
        InMemoryImages(np.zeros((5, 28, 28), np.uint8), np.zeros(4))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_torch_models_explain_keras_layout_inputs(name):
    """The classic migration traps fail with what to do: NHWC images, no channel axis, uint8 pixels."""
    import torch

    from torch_impl.models import build_model

    h, w, c = get_spec(name).input_shape
    model = build_model(name).eval()
    with pytest.raises(ValueError, match=r"NHWC images .*x\.permute\(0, 3, 1, 2\)"):
        model(torch.rand(2, h, w, c))
    if c == 1:
        with pytest.raises(ValueError, match=r"channel axis is missing: pass x\.unsqueeze\(1\)"):
            model(torch.rand(2, h, w))
    with pytest.raises(ValueError, match=rf"expects images of shape \(batch, {c}, {h}, {w}\)"):
        model(torch.rand(2, c, h + 4, w + 4))
    with pytest.raises(TypeError, match=r"x\.float\(\) / 255"):
        model(torch.zeros(2, c, h, w, dtype=torch.uint8))
    assert model(torch.rand(2, c, h, w)).shape[0] == 2


def test_datacamp_dropout_rates_are_the_pointed_to_tutorials():
    """Tutorial 004 leaves dropout as an exercise and points to DataCamp's Keras tutorial of the same
    architecture: 0.25, 0.25, 0.4 after the pools and 0.3 after the hidden dense layer."""
    import torch

    from torch_impl.models import build_model

    rates = [m.p for m in build_model("datacamp_dropout").modules() if isinstance(m, torch.nn.Dropout)]
    assert rates == [0.25, 0.25, 0.4, 0.3]


@pytest.mark.parametrize("framework", ["torch", "tf"])
def test_parity_summary_prints_and_writes_json_in_one_format(request, framework, capsys):
    """`parity summary MODEL --framework F [--json]`: the same JSON keys and (H, W, C) shapes from both frameworks,
    and a table with the catalog's total."""
    import json

    from parity.cli import main

    if framework == "tf":
        request.getfixturevalue("tf")
    assert main(["summary", "lenet_c", "--framework", framework, "--json"]) in (0, None)
    summary = json.loads(capsys.readouterr().out)
    assert summary["model"] == "lenet_c" and summary["framework"] == framework
    assert summary["total_params"] == get_spec("lenet_c").total_params
    assert [tuple(layer["output_shape"]) for layer in summary["layers"]][:2] == [(14, 14, 8), (7, 7, 8)]
    assert not check_against_catalog(summary)
    assert main(["summary", "lenet_c", "--framework", framework]) in (0, None)
    table = capsys.readouterr().out
    assert "(H, W, C)" in table and f"{get_spec('lenet_c').total_params:,}" in table


def test_parity_summary_refuses_an_unknown_model(capsys):
    from parity.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["summary", "lenet_z", "--framework", "torch"])
    assert exit_info.value.code != 0 and "lenet_z" in capsys.readouterr().err


@pytest.mark.parametrize("name", [n for n in MODEL_NAMES if get_spec(n).members == 1 and get_spec(n).recipe])
def test_softmax_models_train_on_their_logits(name):
    """Tutorials 002/003 end in `Dense(10, activation="softmax")`: the port's forward returns those probabilities,
    `logits` what comes before the softmax, and the loss is taken from the logits (log-softmax + NLL), as Keras
    does internally, so it stays finite where the probabilities round to 0. Logit models are left as they are."""
    import torch
    import torch.nn.functional as F

    from torch_impl.lightning_module import ClassifierModule
    from torch_impl.models import model_logits

    module = ClassifierModule(name).eval()
    model = module.model.members[0]
    x = torch.rand(4, 1, 28, 28)
    assert getattr(model, "output", "logits") == get_spec(name).output  # the tutorial's output, as the catalog says
    with torch.no_grad():
        if getattr(model, "output", "logits") != "softmax":
            assert torch.equal(model_logits(model, x), model(x))
            return
        logits = model.logits(x)
        assert torch.allclose(model(x), logits.softmax(-1), atol=1e-7)
        assert torch.allclose(model(x).sum(-1), torch.ones(4))
        # logits far apart: the probabilities of every class but one are exactly 0 in float32
        for parameter in model.parameters():
            parameter.mul_(30.0)
        logits = model.logits(x)
        wrong = (logits.argmax(-1) + 1) % 10  # a label the model gives probability 0
        naive = F.nll_loss(model(x).log(), wrong)
        loss, _ = module._member_loss(model, x, wrong)
    assert not torch.isfinite(naive), "the example does not reach float32 underflow: make the logits larger"
    assert torch.isfinite(loss) and loss > 0
    assert torch.allclose(loss, F.cross_entropy(logits.double(), wrong).float(), rtol=1e-5)


@pytest.mark.parametrize("name", [n for n in MODEL_NAMES if get_spec(n).members == 1])
def test_torch_models_start_from_their_tutorials_initializers(name):
    """Every kernel and bias starts from the tutorial's initializer (the functions themselves are tested in
    test_torch_semantics): Keras's glorot_uniform with zero biases by default, glorot_normal in `bn_cnn`
    (truncated at two standard deviations), TF1's xavier_initializer on the biases of tutorial 004's models too.
    torch's own default (Kaiming-uniform weights, fan-in biases) fails every model here."""
    import math

    import torch

    from torch_impl.models import build_model

    model = build_model(name, seed=0)
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert layers
    for layer in layers:
        weight = layer.weight.detach()
        receptive = weight[0, 0].numel()
        fan_in, fan_out = weight.shape[1] * receptive, weight.shape[0] * receptive
        if name == "bn_cnn":  # glorot_normal: std sqrt(2 / (fan_in + fan_out)), nothing beyond 2 / .8796 of it
            std = math.sqrt(2.0 / (fan_in + fan_out))
            bound = 2.0 * std / 0.87962566103423978
        else:  # glorot_uniform: U(-limit, limit), std limit / sqrt(3)
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            std = bound / math.sqrt(3.0)
        assert weight.abs().max() <= bound * (1 + 1e-6), f"{name}: a {tuple(weight.shape)} kernel exceeds {bound:.4f}"
        if weight.numel() >= 2000:  # enough values for the spread: within 10% of the initializer's
            assert abs(weight.std().item() / std - 1.0) < 0.1, f"{name}: {tuple(weight.shape)} std {weight.std():.4f}"
        bias = layer.bias.detach()
        if name.startswith("datacamp"):  # xavier_uniform on a 1-D shape: fan_in = fan_out = n
            assert bias.abs().max() <= math.sqrt(3.0 / bias.numel()) * (1 + 1e-6) and bias.abs().max() > 0
        else:
            assert torch.count_nonzero(bias) == 0, f"{name}: non-zero initial biases"


def _keras_order_forward(name, model, x):
    """The model's forward with each ReLU before its max pooling, as Keras's layers run (the port pools first)."""
    import torch

    relu, pools = torch.relu, ("pool1", "pool2", "pool3")
    for i, pool in enumerate(pools, start=1):
        x = getattr(model, pool)(relu(getattr(model, f"conv{i}")(x)))
        if name == "datacamp_dropout":
            x = getattr(model, f"drop{i}")(x)
    if name == "datacamp_dropout":
        return model.out(model.drop4(relu(model.fc1(model.flatten(x)))))
    if name == "bn_cnn":
        return model.dense5(model.drop4(model.dense4(model.pool3_flat(x))))
    return model.dense5(model.drop4(relu(model.dense4(model.pool3_flat(x)))))


@pytest.mark.parametrize("name", ["cnn", "bn_cnn", "datacamp_dropout"])
def test_relu_after_max_pool_trains_as_keras_order(name):
    """cnn, bn_cnn and datacamp run their ReLUs after the max pooling (a quarter of the elements). In training mode
    (dropout, BatchNorm batch statistics) the loss, every gradient and the BatchNorm running statistics are
    bit-identical to Keras's order, ReLU then pool."""
    import copy

    import torch
    import torch.nn.functional as F

    from torch_impl.models import build_model

    port = build_model(name, seed=0).train()
    keras = copy.deepcopy(port)
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g)
    losses = []
    for model, forward in ((port, port.forward), (keras, lambda t: _keras_order_forward(name, keras, t))):
        torch.manual_seed(2)  # the same dropout masks: drawn in the same order, on tensors of the same shapes
        loss = F.cross_entropy(forward(x), y)
        loss.backward()
        losses.append(loss.detach())
    assert torch.equal(losses[0], losses[1]), f"{name}: loss {losses[0]} vs {losses[1]}"
    keras_state = keras.state_dict()
    for key, value in port.state_dict().items():
        assert torch.equal(value, keras_state[key]), f"{name}: buffer/parameter {key} differs"
    keras_params = dict(keras.named_parameters())
    for key, p in port.named_parameters():
        assert torch.equal(p.grad, keras_params[key].grad), f"{name}: gradient of {key} differs"
