"""A TF model's weights as named numpy arrays (TF layout), and back, for `parity.interchange`."""

from __future__ import annotations

import numpy as np

from parity.interchange import WeightTransferError, check_compatible
from tf_ref.models.datacamp import DataCampCNN


def _variables(model) -> dict:
    if isinstance(model, DataCampCNN):
        return {**{k: v for k, v in model.weights.items()}, **{k: v for k, v in model.biases.items()}}
    out = {}
    for variable in model.weights:
        parts = variable.path.split("/")
        name = "/".join(parts[1:]) if parts[0] == model.name else variable.path  # drop the model's own name
        if name in out:
            raise WeightTransferError(f"two variables are named {name!r} in {model.name}: give the layers unique names")
        out[name] = variable
    return out


def get_weights(model) -> dict[str, np.ndarray]:
    """Every variable (trainable and BatchNorm statistics), keyed by its path without the model name."""
    return {name: np.array(v.numpy()) for name, v in _variables(model).items()}


def set_weights(model, weights: dict[str, np.ndarray]) -> None:
    """Assign every variable; missing, unexpected or mis-shaped arrays raise WeightTransferError by name."""
    variables = _variables(model)
    check_compatible({n: tuple(v.shape) for n, v in variables.items()}, weights, f"TF model {model.name}")
    for name, variable in variables.items():
        variable.assign(np.asarray(weights[name], dtype=variable.dtype.name if hasattr(variable.dtype, "name")
                                   else variable.dtype))
