"""Tutorial 001's CNN, in the three Keras styles the tutorial shows.

[Conv3x3 'same' relu, MaxPool2 'same'] x (32, 64, 128) -> Flatten -> Dense 256 relu -> Dropout 0.4 -> Dense 10.
The model returns logits. All three styles carry the same layer names, so their weights are interchangeable.
"""

from __future__ import annotations

import keras
from keras import layers

INPUT_SHAPE = (28, 28, 1)


def _conv(filters: int, name: str) -> layers.Conv2D:
    return layers.Conv2D(filters=filters, kernel_size=(3, 3), padding="same", activation="relu", name=name)


def _pool(name: str) -> layers.MaxPool2D:
    return layers.MaxPool2D(padding="same", name=name)  # pool 2, stride 2; 'same' turns 7x7 into 4x4


def create_model_sequential() -> keras.Sequential:
    """The Sequential API (the tutorial's `create_model`)."""
    model = keras.Sequential(name="cnn_sequential")
    model.add(keras.Input(shape=INPUT_SHAPE))
    model.add(_conv(32, "conv1"))
    model.add(_pool("pool1"))
    model.add(_conv(64, "conv2"))
    model.add(_pool("pool2"))
    model.add(_conv(128, "conv3"))
    model.add(_pool("pool3"))
    model.add(layers.Flatten(name="pool3_flat"))
    model.add(layers.Dense(256, activation="relu", name="dense4"))
    model.add(layers.Dropout(0.4, name="drop4"))
    model.add(layers.Dense(10, name="dense5"))
    return model


def create_model_functional() -> keras.Model:
    """The Functional API (the tutorial's `create_model_functional`)."""
    inputs = keras.Input(shape=INPUT_SHAPE, name="inputs")
    conv1 = _conv(32, "conv1")(inputs)
    pool1 = _pool("pool1")(conv1)
    conv2 = _conv(64, "conv2")(pool1)
    pool2 = _pool("pool2")(conv2)
    conv3 = _conv(128, "conv3")(pool2)
    pool3 = _pool("pool3")(conv3)
    pool3_flat = layers.Flatten(name="pool3_flat")(pool3)
    dense4 = layers.Dense(256, activation="relu", name="dense4")(pool3_flat)
    drop4 = layers.Dropout(0.4, name="drop4")(dense4)
    logits = layers.Dense(10, name="dense5")(drop4)
    return keras.Model(inputs=inputs, outputs=logits, name="cnn_functional")


@keras.saving.register_keras_serializable(package="tf_ref")
class CNNModel(keras.Model):
    """Model subclassing (the tutorial's `CNNModel`); also the member of the 3-model ensemble."""

    def __init__(self, **kwargs):
        kwargs.setdefault("name", "cnn_subclass")
        super().__init__(**kwargs)
        self.conv1 = _conv(32, "conv1")
        self.pool1 = _pool("pool1")
        self.conv2 = _conv(64, "conv2")
        self.pool2 = _pool("pool2")
        self.conv3 = _conv(128, "conv3")
        self.pool3 = _pool("pool3")
        self.pool3_flat = layers.Flatten(name="pool3_flat")
        self.dense4 = layers.Dense(256, activation="relu", name="dense4")
        self.drop4 = layers.Dropout(0.4, name="drop4")
        self.dense5 = layers.Dense(10, name="dense5")

    def call(self, inputs, training=False):
        net = self.conv1(inputs)
        net = self.pool1(net)
        net = self.conv2(net)
        net = self.pool2(net)
        net = self.conv3(net)
        net = self.pool3(net)
        net = self.pool3_flat(net)
        net = self.dense4(net)
        net = self.drop4(net, training=training)
        return self.dense5(net)


STYLES = {
    "sequential": create_model_sequential,
    "functional": create_model_functional,
    "subclass": lambda: CNNModel(),
}


def create_model(style: str = "functional") -> keras.Model:
    if style not in STYLES:
        raise ValueError(f"unknown Keras style {style!r}; choose one of: {', '.join(STYLES)}")
    model = STYLES[style]()
    if not model.weights:
        model(keras.ops.zeros((1, *INPUT_SHAPE)), training=False)  # a subclassed model builds on its first call
    return model
