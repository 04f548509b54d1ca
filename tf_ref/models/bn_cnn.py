"""Tutorial 001's "best" member: the CNN with BatchNorm blocks and glorot_normal (Xavier normal) kernels."""

from __future__ import annotations

import keras
from keras import layers

INPUT_SHAPE = (28, 28, 1)


@keras.saving.register_keras_serializable(package="tf_ref")
class ConvBNRelu(keras.Model):
    """Conv (no activation) -> BatchNormalization (Keras defaults: momentum 0.99, epsilon 1e-3) -> ReLU."""

    def __init__(self, filters: int, kernel_size=(3, 3), strides=1, padding="same", **kwargs):
        super().__init__(**kwargs)
        self.filters, self.kernel_size, self.strides, self.padding = filters, kernel_size, strides, padding
        self.conv = layers.Conv2D(
            filters=filters, kernel_size=kernel_size, strides=strides, padding=padding,
            kernel_initializer="glorot_normal", name="conv",
        )
        self.bn = layers.BatchNormalization(name="bn")

    def call(self, inputs, training=False):
        net = self.conv(inputs)
        net = self.bn(net, training=training)
        return keras.activations.relu(net)


@keras.saving.register_keras_serializable(package="tf_ref")
class DenseBNRelu(keras.Model):
    """Dense (no activation) -> BatchNormalization -> ReLU."""

    def __init__(self, units: int, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.dense = layers.Dense(units=units, kernel_initializer="glorot_normal", name="dense")
        self.bn = layers.BatchNormalization(name="bn")

    def call(self, inputs, training=False):
        net = self.dense(inputs)
        net = self.bn(net, training=training)
        return keras.activations.relu(net)


@keras.saving.register_keras_serializable(package="tf_ref")
class BNCNNModel(keras.Model):
    def __init__(self, **kwargs):
        kwargs.setdefault("name", "bn_cnn")
        super().__init__(**kwargs)
        self.conv1 = ConvBNRelu(filters=32, name="conv1")
        self.pool1 = layers.MaxPool2D(padding="same", name="pool1")
        self.conv2 = ConvBNRelu(filters=64, name="conv2")
        self.pool2 = layers.MaxPool2D(padding="same", name="pool2")
        self.conv3 = ConvBNRelu(filters=128, name="conv3")
        self.pool3 = layers.MaxPool2D(padding="same", name="pool3")
        self.pool3_flat = layers.Flatten(name="pool3_flat")
        self.dense4 = DenseBNRelu(units=256, name="dense4")
        self.drop4 = layers.Dropout(rate=0.4, name="drop4")
        self.dense5 = layers.Dense(units=10, kernel_initializer="glorot_normal", name="dense5")

    def call(self, inputs, training=False):
        net = self.conv1(inputs, training=training)
        net = self.pool1(net)
        net = self.conv2(net, training=training)
        net = self.pool2(net)
        net = self.conv3(net, training=training)
        net = self.pool3(net)
        net = self.pool3_flat(net)
        net = self.dense4(net, training=training)
        net = self.drop4(net, training=training)
        return self.dense5(net)


def create_model() -> keras.Model:
    model = BNCNNModel()
    model(keras.ops.zeros((1, *INPUT_SHAPE)), training=False)  # a subclassed model builds on its first call
    return model
