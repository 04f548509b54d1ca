"""Tutorial 003's LeNet-like models A-D (Functional API), softmax outputs as the tutorial wrote them.

The tutorial's Lambda-wrapped `tf.nn.local_response_normalization` is the serializable
`tf_ref.layers.LocalResponseNormalization` here (same op, same parameters).
"""

from __future__ import annotations

import keras
from keras import layers

from tf_ref.layers import LocalResponseNormalization

INPUT_SHAPE = (28, 28, 1)
LRN_PARAMS = dict(depth_radius=2, bias=1.0, alpha=0.00002, beta=0.75)


def _conv(filters, kernel_size, strides=1, padding="same", name=None):
    return layers.Conv2D(filters, kernel_size, strides=strides, padding=padding, activation="relu", name=name)


def _lrn(name):
    return LocalResponseNormalization(**LRN_PARAMS, name=name)


def create_model(variant: str = "a") -> keras.Model:
    """`variant`: "a" plain, "b" + dropout, "c" + local response normalization, "d" deeper with LRN."""
    if variant not in ("a", "b", "c", "d"):
        raise ValueError(f"unknown LeNet variant {variant!r}; choose one of: a, b, c, d")
    inputs = keras.Input(shape=INPUT_SHAPE, name="inputs")
    if variant == "d":
        x = _conv(8, 5, strides=2, name="conv1")(inputs)
        x = _conv(16, 5, name="conv2")(x)
        x = layers.AveragePooling2D(pool_size=2, strides=2, padding="valid", name="pool1")(x)
        x = _lrn("lrn1")(x)
        x = _conv(32, 3, name="conv3")(x)
        x = _conv(32, 3, name="conv4")(x)
        x = layers.AveragePooling2D(pool_size=3, strides=2, padding="valid", name="pool2")(x)
        x = _lrn("lrn2")(x)
        x = _conv(64, 2, name="conv5")(x)
        x = _conv(64, 2, name="conv6")(x)
        x = _conv(128, 3, padding="valid", name="conv7")(x)
        x = _conv(32, 1, padding="valid", name="conv8")(x)
    else:
        x = _conv(8, 5, strides=2, name="conv1")(inputs)
        x = layers.AveragePooling2D(pool_size=2, strides=2, padding="valid", name="pool1")(x)
        if variant == "c":
            x = _lrn("lrn1")(x)
        x = _conv(16, 3, name="conv2")(x)
        x = layers.AveragePooling2D(pool_size=3, strides=2, padding="valid", name="pool2")(x)
        if variant == "c":
            x = _lrn("lrn2")(x)
        x = _conv(64, 2, name="conv3")(x)  # 'same' with an even kernel: TF pads only bottom/right
        x = _conv(128, 3, padding="valid", name="conv4")(x)
        if variant == "b":
            x = layers.Dropout(0.45, name="drop1")(x)
        x = _conv(32, 1, padding="valid", name="conv5")(x)
        if variant == "b":
            x = layers.Dropout(0.45, name="drop2")(x)
    x = layers.Flatten(name="flatten")(x)
    outputs = layers.Dense(10, activation="softmax", name="dense")(x)
    return keras.Model(inputs=inputs, outputs=outputs, name=f"lenet_{variant}")
