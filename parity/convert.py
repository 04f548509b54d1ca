"""`parity convert MODEL SRC DST`: one catalog model's trained weights from one file format to another, verified.

Formats, by the file name's ending:

| ending | what | read | written |
|---|---|---|---|
| `.keras` | a saved Keras model (`model.save`) | TensorFlow | TensorFlow |
| `.weights.h5` | Keras weights (`model.save_weights`, the TF side's `last.weights.h5`) | TensorFlow | TensorFlow |
| `.npz` | the framework-neutral weights file of `parity.interchange` (TF layout) | numpy + torch | numpy |
| `.ckpt` | a Lightning checkpoint of `torch_impl.lightning_module.ClassifierModule` | torch | torch |
| `.onnx` | ONNX (NCHW float32 images -> logits, dynamic batch), see `torch_impl.export` | - | torch, onnx |

Any readable format converts to any other; the usual ones are `.keras` / `.weights.h5` -> `.ckpt`, the reverse, and
`.ckpt` -> `.onnx`. A written `.ckpt` loads with `ClassifierModule.load_from_checkpoint(DST)` (its
hyper_parameters name the model and carry the model's recipe optimizer, so `Trainer.fit` fine-tunes it the
tutorial's way and `Trainer.test` evaluates it). It holds weights only: no optimizer state or loop progress, so
it starts a new fit rather than resuming one.

Ensembles: `cnn_ensemble3` (and any `ClassifierModule` trained with `--members N` of `cnn` or `bn_cnn`) becomes the
TF side's `tf_ref.models.Ensemble` (members `member0`, `member1`, ...) and back; the ONNX file sums the members'
logits. Not supported, with an error that says so: `datacamp` / `datacamp_dropout` to or from `.keras` /
`.weights.h5` (the tutorial's model is a `tf.Module` of raw variables, which Keras cannot save: use `.npz`), and
`residual_block` (a building block without a classifier or recipe).

Before anything is written in place, the converted file is read back the way its users will read it and run on a
batch (the model's test images from `parity.data`, synthetic ones when the dataset cannot be had) next to the
source model: the largest logits difference must be within `atol` (per unit of the logits' magnitude, as
`parity compare` measures, see `verify_limit`). The file is written under a temporary name in DST's directory and
renamed only after that check, so a failure leaves nothing behind and an existing DST is replaced only with
`force`. `.npz` files are run on the torch side (their layout conversion is what the parity tests prove against
TensorFlow), so `.ckpt` <-> `.npz` / `.onnx` never import TensorFlow.

A `.ckpt` is a pickle, as every Lightning checkpoint is: convert only files you trust.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
import warnings
import zipfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from parity.catalog import MODEL_NAMES, TRAINABLE_MODEL_NAMES, get_spec, recipe_for
from parity.interchange import WeightTransferError, load_npz, save_npz, tf_to_torch, torch_to_tf

# ending -> (format, what it is); ".weights.h5" before anything shorter
FORMATS = {
    ".weights.h5": ("weights_h5", "Keras weights file"),
    ".keras": ("keras", "Keras model"),
    ".npz": ("npz", "parity weights file (TF layout)"),
    ".ckpt": ("ckpt", "Lightning checkpoint"),
    ".onnx": ("onnx", "ONNX model"),
}
TF_FORMATS = ("keras", "weights_h5")
KERAS_MEMBER_MODELS = ("cnn", "bn_cnn")  # members tf_ref's Ensemble can be rebuilt with (tutorial 001's)
VERIFY_IMAGES = 64
_MEMBER = re.compile(r"^member(\d+)/")


class ConvertError(ValueError):
    """A conversion that cannot be done: the message says why and what to do instead."""


@dataclass
class Loaded:
    """A model read from a file: its members' weights in the torch layout, and how the file computes logits."""

    members: list[dict[str, np.ndarray]]  # state-dict names of the member model (`conv1.weight`, ...)
    logits: Callable[[np.ndarray], np.ndarray]  # NHWC float32 images -> (N, classes) pre-softmax logits
    runtime: str  # what ran it: "tensorflow", "torch", "onnxruntime"


# ------------------------------------------------------------------------------------------------ helpers
def file_format(path: str | os.PathLike, role: str = "file") -> str:
    """The format a file name stands for; an unknown ending raises ConvertError listing the known ones."""
    name = Path(path).name.lower()
    for ending, (fmt, _) in FORMATS.items():
        if name.endswith(ending) and len(name) > len(ending):
            return fmt
    known = ", ".join(f"{ending} ({what})" for ending, (_, what) in FORMATS.items())
    hint = (" A Keras weights file must end in .weights.h5 (Keras 3); legacy full-model .h5 files are not read: "
            "load it in Keras and save it as .keras.") if name.endswith(".h5") else ""
    raise ConvertError(f"{role} {path}: unknown file type; the name must end in one of: {known}.{hint}")


def _describe(fmt: str) -> str:
    return next(what for f, what in FORMATS.values() if f == fmt)


def _frameworks(tf: bool) -> None:
    """Import torch (and Lightning) first, then TensorFlow if needed: the other order crashes in triton."""
    try:
        import torch_impl.lightning_module  # noqa: F401
    except ImportError as error:
        raise ConvertError(f"converting needs the torch side ({error}): run bash scripts/setup.sh") from error
    if tf:
        try:
            import tf_ref  # noqa: F401, I001  (first: it quiets TensorFlow's start-up logging)
            import tensorflow  # noqa: F401
        except ImportError as error:
            raise ConvertError(f"Keras files need TensorFlow, which is not installed here ({error}): set up with "
                               "bash scripts/setup.sh (without PARITY_NO_TF=1), or convert to/from .npz") from error


def _member_name(model: str) -> str:
    return get_spec(model).member or model


def _prefixed(members: list[dict[str, np.ndarray]], sep: str, prefix: str) -> dict[str, np.ndarray]:
    return {f"{prefix}{i}{sep}{k}": v for i, weights in enumerate(members) for k, v in weights.items()}


def _is_ensemble(model: str, members: int) -> bool:
    return get_spec(model).members > 1 or members > 1


def _tf_layout(model: str, members: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Members' torch weights -> the TF side's names and layouts (`member0/...` for an ensemble)."""
    member = _member_name(model)
    converted = [torch_to_tf(member, weights) for weights in members]
    return _prefixed(converted, "/", "member") if _is_ensemble(model, len(members)) else converted[0]


def _uninitialized(build: Callable):
    """`build()` without drawing initial weights that are all overwritten next (bn_cnn's truncated normals take
    0.5 s per member): built on the meta device, then given uninitialized CPU storage."""
    import torch

    with torch.device("meta"):
        module = build()
    return module.to_empty(device="cpu")


def _torch_model(model: str, members: list[dict[str, np.ndarray]]):
    """A torch nn.Module holding the members: the catalog model itself, or an `Ensemble` of the members."""
    from torch_impl.models import Ensemble, build_member, build_model
    from torch_impl.weights import set_weights

    if not _is_ensemble(model, len(members)):
        module = _uninitialized(lambda: build_model(model))
        set_weights(module, members[0])  # every tensor (num_batches_tracked: 0 where absent)
        return module.eval()
    module = _uninitialized(lambda: Ensemble(lambda: build_member(model), members=len(members)))
    for member, weights in zip(module.members, members):
        set_weights(member, weights)
    return module.eval()


def _torch_logits(module) -> Callable[[np.ndarray], np.ndarray]:
    import torch

    from torch_impl.export import Logits

    wrapper = Logits(module).eval()

    def logits(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return wrapper(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()

    return logits


@cache
def _signatures() -> dict[str, tuple[Counter, Counter]]:
    """Per single catalog model: the multiset of its tensor shapes in the torch and in the TF layout."""
    out = {}
    for name in MODEL_NAMES:
        if get_spec(name).members == 1:
            torch_shapes = _torch_shapes(name)
            out[name] = (Counter(torch_shapes.values()), Counter(v.shape for v in _tf_expected(name).values()))
    return out


def _torch_shapes(member: str) -> dict[str, tuple[int, ...]]:
    from torch_impl.models import build_model

    state = _uninitialized(lambda: build_model(member)).state_dict()
    return {k: tuple(v.shape) for k, v in state.items() if not k.endswith("num_batches_tracked")}


def guess_model(shapes: list[tuple[int, ...]], layout: str = "tf") -> list[tuple[str, int]]:
    """(catalog model, members) pairs whose tensor shapes are exactly `shapes` (judged by shapes only; lenet_a,
    b and c share theirs). `layout`: "tf" for Keras / .npz tensors, "torch" for state-dict tensors."""
    given = Counter(tuple(s) for s in shapes)
    found = []
    for name, (torch_sig, tf_sig) in _signatures().items():
        signature = tf_sig if layout == "tf" else torch_sig
        for k in range(1, 11):
            if given == Counter({shape: count * k for shape, count in signature.items()}):
                found.append((name, k))
    return found


def _model_for(name: str, members: int) -> str:
    """The catalog name to convert `members` members of `name` with (cnn x 3 is cnn_ensemble3)."""
    return next((e for e in MODEL_NAMES if get_spec(e).member == name and get_spec(e).members == members), name)


def _guess_hint(shapes: list[tuple[int, ...]], layout: str, model: str) -> str:
    candidates = [(_model_for(name, k), name, k) for name, k in guess_model(shapes, layout)]
    if not candidates:
        return " Its tensors match no catalog model's."
    if any(catalog == model for catalog, _, _ in candidates):
        return f" Its tensor shapes are those of {model}: only the names differ (layers named otherwise)."
    described = [catalog if catalog != name or k == 1 else f"{k} members of {name}" for catalog, name, k in candidates]
    return (f" Its tensors look like {' / '.join(described)}: run `parity convert {candidates[0][0]} ...` with that "
            f"model name.")


def _mismatch(path: Path, model: str, error: Exception, shapes: list[tuple[int, ...]], layout: str) -> ConvertError:
    return ConvertError(f"{path} does not hold a {model!r} model: {error}.{_guess_hint(shapes, layout, model)}")


def _differences(expected: dict[str, tuple[int, ...]], given: dict[str, tuple[int, ...]], what: str,
                 show: int = 6) -> WeightTransferError:
    """Missing, unexpected and mis-shaped tensors by name, the first `show` of each kind (a file of another
    model can differ in hundreds)."""
    def listed(names: list[str]) -> str:
        more = f" and {len(names) - show} more" if len(names) > show else ""
        return ", ".join(names[:show]) + more

    missing = [n for n in expected if n not in given]
    unexpected = [n for n in given if n not in expected]
    wrong = [f"{n} expected {tuple(expected[n])}, got {tuple(given[n])}" for n in expected
             if n in given and tuple(given[n]) != tuple(expected[n])]
    parts = [f"{kind} {listed(names)}" for kind, names in
             (("missing", missing), ("unexpected", unexpected), ("shape mismatch:", wrong)) if names]
    return WeightTransferError(f"{what}: " + " | ".join(parts))


def _split_members(model: str, weights: dict[str, np.ndarray], path: Path) -> list[dict[str, np.ndarray]]:
    """TF-layout weights (`member0/conv1/kernel` for an ensemble) -> one dict per member, names checked."""
    member = _member_name(model)
    groups: dict[int, dict[str, np.ndarray]] = {}
    plain = {}
    for name, value in weights.items():
        match = _MEMBER.match(name)
        if match:
            groups.setdefault(int(match.group(1)), {})[name[match.end():]] = value
        else:
            plain[name] = value
    shapes = [tuple(v.shape) for v in weights.values()]
    if groups and plain:
        raise _mismatch(path, model, WeightTransferError(f"both member and non-member tensors: {sorted(plain)[:5]}"),
                        shapes, "tf")
    members = [groups[i] for i in sorted(groups)] if groups else [plain]
    if groups and sorted(groups) != list(range(len(groups))):
        raise ConvertError(f"{path}: member numbers {sorted(groups)} are not 0..{len(groups) - 1}")
    spec = get_spec(model)
    if spec.members == 1 and _model_for(member, len(members)) != model:
        raise ConvertError(f"{path} holds {len(members)} {member} models, the catalog's "
                           f"{_model_for(member, len(members))}: run `parity convert {_model_for(member, len(members))} ...`")
    if spec.members > 1 and len(members) != spec.members:
        raise _mismatch(path, model, WeightTransferError(f"{len(members)} member(s), {model} has {spec.members}"),
                        shapes, "tf")
    expected = {k: v.shape for k, v in _tf_expected(member).items()}
    out = []
    for i, group in enumerate(members):
        found = {k: v.shape for k, v in group.items()}
        if found != expected:
            raise _mismatch(path, model, _differences(expected, found, f"member {i}" if groups else "tensors"),
                            shapes, "tf")
        out.append(tf_to_torch(member, group))
    return out


@cache
def _tf_expected(member: str) -> dict[str, np.ndarray]:
    """A member's tensors in the TF layout, zeros (the names and shapes to check files against), from torch."""
    return torch_to_tf(member, {k: np.zeros(shape, np.float32) for k, shape in _torch_shapes(member).items()})


# --------------------------------------------------------------------------------------------------- Keras
def _tf_member_class(member: str):
    from tf_ref.models.bn_cnn import BNCNNModel
    from tf_ref.models.cnn import CNNModel

    return {"cnn": CNNModel, "bn_cnn": BNCNNModel}[member]


def _check_keras_possible(model: str, path: Path) -> None:
    if model in ("datacamp", "datacamp_dropout"):
        raise ConvertError(f"{path}: {model} is tutorial 004's low-level model (a tf.Module of raw tf.Variables, no "
                           f"Keras layers), which Keras cannot save as .keras or .weights.h5; convert to or from "
                           f"its .npz weights file instead (parity.interchange.save_npz on the TF side)")


def _build_tf(model: str, members: int, path: Path):
    """The TF model a Keras file (`path`, for messages) of `members` members of `model` is read into / written
    from."""
    import keras

    from tf_ref.models import Ensemble, build_model

    spec = get_spec(model)
    _check_keras_possible(model, path)
    if members == spec.members:
        return build_model(model)
    member = _member_name(model)
    if member not in KERAS_MEMBER_MODELS:
        raise ConvertError(f"{path}: an ensemble of {members} {member} models has no Keras twin here (tf_ref builds "
                           f"ensembles of {' or '.join(KERAS_MEMBER_MODELS)}); convert to .npz or .onnx instead")
    cls = _tf_member_class(member)
    ensemble = Ensemble(lambda name: cls(name=name), members=members, name=f"{member}_x{members}")
    ensemble(keras.ops.zeros((1, *spec.input_shape)), training=False)  # subclassed models build on their first call
    return ensemble


def _keras_logits(keras_model, model: str) -> Callable[[np.ndarray], np.ndarray]:
    """The Keras model's logits: for the softmax models (tutorial 003), the last Dense without its softmax."""
    import keras

    softmax = get_spec(_member_name(model)).output == "softmax"

    def logits(x: np.ndarray) -> np.ndarray:
        if not softmax:
            return np.asarray(keras_model(x, training=False))
        last = keras_model.layers[-1]
        if getattr(getattr(last, "activation", None), "__name__", "") != "softmax":
            raise ConvertError(f"{model}: the Keras model's last layer {last.name!r} is not a softmax Dense")
        saved, last.activation = last.activation, keras.activations.linear
        try:
            return np.asarray(keras_model(x, training=False))
        finally:
            last.activation = saved

    return logits


def _layer_names(keras_model) -> list[str]:
    import keras

    from tf_ref.models import Ensemble

    if isinstance(keras_model, Ensemble):
        keras_model = keras_model.members[0] if keras_model.members else keras_model
    return [layer.name for layer in keras_model.layers if not isinstance(layer, keras.layers.InputLayer)]


def _check_layers(path: Path, model: str, keras_model) -> None:
    """Same weights do not make the same model (lenet_a / b / c share theirs): the layers must be the catalog's."""
    names = _layer_names(keras_model)
    wanted = [layer.name for layer in get_spec(_member_name(model)).layers]
    if names == wanted:
        return
    like = [n for n in MODEL_NAMES if [layer.name for layer in get_spec(n).layers] == names]
    hint = f": it is a {like[0]} model, run `parity convert {like[0]} ...`" if like else ""
    raise ConvertError(f"{path} is not a {model!r} Keras model: its layers are {names}, {model}'s are {wanted}{hint}")


_PARTIAL_LOAD = "Skipping nested container"  # Keras's warning for layers that kept their fresh weights


def _keras_load(path: Path, load: Callable):
    """Run a Keras load; a layer left with its initial weights (Keras only warns) is an error here."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = load()
    partial = [str(w.message) for w in caught if _PARTIAL_LOAD in str(w.message)]
    if partial:
        raise ConvertError(f"{path}: Keras left {len(partial)} layer group(s) with their initial weights ({partial[0]})")
    for w in caught:  # the rest as they would have been shown
        if "cannot be built automatically" not in str(w.message):  # subclassed models: built on load, as intended
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return result


def _load_weights(keras_model, path: Path, model: str, shapes: dict[str, tuple[int, ...]], groups: set[str]) -> None:
    """`keras_model.load_weights(path)` of a file whose datasets are exactly the model's: Keras's own check names
    one layer, and it silently skips a file's extra layers (a 5-member ensemble read into 3 members)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        keras_model.save_weights(Path(tmp) / "expected.weights.h5")
        expected = _h5_shapes(Path(tmp) / "expected.weights.h5")
        expected_groups = _h5_groups(Path(tmp) / "expected.weights.h5")
    if expected != shapes:  # Keras names datasets by layer type and position, which is what it compares
        raise _mismatch(path, model, _differences(expected, shapes, "HDF5 datasets"), list(shapes.values()), "tf")
    if groups != expected_groups:
        # Same weights, other layers: the layers without weights (pooling, dropout, LRN) differ, e.g. a lenet_a
        # file read as lenet_c (lenet_a, b and c have the same weight shapes; lenet_c adds LRN layers).
        missing, extra = sorted(expected_groups - groups), sorted(groups - expected_groups)
        raise ConvertError(
            f"{path} is not a weights file of {model}: its tensors fit, but its layers do not (missing: "
            f"{', '.join(missing) or '-'}; not in {model}: {', '.join(extra) or '-'}). Was it saved from another "
            f"catalog model? Name the model the file was saved from."
        )
    try:
        _keras_load(path, lambda: keras_model.load_weights(path))
    except ConvertError:
        raise
    except Exception as error:  # noqa: BLE001  (Keras raises ValueError / KeyError / OSError for a bad file)
        raise ConvertError(f"{path}: Keras could not load it into {model}: {type(error).__name__}: {error}") from None


def _members_in(model: str, shapes: dict[str, tuple[int, ...]]) -> int:
    """How many members a Keras weights file of `model` holds: the catalog's number for an ensemble, else found by
    the tensor shapes (`--members N` ensembles of tutorial 001's members)."""
    spec = get_spec(model)
    if spec.members > 1:
        return spec.members
    counts = [k for name, k in guess_model(list(shapes.values()), "tf") if name == model]
    return counts[0] if counts else 1


def _h5_shapes(source) -> dict[str, tuple[int, ...]]:
    """Every dataset's shape in an HDF5 file (a path or a file object)."""
    import h5py

    out = {}
    with h5py.File(source, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj.shape) if isinstance(obj, h5py.Dataset) else None)
    return out


def _h5_groups(source) -> set[str]:
    """The layer groups of a Keras weights file, the weightless layers included (datasets name only the others)."""
    import h5py

    out = set()
    with h5py.File(source, "r") as f:
        f.visititems(lambda name, obj: out.add(name) if isinstance(obj, h5py.Group) and name.startswith("layers/")
                     and name.count("/") == 1 else None)
    return out


def _read_keras(model: str, path: Path) -> Loaded:
    import io

    import keras

    from tf_ref.weights import get_weights

    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
            names = set(archive.namelist())
            config = json.loads(archive.read("config.json")) if "config.json" in names else None
            weights_h5 = archive.read("model.weights.h5") if "model.weights.h5" in names else None
    except (zipfile.BadZipFile, OSError, ValueError) as error:
        raise ConvertError(f"{path} is not a readable .keras file (a zip archive): {error}; it may be truncated or "
                           f"corrupt: save the model again with model.save(...)") from None
    if bad is not None or config is None or weights_h5 is None:
        what = f"member {bad} is damaged" if bad else "config.json or model.weights.h5 is missing"
        raise ConvertError(f"{path} is not a complete .keras file ({what}): save the model again with model.save")
    if config.get("class_name") == "Ensemble":
        # tf_ref's Ensemble makes its members with a factory, which its config cannot hold (it does not even keep
        # the member count): the model is rebuilt here from the catalog and the archive's weights loaded into it
        shapes = _h5_shapes(io.BytesIO(weights_h5))
        keras_model = _build_tf(model, _members_in(model, shapes), path)
        _load_weights(keras_model, path, model, shapes, _h5_groups(io.BytesIO(weights_h5)))
    else:
        try:
            keras_model = _keras_load(path, lambda: keras.saving.load_model(path))  # safe mode: no Lambda code runs
        except ConvertError:
            raise
        except Exception as error:  # noqa: BLE001  (Keras raises many types for a bad file)
            raise ConvertError(f"{path}: Keras could not load it: {type(error).__name__}: {error}") from None
    weights = _split_members(model, get_weights(keras_model), path)
    _check_layers(path, model, keras_model)
    return Loaded(weights, _keras_logits(keras_model, model), "tensorflow")


def _read_weights_h5(model: str, path: Path) -> Loaded:
    from tf_ref.weights import get_weights

    try:
        shapes = _h5_shapes(path)
    except OSError as error:
        raise ConvertError(f"{path} is not a readable HDF5 weights file ({error}); it may be truncated or corrupt: "
                           f"save the weights again with model.save_weights(...)") from None
    members = _members_in(model, shapes)
    keras_model = _build_tf(model, members, path)
    _load_weights(keras_model, path, model, shapes, _h5_groups(path))
    weights = _split_members(model, get_weights(keras_model), path)
    return Loaded(weights, _keras_logits(keras_model, model), "tensorflow")


def _write_keras(model: str, loaded: Loaded, path: Path, fmt: str, shown: Path) -> None:
    from tf_ref.weights import set_weights

    keras_model = _build_tf(model, len(loaded.members), shown)
    set_weights(keras_model, _tf_layout(model, loaded.members))
    if fmt == "keras":
        keras_model.save(path)
    else:
        keras_model.save_weights(path)


# ----------------------------------------------------------------------------------------------------- npz
def _read_npz(model: str, path: Path) -> Loaded:
    try:
        meta, weights = load_npz(path)
    except WeightTransferError as error:
        raise ConvertError(str(error)) from None
    except Exception as error:  # noqa: BLE001  (zip / pickle / JSON errors of a damaged file)
        raise ConvertError(f"{path} is not a readable .npz weights file ({type(error).__name__}: {error}); it may "
                           f"be truncated or corrupt: write it again with parity.interchange.save_npz") from None
    saved = meta.get("model")
    if saved is not None and saved != model:
        raise ConvertError(f"{path} holds a {saved!r} model, not {model!r}: run `parity convert {saved} ...`")
    if meta.get("framework") == "torch":  # a torch-layout file: TF names and layout first, one code path below
        weights = torch_to_tf(model, weights)
    members = _split_members(model, weights, path)
    return Loaded(members, _torch_logits(_torch_model(model, members)), "torch")


def _write_npz(model: str, loaded: Loaded, path: Path) -> None:
    save_npz(path, _tf_layout(model, loaded.members), model=model, framework="tf")


# ---------------------------------------------------------------------------------------------------- ckpt
def _hyper_parameters(model: str, members: int) -> dict:
    """The ClassifierModule arguments `parity train` would give this model: its recipe's optimizer."""
    from torch_impl.train import module_arguments

    return module_arguments(model, recipe_for(model).replace(members=members))


def _read_ckpt(model: str, path: Path) -> Loaded:
    import inspect

    import torch

    from torch_impl.lightning_module import ClassifierModule
    from torch_impl.weights import get_weights

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001  (truncated zip, not a pickle, ...)
        raise ConvertError(f"{path} is not a readable PyTorch checkpoint ({type(error).__name__}: {error}); it may "
                           f"be truncated or corrupt: save it again (Trainer.save_checkpoint)") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ConvertError(f"{path} is not a Lightning checkpoint (no 'state_dict' entry)")
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    saved = hparams.get("model_name")
    if saved is not None and saved != model:
        raise ConvertError(f"{path} holds a {saved!r} model (its hyper_parameters), not {model!r}: "
                           f"run `parity convert {saved} ...`")
    accepted = set(inspect.signature(ClassifierModule.__init__).parameters) - {"self"}
    unknown = sorted(set(hparams) - accepted)
    if unknown:
        raise ConvertError(f"{path} is not a ClassifierModule checkpoint (unknown hyper_parameters {unknown})")
    hparams["model_name"] = model
    module = _uninitialized(lambda: ClassifierModule(**hparams))
    state = checkpoint["state_dict"]
    wanted, found = ({k: tuple(v.shape) for k, v in d.items()} for d in (module.state_dict(), state))
    if wanted != found:
        shapes = [v for k, v in found.items() if k.startswith("model.") and not k.endswith("num_batches_tracked")]
        raise _mismatch(path, model, _differences(wanted, found, "state_dict"), shapes, "torch")
    if "pytorch-lightning_version" in checkpoint:  # what users will do with it (and how a written DST is checked)
        kwargs = {} if saved else {"model_name": model}
        with torch.random.fork_rng(devices=[]):
            module = ClassifierModule.load_from_checkpoint(path, map_location="cpu", **kwargs)
    else:  # a dict saved by hand with torch.save: the weights, checked above, into the module built from its hparams
        module.load_state_dict(state)
    module.eval()
    ensemble = module.ensemble() if callable(getattr(module, "ensemble", None)) else module.model
    members = [get_weights(member) for member in ensemble.members]

    def logits(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module.member_logits(torch.from_numpy(x).permute(0, 3, 1, 2)).sum(0).numpy()

    return Loaded(members, logits, "torch")


def _write_ckpt(model: str, loaded: Loaded, path: Path, source: Path) -> None:
    import lightning
    import torch

    from torch_impl.lightning_module import ClassifierModule
    from torch_impl.weights import set_weights

    # only its state_dict and hyper_parameters are written: every weight is set here, the metrics are not saved
    module = _uninitialized(lambda: ClassifierModule(**_hyper_parameters(model, len(loaded.members))))
    for member, weights in zip(module.model.members, loaded.members):
        set_weights(member, weights)
    checkpoint = {  # what Trainer.save_checkpoint(weights_only=True) writes, without loop progress
        "epoch": 0,
        "global_step": 0,
        "pytorch-lightning_version": lightning.__version__,
        "state_dict": module.state_dict(),
        "hyper_parameters": dict(module.hparams),
        "converted_from": {"file": source.name, "format": file_format(source), "by": "parity convert"},
    }
    torch.save(checkpoint, path)


# ---------------------------------------------------------------------------------------------------- onnx
def _write_onnx(model: str, loaded: Loaded, path: Path) -> None:
    from torch_impl.export import INSTALL_HINT, export_onnx, onnxruntime_available

    if not onnxruntime_available():  # without it the file could not be verified
        raise ConvertError(f"writing .onnx needs onnx and onnxruntime: {INSTALL_HINT}")
    export_onnx(_torch_model(model, loaded.members), path, model_name=model)


def _read_onnx(model: str, path: Path) -> Loaded:
    from torch_impl.export import onnx_metadata, run_onnx

    saved = onnx_metadata(path).get("model_name")
    if saved != model:
        raise ConvertError(f"{path}: its metadata names model {saved!r}, not {model!r}")

    def logits(x: np.ndarray) -> np.ndarray:
        return run_onnx(path, x.transpose(0, 3, 1, 2))

    return Loaded([], logits, "onnxruntime")


# --------------------------------------------------------------------------------------------- the command
def verify_batch(model: str, n: int = VERIFY_IMAGES) -> tuple[np.ndarray, str]:
    """NHWC float32 images scaled as the model's recipe scales them: the test set's first `n`, else synthetic."""
    recipe = recipe_for(model)
    try:
        from parity.data import load_arrays

        images = load_arrays(recipe.dataset, log=lambda *args, **kwargs: None)["x_test"][:n]
        source = f"{len(images)} {recipe.dataset} test images"
    except Exception as error:  # noqa: BLE001  (no cache and no network: the check still runs, on noise)
        images = np.random.default_rng(0).integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        source = f"{n} synthetic images ({recipe.dataset} unavailable: {type(error).__name__})"
    return (images.astype(np.float32) / np.float32(recipe.scale))[..., None], source


def verify_limit(reference: np.ndarray, atol: float) -> float:
    """The largest difference accepted: `atol` x max(1, |logits|max). Float32 keeps ~7 significant digits, so
    logits in the hundreds (tutorial 003 feeds raw 0-255 pixels) differ across frameworks by ~1e-5 already; the
    scale is the one `parity compare`'s forward level applies per layer."""
    return atol * max(1.0, float(np.abs(reference).max()))


def _temp_path(dst: Path) -> Path:
    ending = next(e for e in FORMATS if dst.name.lower().endswith(e))
    return dst.with_name(f".{dst.name[:-len(ending)]}.{uuid.uuid4().hex[:8]}.partial{ending}")


_READERS = {"keras": _read_keras, "weights_h5": _read_weights_h5, "npz": _read_npz, "ckpt": _read_ckpt,
            "onnx": _read_onnx}


def convert(model: str, src: str | os.PathLike, dst: str | os.PathLike, *, force: bool = False,
            atol: float = 1e-5) -> dict:
    """Convert `src` (a file of catalog model `model`) into `dst`; formats from the file names (see the module
    docstring). Verifies the written file against the source on a batch before putting it in place.

    Returns {"model", "src", "dst", "src_format", "dst_format", "members", "max_abs_diff", "limit", "atol",
    "batch", "runtimes": {"src", "dst"}, "seconds"}. Raises ConvertError (a ValueError) with what to do, or
    FileNotFoundError for a missing SRC.
    """
    started = time.perf_counter()
    spec = get_spec(model)  # raises ValueError listing valid names
    src, dst = Path(src), Path(dst)
    src_fmt, dst_fmt = file_format(src, "SRC"), file_format(dst, "DST")
    if spec.output == "features" or not spec.recipe:
        raise ConvertError(f"{model} is a building block (no classifier, no training recipe): there is no trained "
                           f"model file of it to convert")
    if src_fmt == "onnx":
        raise ConvertError(f"SRC {src}: ONNX is written, not read, here; convert from the .ckpt / .keras it came from")
    if src_fmt == dst_fmt:
        raise ConvertError(f"SRC and DST are both {_describe(src_fmt)}s: nothing to convert (copy the file)")
    if not src.is_file():
        raise FileNotFoundError(f"SRC {src}: no such file")
    if dst.exists() and not force:
        raise ConvertError(f"DST {dst} exists: pass --force (force=True) to replace it")
    if not dst.parent.is_dir():
        raise ConvertError(f"DST {dst}: the directory {dst.parent} does not exist")

    for fmt, path in ((src_fmt, src), (dst_fmt, dst)):
        if fmt in TF_FORMATS:
            _check_keras_possible(model, path)

    _frameworks(tf=src_fmt in TF_FORMATS or dst_fmt in TF_FORMATS)
    loaded = _READERS[src_fmt](model, src)
    x, batch = verify_batch(model)
    tmp = _temp_path(dst)
    try:
        if dst_fmt in TF_FORMATS:
            _write_keras(model, loaded, tmp, dst_fmt, dst)
        elif dst_fmt == "npz":
            _write_npz(model, loaded, tmp)
        elif dst_fmt == "ckpt":
            _write_ckpt(model, loaded, tmp, src)
        else:
            _write_onnx(model, loaded, tmp)
        written = _READERS[dst_fmt](model, tmp)  # read back as its users will read it
        expected, got = loaded.logits(x), written.logits(x)
        if expected.shape != got.shape:
            raise ConvertError(f"verification failed: logits of shape {got.shape}, expected {expected.shape}; "
                               f"nothing was written to {dst}")
        diff = float(np.abs(expected.astype(np.float64) - got).max())
        limit = verify_limit(expected, atol)
        if not diff <= limit:  # also catches NaN
            raise ConvertError(f"verification failed: max abs logits difference {diff:.3g} > {limit:.3g} on {batch} "
                               f"({loaded.runtime} on {src.name} vs {written.runtime} on the converted file); nothing "
                               f"was written to {dst}. Check that SRC really is a {model} model; --atol loosens the "
                               f"check")
        if dst.exists() and not force:
            raise ConvertError(f"DST {dst} appeared while converting: pass --force to replace it")
        os.replace(tmp, dst)
    finally:
        for leftover in (tmp, tmp.with_name(tmp.name + ".tmp.npz")):
            if leftover.exists():
                leftover.unlink()
    return {"model": model, "src": str(src), "dst": str(dst), "src_format": src_fmt, "dst_format": dst_fmt,
            "members": len(loaded.members), "max_abs_diff": diff, "limit": limit, "atol": atol, "batch": batch,
            "runtimes": {"src": loaded.runtime, "dst": written.runtime},
            "seconds": round(time.perf_counter() - started, 2)}


def cmd_convert(args) -> int:
    result = convert(args.model, args.src, args.dst, force=args.force, atol=args.atol)
    print(f"converted {result['model']} ({result['members']} member(s)): {result['src']} "
          f"({_describe(result['src_format'])}) -> {result['dst']} ({_describe(result['dst_format'])})")
    print(f"verified on {result['batch']}: max abs logits difference {result['max_abs_diff']:.3g} "
          f"<= {result['limit']:.3g} ({result['runtimes']['src']} vs {result['runtimes']['dst']}), "
          f"{result['seconds']:.1f} s")
    return 0


def add_convert_parser(sub) -> None:
    from parity.compare import HelpFormatter

    endings = ", ".join(FORMATS)
    p = sub.add_parser(
        "convert", help="convert a trained model between .keras / .weights.h5 / .npz / Lightning .ckpt / .onnx",
        description=f"Convert a catalog model's file; the formats come from the file names ({endings}). The "
                    "converted file is read back and run next to the source on a batch of test images before it "
                    "is put in place; the command fails, writing nothing, if the logits differ by more than "
                    "atol x max(1, |logits|).",
        formatter_class=HelpFormatter)
    p.add_argument("model", choices=TRAINABLE_MODEL_NAMES, metavar="MODEL",
                   help=f"one of: {', '.join(TRAINABLE_MODEL_NAMES)}")
    p.add_argument("src", type=Path, metavar="SRC", help="the file to read")
    p.add_argument("dst", type=Path, metavar="DST", help="the file to write (refused if it exists, unless --force)")
    p.add_argument("--force", action="store_true", help="replace an existing DST")
    p.add_argument("--atol", type=float, default=1e-5, help="verification tolerance, per unit of the logits' size")
    p.set_defaults(func=cmd_convert)
