"""The model registry: `build_model(name)` for every catalog name (see `parity.catalog`)."""

from __future__ import annotations

import keras
import tensorflow as tf

from parity.catalog import MODEL_NAMES, get_spec
from tf_ref.models import bn_cnn, cnn, convpool, datacamp, inception, lenet, residual_block
from tf_ref.models.ensemble import Ensemble


def _cnn_member(name: str):
    return cnn.CNNModel(name=name)


_BUILDERS = {
    "cnn": lambda style: cnn.create_model(style or "functional"),
    "cnn_ensemble3": lambda style: Ensemble(_cnn_member, members=3, name="cnn_ensemble3"),
    "bn_cnn": lambda style: bn_cnn.create_model(),
    "residual_block": lambda style: residual_block.create_model(),
    "convpool": lambda style: convpool.create_model(),
    "lenet_a": lambda style: lenet.create_model("a"),
    "lenet_b": lambda style: lenet.create_model("b"),
    "lenet_c": lambda style: lenet.create_model("c"),
    "lenet_d": lambda style: lenet.create_model("d"),
    "inception_e": lambda style: inception.create_model(),
    "datacamp": lambda style: datacamp.create_model(dropout=False),
    "datacamp_dropout": lambda style: datacamp.create_model(dropout=True),
}
assert set(_BUILDERS) == set(MODEL_NAMES), "every catalog model needs a TensorFlow builder"


def build_model(name: str, *, style: str | None = None, seed: int | None = None):
    """A freshly initialized, built model. `style` picks the Keras style of `cnn`; `seed` fixes the init."""
    spec = get_spec(name)  # raises ValueError listing valid names
    if style is not None and name != "cnn":
        raise ValueError(f"only 'cnn' comes in several Keras styles; {name!r} has one")
    if seed is not None:
        keras.utils.set_random_seed(seed)
    if name in ("datacamp", "datacamp_dropout"):
        return datacamp.create_model(dropout=name.endswith("dropout"), seed=seed)
    model = _BUILDERS[name](style)
    if not model.built or not model.weights:
        # a subclassed model only creates its weights when it is called (`build()` does not run `call`)
        model(tf.zeros((1, *spec.input_shape)), training=False)
    return model


def build_member(name: str, seed: int | None = None):
    """One member of an ensemble recipe (`cnn` for cnn_ensemble3, the model itself otherwise)."""
    spec = get_spec(name)
    return build_model(spec.member or name, seed=seed)


def is_graph_model(model) -> bool:
    """Functional and Sequential models know their layer graph; subclassed ones only run `call`."""
    return isinstance(model, (keras.Sequential, keras.src.models.Functional))


def intermediate_outputs(model, x, training: bool = False) -> dict:
    """Every named top-level layer's output for input `x` (NHWC), in forward order, keyed by catalog name."""
    if isinstance(model, datacamp.DataCampCNN):
        return model.forward(x, training=training)
    if isinstance(model, Ensemble):
        return {f"member{i}": out for i, out in enumerate(model.member_logits(x, training=training))}
    if is_graph_model(model):
        named = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
        extractor = keras.Model(model.inputs[0], [layer.output for layer in named])
        return dict(zip([layer.name for layer in named], extractor(x, training=training)))
    # subclassed chain (CNNModel, BNCNNModel): layers in declaration order are the forward order
    out, net = {}, x
    for layer in model.layers:
        net = out[layer.name] = layer(net, training=training)
    return out


__all__ = ["build_model", "build_member", "intermediate_outputs", "is_graph_model", "Ensemble"]
