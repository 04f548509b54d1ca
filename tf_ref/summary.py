"""`parity summary MODEL --framework tf`: layers, (H, W, C) output shapes and parameter counts."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from parity.catalog import get_spec
from tf_ref.models import build_model, intermediate_outputs
from tf_ref.models.datacamp import DataCampCNN

# the low-level model has variables, not layers: which variables make up each catalog layer
_DATACAMP_VARIABLES = {"conv1": ("wc1", "bc1"), "conv2": ("wc2", "bc2"), "conv3": ("wc3", "bc3"),
                       "fc1": ("wd1", "bd1"), "out": ("out", "bout")}
_DATACAMP_OPS = {"conv": "conv2d+bias_add+relu", "pool": "max_pool2d", "drop": "dropout", "flatten": "reshape",
                 "fc1": "matmul+add+relu", "out": "matmul+add"}


def _count(variables) -> int:
    return int(sum(np.prod(v.shape) for v in variables))


def summarize(name: str, model=None, style: str | None = None) -> dict:
    spec = get_spec(name)
    model = model if model is not None else build_model(name, style=style)
    outputs = intermediate_outputs(model, tf.zeros((1, *spec.input_shape)))
    layers = []
    for layer_name, output in outputs.items():
        if isinstance(model, DataCampCNN):
            variables = [model.weights.get(v, model.biases.get(v)) for v in _DATACAMP_VARIABLES.get(layer_name, ())]
            kind = next(op for prefix, op in _DATACAMP_OPS.items() if layer_name.startswith(prefix))
            params = _count(variables)
        else:
            layer = getattr(model, layer_name, None) if not hasattr(model, "get_layer") else None
            layer = layer or model.get_layer(layer_name)
            kind, params = type(layer).__name__, _count(layer.weights)
        layers.append({"name": layer_name, "type": kind, "output_shape": list(output.shape[1:]), "params": params})
    if isinstance(model, DataCampCNN):
        trainable, non_trainable = _count(model.trainable_variables), 0
    else:
        trainable, non_trainable = _count(model.trainable_weights), _count(model.non_trainable_weights)
    return {
        "model": name,
        "framework": "tf",
        "total_params": trainable + non_trainable,
        "trainable_params": trainable,
        "non_trainable_params": non_trainable,
        "layers": layers,
    }
