"""Tutorial 001's residual block (Functional API): the skip connection Sequential cannot express."""

from __future__ import annotations

import keras
from keras import layers

INPUT_SHAPE = (28, 28, 256)


def create_model() -> keras.Model:
    inputs = keras.Input(shape=INPUT_SHAPE, name="inputs")
    conv1 = layers.Conv2D(64, (1, 1), padding="same", activation="relu", name="conv1")(inputs)
    conv2 = layers.Conv2D(64, (3, 3), padding="same", activation="relu", name="conv2")(conv1)
    conv3 = layers.Conv2D(256, (1, 1), padding="same", name="conv3")(conv2)
    add3 = layers.Add(name="add3")([conv3, inputs])  # skip connection
    relu3 = layers.ReLU(name="relu3")(add3)
    return keras.Model(inputs=inputs, outputs=relu3, name="residual_block")
