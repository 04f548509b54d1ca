"""Tutorial 002's ConvConvPool network (its TF1 `tf.layers` model, in Keras layers).

Conv64 x2 -> AvgPool2 -> Dropout .25 -> Conv32 x2 -> AvgPool2 -> Dropout .25 -> Dense 256 -> Dropout .5 -> Dense 10.
Returns logits: the TF1 model's loss is `sparse_softmax_cross_entropy_with_logits` on them. The tutorial's printed
Keras summary says MaxPooling, its code AveragePooling: the code is the model.
"""

from __future__ import annotations

import keras
from keras import layers

INPUT_SHAPE = (28, 28, 1)


def create_model() -> keras.Model:
    def conv(filters, name):
        return layers.Conv2D(filters, 3, strides=1, padding="same", activation="relu", name=name)

    inputs = keras.Input(shape=INPUT_SHAPE, name="inputs")
    x = conv(64, "conv1")(inputs)
    x = conv(64, "conv2")(x)
    x = layers.AveragePooling2D(pool_size=2, strides=2, padding="valid", name="pool1")(x)
    x = layers.Dropout(0.25, name="drop1")(x)
    x = conv(32, "conv3")(x)
    x = conv(32, "conv4")(x)
    x = layers.AveragePooling2D(pool_size=2, strides=2, padding="valid", name="pool2")(x)
    x = layers.Dropout(0.25, name="drop2")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(256, activation="relu", name="dense1")(x)
    x = layers.Dropout(0.5, name="drop3")(x)
    logits = layers.Dense(10, name="logits")(x)
    return keras.Model(inputs=inputs, outputs=logits, name="convpool")
