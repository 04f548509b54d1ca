"""Keras layers the tutorials build with `Lambda` or inline code, as proper serializable layers.

A `Lambda` layer holds Python bytecode: Keras refuses to load it in safe mode, so a saved model that uses one
cannot be shared safely. These layers carry only their config.
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import layers


@keras.saving.register_keras_serializable(package="tf_ref")
class LocalResponseNormalization(layers.Layer):
    """`tf.nn.local_response_normalization` (tutorial 003 wraps it in a Lambda), over the channel axis (NHWC)."""

    def __init__(self, depth_radius: int = 2, bias: float = 1.0, alpha: float = 2e-5, beta: float = 0.75, **kwargs):
        super().__init__(**kwargs)
        self.depth_radius = depth_radius
        self.bias = bias
        self.alpha = alpha
        self.beta = beta

    def call(self, inputs):
        if inputs.dtype == tf.float64:
            return self._explicit(inputs)  # TF's LRN kernel has no float64 version
        return tf.nn.local_response_normalization(
            inputs, depth_radius=self.depth_radius, bias=self.bias, alpha=self.alpha, beta=self.beta
        )

    def _explicit(self, x):
        """x / (bias + alpha * sum of x^2 over channels [c - r, c + r]) ** beta, the op's definition."""
        r, channels = self.depth_radius, x.shape[-1]
        squared = tf.pad(tf.square(x), [[0, 0]] * (len(x.shape) - 1) + [[r, r]])
        window = tf.add_n([squared[..., k:k + channels] for k in range(2 * r + 1)])
        return x / tf.pow(self.bias + self.alpha * window, self.beta)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "depth_radius": self.depth_radius,
            "bias": self.bias,
            "alpha": self.alpha,
            "beta": self.beta,
        }


@keras.saving.register_keras_serializable(package="tf_ref")
class InceptionBlock(layers.Layer):
    """GoogLeNet-style inception block, reconstructed for tutorial 003's model E.

    `filters = [1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool proj]`, the column order of the GoogLeNet paper's
    table; the tutorial's default `[8, 16, 4, 4, 12, 2]` gives 8 + 4 + 12 + 2 = 26 output channels. Every
    convolution is 'same' with ReLU; the pool branch is a 3x3 stride-1 'same' max pool.
    """

    def __init__(self, filters=(8, 16, 4, 4, 12, 2), **kwargs):
        super().__init__(**kwargs)
        if len(filters) != 6:
            raise ValueError(f"InceptionBlock needs 6 filter counts, got {len(filters)}: {filters}")
        self.filters = tuple(int(f) for f in filters)
        f1, f3r, f3, f5r, f5, fp = self.filters

        def conv(n, k, name):
            return layers.Conv2D(n, k, padding="same", activation="relu", name=name)

        self.b1_1x1 = conv(f1, 1, "b1_1x1")
        self.b2_reduce = conv(f3r, 1, "b2_reduce")
        self.b2_3x3 = conv(f3, 3, "b2_3x3")
        self.b3_reduce = conv(f5r, 1, "b3_reduce")
        self.b3_5x5 = conv(f5, 5, "b3_5x5")
        self.b4_pool = layers.MaxPool2D(pool_size=3, strides=1, padding="same", name="b4_pool")
        self.b4_proj = conv(fp, 1, "b4_proj")

    def build(self, input_shape):
        for layer in (self.b1_1x1, self.b2_reduce, self.b3_reduce, self.b4_proj):
            layer.build(input_shape)
        self.b2_3x3.build((*input_shape[:-1], self.filters[1]))
        self.b3_5x5.build((*input_shape[:-1], self.filters[3]))

    def call(self, inputs):
        branches = [
            self.b1_1x1(inputs),
            self.b2_3x3(self.b2_reduce(inputs)),
            self.b3_5x5(self.b3_reduce(inputs)),
            self.b4_proj(self.b4_pool(inputs)),
        ]
        return tf.concat(branches, axis=-1)

    def compute_output_shape(self, input_shape):
        f1, _, f3, _, f5, fp = self.filters
        return (*input_shape[:-1], f1 + f3 + f5 + fp)

    def get_config(self):
        return {**super().get_config(), "filters": list(self.filters)}
