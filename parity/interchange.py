"""Weight interchange between the two frameworks: one place, numpy only, every transpose explicit.

Each side exports its weights as named numpy arrays in its own layout:
- TF (`tf_ref.weights.get_weights`): Keras variable paths without the model's name, e.g. `conv1/kernel`
  (HWIO), `dense4/kernel` (in, out), `conv1/bn/moving_variance`, `member0/conv1/kernel`; the low-level
  `datacamp` uses the tutorial's dictionary keys (`wc1`, `bc1`, ..., `out`, `bout`).
- torch (`torch_impl.weights.get_weights`): the model's `state_dict()` names, e.g. `conv1.weight` (OIHW),
  `dense4.weight` (out, in), `conv1.bn.running_var`, `members.0.conv1.weight`.

The conversion rules (per tensor, by its kind):
- Conv2D kernel: HWIO <-> OIHW, `transpose(3, 2, 0, 1)` / `transpose(2, 3, 1, 0)`.
- Dense kernel: (in, out) <-> (out, in), a transpose.
- The first Dense after a Flatten of an (H, W, C) map: Keras flattens NHWC, PyTorch NCHW, so the input rows
  are also permuted from (H, W, C) order to (C, H, W) order. (The port flattens NCHW, as PyTorch code does,
  and pays for it once here, not in every forward pass.)
- BatchNorm: gamma/beta/moving_mean/moving_variance <-> weight/bias/running_mean/running_var.
- torch's `num_batches_tracked` has no Keras twin: dropped on export, set to 0 on import.

Missing keys, unexpected keys and shape mismatches raise `WeightTransferError` naming the tensor.
The `.npz` file format: the arrays by name, plus `__meta__` (JSON: model, framework, layout).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from parity.catalog import get_spec

BN_NAMES = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_variance": "running_var"}
BN_NAMES_BACK = {v: k for k, v in BN_NAMES.items()}
DATACAMP_NAMES = {"wc1": "conv1.weight", "bc1": "conv1.bias", "wc2": "conv2.weight", "bc2": "conv2.bias",
                  "wc3": "conv3.weight", "bc3": "conv3.bias", "wd1": "fc1.weight", "bd1": "fc1.bias",
                  "out": "out.weight", "bout": "out.bias"}
DATACAMP_NAMES_BACK = {v: k for k, v in DATACAMP_NAMES.items()}
IGNORED_TORCH_SUFFIXES = ("num_batches_tracked",)


class WeightTransferError(ValueError):
    """A weight could not be mapped: the message names the tensor and what was expected."""


def flatten_inputs(model_name: str) -> dict[str, tuple[int, int, int]]:
    """Dense layers fed by a Flatten of an (H, W, C) map, with that map's shape (see `flat_maps`)."""
    layers = get_spec(model_name).layers
    maps, out = flat_maps(model_name), {}
    for i, layer in enumerate(layers):
        if layer.name in maps:  # the first layer with weights after the Flatten reads its output
            dense = next(later for later in layers[i + 1:] if later.params)
            out[dense.name] = maps[layer.name]
    return out


def _member_model(model_name: str) -> str:
    spec = get_spec(model_name)
    return spec.member or model_name


# ----------------------------------------------------------------------------------------- names
def tf_name_to_torch(model_name: str, tf_name: str) -> str:
    if _member_model(model_name) in ("datacamp", "datacamp_dropout"):
        if tf_name not in DATACAMP_NAMES:
            raise WeightTransferError(f"{model_name}: unexpected TF variable {tf_name!r}; "
                                      f"expected one of {sorted(DATACAMP_NAMES)}")
        return DATACAMP_NAMES[tf_name]
    parts = tf_name.split("/")
    if parts[0].startswith("member") and parts[0][6:].isdigit():
        parts = ["members", parts[0][6:], *parts[1:]]
    leaf = parts[-1]
    parts[-1] = {"kernel": "weight", "bias": "bias"}.get(leaf) or BN_NAMES.get(leaf) or leaf
    return ".".join(parts)


def torch_name_to_tf(model_name: str, torch_name: str) -> str:
    if _member_model(model_name) in ("datacamp", "datacamp_dropout"):
        if torch_name not in DATACAMP_NAMES_BACK:
            raise WeightTransferError(f"{model_name}: unexpected torch tensor {torch_name!r}; "
                                      f"expected one of {sorted(DATACAMP_NAMES_BACK)}")
        return DATACAMP_NAMES_BACK[torch_name]
    parts = torch_name.split(".")
    if parts[0] == "members":
        parts = [f"member{parts[1]}", *parts[2:]]
    leaf, owner = parts[-1], parts[-2] if len(parts) > 1 else ""
    if leaf in BN_NAMES_BACK and (owner == "bn" or leaf.startswith("running")):
        parts[-1] = BN_NAMES_BACK[leaf]
    else:
        parts[-1] = {"weight": "kernel", "bias": "bias"}.get(leaf, leaf)
    return "/".join(parts)


def _layer_of(name: str, sep: str) -> str:
    """The catalog layer a weight belongs to (the member prefix removed)."""
    parts = name.split(sep)
    if parts[0] == "members":
        parts = parts[2:]
    elif parts[0].startswith("member") and parts[0][6:].isdigit():
        parts = parts[1:]
    return parts[0]


# ------------------------------------------------------------------------------------- conversion
def _tf_to_torch_array(model_name: str, torch_name: str, array: np.ndarray) -> np.ndarray:
    if array.ndim == 4:  # conv kernel HWIO -> OIHW
        return np.ascontiguousarray(array.transpose(3, 2, 0, 1))
    if array.ndim == 2:  # dense kernel (in, out) -> (out, in)
        layer = _layer_of(torch_name, ".")
        hwc = flatten_inputs(_member_model(model_name)).get(layer)
        if hwc is not None:
            h, w, c = hwc
            # rows are in (h, w, c) order; torch's flatten feeds (c, h, w) order
            array = array.reshape(h, w, c, -1).transpose(2, 0, 1, 3).reshape(h * w * c, -1)
        return np.ascontiguousarray(array.T)
    return np.ascontiguousarray(array)


def _torch_to_tf_array(model_name: str, torch_name: str, array: np.ndarray) -> np.ndarray:
    if array.ndim == 4:  # OIHW -> HWIO
        return np.ascontiguousarray(array.transpose(2, 3, 1, 0))
    if array.ndim == 2:
        array = array.T  # (out, in) -> (in, out), rows in torch's (c, h, w) order
        layer = _layer_of(torch_name, ".")
        hwc = flatten_inputs(_member_model(model_name)).get(layer)
        if hwc is not None:
            h, w, c = hwc
            array = array.reshape(c, h, w, -1).transpose(1, 2, 0, 3).reshape(h * w * c, -1)
        return np.ascontiguousarray(array)
    return np.ascontiguousarray(array)


def tf_to_torch(model_name: str, tf_weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """TF-layout named arrays -> torch state-dict names and layouts (no shape checks: see `check_compatible`)."""
    out = {}
    for name, array in tf_weights.items():
        torch_name = tf_name_to_torch(model_name, name)
        out[torch_name] = _tf_to_torch_array(model_name, torch_name, array)
    return out


def torch_to_tf(model_name: str, torch_weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for name, array in torch_weights.items():
        if name.endswith(IGNORED_TORCH_SUFFIXES):
            continue
        out[torch_name_to_tf(model_name, name)] = _torch_to_tf_array(model_name, name, array)
    return out


def check_compatible(expected: dict[str, tuple[int, ...]], given: dict[str, np.ndarray], what: str,
                     ignore_missing: tuple[str, ...] = ()) -> None:
    """Raise WeightTransferError for missing / unexpected names and shape mismatches (all of them, by name)."""
    missing = [n for n in expected if n not in given and not n.endswith(ignore_missing)]
    unexpected = [n for n in given if n not in expected]
    wrong = [f"{n}: expected {tuple(expected[n])}, got {tuple(given[n].shape)}"
             for n in expected if n in given and tuple(given[n].shape) != tuple(expected[n])]
    problems = []
    if missing:
        problems.append(f"missing {missing}")
    if unexpected:
        problems.append(f"unexpected {unexpected}")
    if wrong:
        problems.append("shape mismatch: " + "; ".join(wrong))
    if problems:
        raise WeightTransferError(f"{what}: " + " | ".join(problems))


# -------------------------------------------------------------------------------------- .npz files
def save_npz(path: str | os.PathLike, weights: dict[str, np.ndarray], *, model: str, framework: str) -> Path:
    path = Path(path)
    meta = json.dumps({"model": model, "framework": framework, "format": 1})
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, __meta__=np.array(meta), **weights)
    os.replace(tmp, path)
    return path


def load_npz(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """The metadata and named arrays of a parity weights file (never unpickles: a file holding Python objects is
    refused, as it could run code when loaded)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if "__meta__" not in data:
                raise WeightTransferError(f"{path}: not a parity weights file (no __meta__ entry)")
            meta = json.loads(str(data["__meta__"]))
            return meta, {k: data[k] for k in data.files if k != "__meta__"}
    except ValueError as error:
        if "allow_pickle" not in str(error):
            raise
        raise WeightTransferError(f"{path}: not a parity weights file: it holds Python objects, which are not "
                                  "loaded (unpickling can run code). Write it with parity.interchange.save_npz or "
                                  "`parity convert`.") from None


# ------------------------------------------------------------------------------------ activations
def flat_maps(model_name: str) -> dict[str, tuple[int, int, int]]:
    """Flatten layers of an (H, W, C) map (H * W > 1), whose outputs are ordered differently by the two sides."""
    spec = get_spec(model_name)
    out, previous = {}, None
    for layer in spec.layers:
        flattens_a_map = previous is not None and len(previous) == 3 and previous[0] * previous[1] > 1
        if len(layer.output_shape) == 1 and flattens_a_map:
            out[layer.name] = previous
        previous = layer.output_shape
    return out


def torch_activation_to_tf(model_name: str, layer_name: str, array: np.ndarray) -> np.ndarray:
    """A torch layer output in the TF layout: NCHW -> NHWC, and a flatten's (C, H, W) order -> (H, W, C)."""
    if array.ndim == 4:
        return array.transpose(0, 2, 3, 1)
    hwc = flat_maps(model_name).get(layer_name)
    if hwc is not None and array.ndim == 2:
        h, w, c = hwc
        return array.reshape(-1, c, h, w).transpose(0, 2, 3, 1).reshape(len(array), -1)
    return array
