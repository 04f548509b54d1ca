"""Tutorial 003's model E, "including inception blocks", reconstructed.

The tutorial's code stops at `inceptionLayer(filters=[8, 16, 4, 4, 12, 2])`. The reconstruction keeps model C
(LeNet + local response normalization) and replaces its two middle convolution stages with that inception
block (see `tf_ref.layers.InceptionBlock` for the branch layout); the head (Conv128 k3 valid -> Conv32 k1 ->
Dense softmax) is model C's.
"""

from __future__ import annotations

import keras
from keras import layers

from tf_ref.layers import InceptionBlock, LocalResponseNormalization
from tf_ref.models.lenet import LRN_PARAMS

INPUT_SHAPE = (28, 28, 1)
FILTERS = (8, 16, 4, 4, 12, 2)


def create_model() -> keras.Model:
    inputs = keras.Input(shape=INPUT_SHAPE, name="inputs")
    x = layers.Conv2D(8, 5, strides=2, padding="same", activation="relu", name="conv1")(inputs)
    x = layers.AveragePooling2D(pool_size=2, strides=2, padding="valid", name="pool1")(x)
    x = LocalResponseNormalization(**LRN_PARAMS, name="lrn1")(x)
    x = InceptionBlock(FILTERS, name="inception1")(x)
    x = layers.AveragePooling2D(pool_size=3, strides=2, padding="valid", name="pool2")(x)
    x = LocalResponseNormalization(**LRN_PARAMS, name="lrn2")(x)
    x = InceptionBlock(FILTERS, name="inception2")(x)
    x = layers.Conv2D(128, 3, padding="valid", activation="relu", name="conv4")(x)
    x = layers.Conv2D(32, 1, padding="valid", activation="relu", name="conv5")(x)
    x = layers.Flatten(name="flatten")(x)
    outputs = layers.Dense(10, activation="softmax", name="dense")(x)
    return keras.Model(inputs=inputs, outputs=outputs, name="inception_e")
