"""A torch model's weights as named numpy arrays (its state_dict), and back, for `parity.interchange`."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from parity.interchange import IGNORED_TORCH_SUFFIXES, check_compatible


def get_weights(model: nn.Module) -> dict[str, np.ndarray]:
    return {name: t.detach().cpu().numpy().copy() for name, t in model.state_dict().items()}


def set_weights(model: nn.Module, weights: dict[str, np.ndarray]) -> None:
    """Load every tensor; missing, unexpected or mis-shaped arrays raise WeightTransferError by name.

    `num_batches_tracked` (no Keras twin) may be absent and is then set to 0.
    """
    state = model.state_dict()
    check_compatible({n: tuple(t.shape) for n, t in state.items()}, weights, f"torch model {type(model).__name__}",
                     ignore_missing=IGNORED_TORCH_SUFFIXES)
    new_state = {}
    for name, tensor in state.items():
        if name in weights:
            new_state[name] = torch.as_tensor(np.asarray(weights[name]), dtype=tensor.dtype)
        else:
            new_state[name] = torch.zeros_like(tensor)
    model.load_state_dict(new_state)
