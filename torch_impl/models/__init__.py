"""The model registry: `build_model(name)` for every catalog name (see `parity.catalog`)."""

from __future__ import annotations

import functools

import torch
from torch import nn

from parity.catalog import MODEL_NAMES, get_spec
from torch_impl.models.bn_cnn import BNCNN
from torch_impl.models.cnn import CNN
from torch_impl.models.convpool import ConvPool
from torch_impl.models.datacamp import DataCampCNN
from torch_impl.models.ensemble import Ensemble
from torch_impl.models.inception import InceptionE
from torch_impl.models.lenet import LeNet, LeNetD
from torch_impl.models.residual_block import ResidualBlock
from torch_impl.models.vectorized import VectorizedEnsemble

_BUILDERS = {
    "cnn": CNN,
    "cnn_ensemble3": lambda: Ensemble(CNN, members=3),
    "bn_cnn": BNCNN,
    "residual_block": ResidualBlock,
    "convpool": ConvPool,
    "lenet_a": lambda: LeNet("a"),
    "lenet_b": lambda: LeNet("b"),
    "lenet_c": lambda: LeNet("c"),
    "lenet_d": LeNetD,
    "inception_e": InceptionE,
    "datacamp": lambda: DataCampCNN(dropout=False),
    "datacamp_dropout": lambda: DataCampCNN(dropout=True),
}
assert set(_BUILDERS) == set(MODEL_NAMES), "every catalog model needs a PyTorch builder"

# Keras folds an activation into its Conv2D / Dense layers; PyTorch applies it in `forward`. To compare
# layer outputs one to one, `intermediate_outputs` applies these after the module of the same name.
_RELU = {
    # the ReLUs the forward applies after a catalog layer's module: after the dense / conv module (Keras has them
    # inside the layer), and after the max pooling in the models that pool before their ReLU (Keras pools after it)
    "cnn": ("conv1", "pool1", "conv2", "pool2", "conv3", "pool3", "dense4"),
    "bn_cnn": ("conv1", "pool1", "conv2", "pool2", "conv3", "pool3"),
    "residual_block": ("conv1", "conv2"),
    "convpool": ("conv1", "conv2", "conv3", "conv4", "dense1"),
    "lenet_a": ("conv1", "conv2", "conv3", "conv4", "conv5"),
    "lenet_d": ("conv1", "conv2", "conv3", "conv4", "conv5", "conv6", "conv7", "conv8"),
    "inception_e": ("conv1", "conv4", "conv5"),
    "datacamp": ("conv1", "pool1", "conv2", "pool2", "conv3", "pool3", "fc1"),
}
_RELU["lenet_b"] = _RELU["lenet_c"] = _RELU["lenet_a"]
_RELU["datacamp_dropout"] = _RELU["datacamp"]


def check_images(model: nn.Module, args: tuple, shape: tuple[int, int, int] = (1, 28, 28)) -> None:
    """A forward pre-hook: the images a migrating user passes in the Keras layout (NHWC, no channel axis, uint8
    pixels) fail with what to do, instead of a convolution's shape or dtype error deep inside."""
    x = args[0] if args else None
    name = type(model).__name__
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} expects a tensor of images (batch, {', '.join(map(str, shape))}), got {type(x).__name__}")
    if x.ndim != 4 or tuple(x.shape[1:]) != shape:
        c, h, w = shape
        if x.ndim == 4 and tuple(x.shape[1:]) == (h, w, c):
            hint = "these are NHWC images (Keras's layout): pass x.permute(0, 3, 1, 2)"
        elif x.ndim == 3 and tuple(x.shape[1:]) == (h, w):
            hint = "the channel axis is missing: pass x.unsqueeze(1)"
        else:
            hint = f"the catalog's models take {h} x {w} images with {c} channel(s)"
        raise ValueError(f"{name} expects images of shape (batch, {c}, {h}, {w}) (NCHW), got {tuple(x.shape)}: {hint}")
    if not x.is_floating_point():
        raise TypeError(f"{name} expects floating-point images, got {x.dtype}: scale the pixels as the recipe does, "
                        "e.g. x.float() / 255")


def build_model(name: str, *, seed: int | None = None) -> nn.Module:
    """A freshly initialized model (Keras's initializers). `seed` fixes the init. Its input is checked
    (`check_images`): NCHW float images of the catalog's input shape."""
    spec = get_spec(name)  # raises ValueError listing valid names
    if seed is not None:
        torch.manual_seed(seed)
    model = _BUILDERS[name]()
    h, w, c = spec.input_shape
    model.register_forward_pre_hook(functools.partial(check_images, shape=(c, h, w)))  # picklable
    return model


def build_member(name: str, seed: int | None = None) -> nn.Module:
    """One member of an ensemble recipe (`cnn` for cnn_ensemble3, the model itself otherwise)."""
    spec = get_spec(name)
    return build_model(spec.member or name, seed=seed)


def model_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Pre-softmax outputs: `model.logits` for models whose tutorial output is a softmax, `model(x)` otherwise."""
    return model.logits(x) if getattr(model, "output", "logits") == "softmax" else model(x)


@torch.no_grad()
def intermediate_outputs(model: nn.Module, name: str, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every catalog layer's output for input `x` (NCHW), in forward order, as Keras defines the layer.

    Convolution outputs come back NCHW; compare with TF after a permute to NHWC.
    """
    spec = get_spec(name)
    relu_after = set(_RELU.get(name, ()))
    modules = dict(model.named_modules())
    if isinstance(model, Ensemble):
        modules.update({f"member{i}": member for i, member in enumerate(model.members)})
    captured: dict[str, torch.Tensor] = {}
    hooks = []
    for layer in spec.layers:
        if layer.name not in modules:
            raise KeyError(f"{type(model).__name__} has no module named {layer.name!r} (catalog layer of {name})")

        def hook(_module, _inputs, output, layer_name=layer.name):
            captured[layer_name] = torch.relu(output) if layer_name in relu_after else output

        hooks.append(modules[layer.name].register_forward_hook(hook))
    try:
        final = model(x)
    finally:
        for handle in hooks:
            handle.remove()
    last = spec.layers[-1].name
    if getattr(model, "output", "logits") == "softmax":
        captured[last] = final  # Keras's last Dense carries the softmax
    return {layer.name: captured[layer.name] for layer in spec.layers}


__all__ = ["Ensemble", "VectorizedEnsemble", "build_member", "build_model", "intermediate_outputs", "model_logits"]
