"""`parity summary MODEL --framework torch`, in the TF side's format: shapes in (H, W, C) order."""

from __future__ import annotations

import torch
from torch import nn

from parity.catalog import get_spec
from torch_impl.models import Ensemble, build_model, intermediate_outputs


def _hwc(shape: torch.Size) -> list[int]:
    shape = list(shape[1:])  # drop the batch dimension
    return [*shape[1:], shape[0]] if len(shape) == 3 else shape  # (C, H, W) -> (H, W, C)


def _buffers(module: nn.Module) -> int:
    # running_mean / running_var are Keras's non-trainable moving statistics; num_batches_tracked has no twin
    return sum(b.numel() for n, b in module.named_buffers() if not n.endswith("num_batches_tracked"))


def summarize(name: str, model: nn.Module | None = None) -> dict:
    spec = get_spec(name)
    model = model if model is not None else build_model(name)
    was_training = model.training
    model.eval()
    outputs = intermediate_outputs(model, name, torch.zeros(1, spec.input_shape[2], *spec.input_shape[:2]))
    model.train(was_training)
    modules = dict(model.named_modules())
    if isinstance(model, Ensemble):
        modules.update({f"member{i}": m for i, m in enumerate(model.members)})
    layers = []
    for layer_name, output in outputs.items():
        module = modules[layer_name]
        params = sum(p.numel() for p in module.parameters()) + _buffers(module)
        layers.append({"name": layer_name, "type": type(module).__name__, "output_shape": _hwc(output.shape),
                       "params": params})
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad) + _buffers(model)
    return {
        "model": name,
        "framework": "torch",
        "total_params": trainable + frozen,
        "trainable_params": trainable,
        "non_trainable_params": frozen,
        "layers": layers,
    }
