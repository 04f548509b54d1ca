"""ONNX export of a catalog model (or a trained `ClassifierModule`), and running the file in ONNX Runtime.

The file takes NCHW float32 images with a dynamic batch axis (`input`, shape (batch, C, H, W)) and returns the
pre-softmax logits (`logits`, (batch, classes)); an ensemble returns the sum of its members' logits, as tutorial
001 predicts. For the softmax models (the LeNets, inception_e) the softmax is left out, as `model_logits` does:
apply it on the consumer's side if probabilities are wanted. `residual_block` (a building block) returns its
feature map (`features`, NCHW).

Exporter: torch.export-based (`dynamo=True`, torch's default since 2.9; it needs the `onnxscript` package). The
height and width are static, so the TF 'same' paddings that the layers compute in Python from the input's size
are plain integers in the captured graph; only the batch axis is symbolic. The TorchScript-based exporter
(`dynamo=False`, deprecated) traces those sizes as tensors, which the native pooling path of `torch_impl.layers`
cannot take as its padding: it fails on every model with a 'same' pool.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from parity.catalog import get_spec

DEFAULT_OPSET = 18  # the torch.export-based exporter's lowest; onnxruntime has run it since 1.14
INPUT_NAME = "input"
INSTALL_HINT = "install the ONNX extra: pip install -e '.[onnx]' (onnx, onnxscript and onnxruntime)"


class Logits(nn.Module):
    """What the ONNX file computes: the model's logits (an ensemble's summed logits) for NCHW images."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch_impl.models import Ensemble, model_logits

        if isinstance(self.model, Ensemble):  # the sum of logits, also for members whose forward is a softmax
            return torch.stack([model_logits(member, x) for member in self.model.members]).sum(0)
        return model_logits(self.model, x)


def _plain_model(model: nn.Module, model_name: str) -> nn.Module:
    """The nn.Module to export: a `ClassifierModule`'s members as an `Ensemble`, a vectorized ensemble unrolled."""
    hparams = getattr(model, "hparams", None)
    saved = hparams.get("model_name") if hparams is not None else None
    if saved is not None and saved != model_name:
        raise ValueError(f"this module holds a {saved!r} model, but model_name={model_name!r} was given")
    if callable(getattr(model, "ensemble", None)):  # ClassifierModule (loop or vectorized ensemble_mode)
        model = model.ensemble()
    elif callable(getattr(model, "to_ensemble", None)):  # VectorizedEnsemble
        model = model.to_ensemble()
    _check_size(model, model_name)
    return model


def _check_size(model: nn.Module, model_name: str) -> None:
    """A model of another architecture would export fine and be labelled wrongly: compare the weight count."""
    from torch_impl.models import Ensemble

    spec = get_spec(model_name)
    member = get_spec(spec.member or model_name)
    members = len(model.members) if isinstance(model, Ensemble) else 1
    count = sum(t.numel() for k, t in model.state_dict().items() if not k.endswith("num_batches_tracked"))
    if count != member.total_params * members:
        raise ValueError(f"the model has {count:,} weights, but {members} x {member.name} has "
                         f"{member.total_params * members:,}: is model_name={model_name!r} the right catalog name?")


def output_name(model_name: str) -> str:
    return "features" if get_spec(model_name).output == "features" else "logits"


def export_onnx(model: nn.Module, path: str | os.PathLike, *, model_name: str, opset: int = DEFAULT_OPSET) -> Path:
    """Write `model` (a catalog nn.Module, an `Ensemble` or a `ClassifierModule`) to `path` as ONNX.

    The model itself is left untouched (a float32 CPU copy in eval mode is exported). The file's metadata names
    the catalog model (`model_name`), the input layout and the output, for whoever loads it later.
    """
    spec = get_spec(model_name)  # raises ValueError listing valid names
    try:
        import onnxscript  # noqa: F401  (what torch.onnx's exporter translates with)
    except ImportError as error:
        raise ImportError(f"ONNX export needs onnxscript: {INSTALL_HINT}") from error
    path = Path(path)
    height, width, channels = spec.input_shape
    # a copy, in eval mode (dropout off, BatchNorm statistics used): the caller's model keeps its mode and device
    wrapper = Logits(copy.deepcopy(_plain_model(model, model_name)).float().cpu()).eval()
    example = torch.zeros(2, channels, height, width)
    out_name = output_name(model_name)
    program = torch.onnx.export(wrapper, (example,), dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
                                output_names=[out_name], dynamic_shapes=({0: torch.export.Dim("batch")},),
                                verbose=False, optimize=False)  # onnxruntime optimizes the graph when it loads it
    program.model.metadata_props.update({"model_name": model_name, "producer": "tf-torch-parity",
                                         "input": "NCHW float32, pixels scaled as the model's recipe does",
                                         "output": out_name})
    program.save(str(path), external_data=False)
    return path


def onnx_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata `export_onnx` wrote (empty for files from elsewhere)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(session.get_modelmeta().custom_metadata_map)


def onnxruntime_available() -> bool:
    """Whether a model can be exported and run here (the `onnx` extra is installed)."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        return False
    return True


def run_onnx(path: str | os.PathLike, x: np.ndarray, batch: int = 1000) -> np.ndarray:
    """Run an exported file in ONNX Runtime (CPU) on NCHW float32 images, in chunks of `batch`."""
    try:
        import onnxruntime as ort
    except ImportError as error:
        raise ImportError(f"running an ONNX file needs onnxruntime: {INSTALL_HINT}") from error
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    x = np.ascontiguousarray(x, dtype=np.float32)
    return np.concatenate([session.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])
