"""Tutorial 004's low-level CNN: `tf.Variable`s and `tf.nn` ops, no Keras layers.

[conv2d 'SAME' + bias_add + relu, max_pool 2 'SAME'] x (32, 64, 128) -> reshape 2048 -> matmul 128 + relu ->
matmul 10 (logits). Every weight AND bias starts from TF1's `xavier_initializer()` (uniform, fan average); for a
1-D bias of n entries TF takes fan_in = fan_out = n.

`dropout=True` gives `datacamp_dropout`, the tutorial's exercise against its overfitting. The tutorial sends the
reader to DataCamp's Keras CNN tutorial ("both of the tutorial have exactly similar architecture"), whose
Fashion-MNIST model drops 0.25, 0.25 and 0.4 after the three pools and 0.3 after the hidden dense layer: those rates.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf

INPUT_SHAPE = (28, 28, 1)

# name -> shape, in the order the tutorial declares them (its 'W0'..'W6', 'B0'..'B4')
WEIGHT_SHAPES = {
    "wc1": (3, 3, 1, 32),
    "wc2": (3, 3, 32, 64),
    "wc3": (3, 3, 64, 128),
    "wd1": (4 * 4 * 128, 128),
    "out": (128, 10),
}
BIAS_SHAPES = {"bc1": (32,), "bc2": (64,), "bc3": (128,), "bd1": (128,), "bout": (10,)}


def xavier_uniform(shape, rng: np.random.Generator) -> np.ndarray:
    """TF1 `tf.contrib.layers.xavier_initializer()`: U(-l, l), l = sqrt(6 / (fan_in + fan_out))."""
    if len(shape) == 1:
        fan_in = fan_out = shape[0]
    else:
        receptive = math.prod(shape[:-2])
        fan_in, fan_out = shape[-2] * receptive, shape[-1] * receptive
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, size=shape).astype(np.float32)


def conv2d(x, w, b, strides=1):
    x = tf.nn.conv2d(x, w, strides=[1, strides, strides, 1], padding="SAME")
    x = tf.nn.bias_add(x, b)
    return tf.nn.relu(x)


def maxpool2d(x, k=2):
    return tf.nn.max_pool2d(x, ksize=[1, k, k, 1], strides=[1, k, k, 1], padding="SAME")


class DataCampCNN(tf.Module):
    def __init__(self, dropout: bool = False, seed: int | None = None, name: str | None = None):
        super().__init__(name=name or ("datacamp_dropout" if dropout else "datacamp"))
        rng = np.random.default_rng(seed)
        dtype = keras.config.floatx()  # float32 unless the user asks Keras for float64
        self.dropout = bool(dropout)
        self.weights = {k: tf.Variable(xavier_uniform(s, rng).astype(dtype), name=k) for k, s in WEIGHT_SHAPES.items()}
        self.biases = {k: tf.Variable(xavier_uniform(s, rng).astype(dtype), name=k) for k, s in BIAS_SHAPES.items()}

    @property
    def trainable_variables(self):
        return [*self.weights.values(), *self.biases.values()]

    def _drop(self, x, rate, training):
        return tf.nn.dropout(x, rate=rate) if training else x

    def forward(self, x, training=False):
        """All intermediate activations by layer name (the last one is the logits)."""
        w, b, out = self.weights, self.biases, {}
        x = out["conv1"] = conv2d(x, w["wc1"], b["bc1"])
        x = out["pool1"] = maxpool2d(x)
        if self.dropout:
            x = out["drop1"] = self._drop(x, 0.25, training)
        x = out["conv2"] = conv2d(x, w["wc2"], b["bc2"])
        x = out["pool2"] = maxpool2d(x)
        if self.dropout:
            x = out["drop2"] = self._drop(x, 0.25, training)
        x = out["conv3"] = conv2d(x, w["wc3"], b["bc3"])
        x = out["pool3"] = maxpool2d(x)
        if self.dropout:
            x = out["drop3"] = self._drop(x, 0.4, training)
        x = out["flatten"] = tf.reshape(x, [-1, w["wd1"].shape[0]])
        x = out["fc1"] = tf.nn.relu(tf.add(tf.matmul(x, w["wd1"]), b["bd1"]))
        if self.dropout:
            x = out["drop4"] = self._drop(x, 0.3, training)
        out["out"] = tf.add(tf.matmul(x, w["out"]), b["bout"])
        return out

    def __call__(self, x, training=False):
        return self.forward(x, training=training)["out"]


def create_model(dropout: bool = False, seed: int | None = None) -> DataCampCNN:
    return DataCampCNN(dropout=dropout, seed=seed)
