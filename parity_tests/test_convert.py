"""`parity convert` (Keras file <-> Lightning checkpoint <-> .npz, and ONNX) and `torch_impl.export`.

Every round trip is judged by what the files compute: the logits of the source model and of the converted file,
each run by the framework that reads it, within 1e-5; and weights that must survive unchanged are compared
exactly. Error cases check the message and that nothing was written.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from parity.catalog import MODEL_NAMES, get_spec, recipe_for
from parity.convert import ConvertError, convert
from torch_impl.export import Logits, export_onnx, onnx_metadata, run_onnx
from torch_impl.lightning_module import ClassifierModule
from torch_impl.models import build_model as build_torch

ATOL = 1e-5


def _images(model: str, n: int = 64) -> np.ndarray:
    """NHWC float32 test images as the model's recipe scales them (real MNIST / Fashion-MNIST)."""
    from parity.data import load_arrays

    recipe = recipe_for(model)
    x = load_arrays(recipe.dataset)["x_test"][:n]
    return (x.astype(np.float32) / np.float32(recipe.scale))[..., None]


def _keras_logits(keras_model, model: str, x: np.ndarray) -> np.ndarray:
    """A tf_ref model's logits; for a softmax model, its last Dense applied by hand to the features before it."""
    import keras

    if get_spec(model).output != "softmax":
        return np.asarray(keras_model(x, training=False))
    features = np.asarray(keras.Model(keras_model.inputs, keras_model.layers[-2].output)(x, training=False))
    dense = keras_model.layers[-1]
    return features @ np.asarray(dense.kernel) + np.asarray(dense.bias)


def _ckpt_logits(path, x: np.ndarray) -> np.ndarray:
    module = ClassifierModule.load_from_checkpoint(path).eval()  # no arguments: the hyper_parameters suffice
    with torch.no_grad():
        return module(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float(np.abs(a - b).max())


def _only(directory, *names: str) -> None:
    """Nothing but `names` in the directory: no DST, no temporary file left behind."""
    assert sorted(p.name for p in directory.iterdir()) == sorted(names)


# ------------------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("model, fmt", [("cnn", ".keras"), ("inception_e", ".weights.h5"),
                                        ("cnn_ensemble3", ".keras")])
def test_keras_to_ckpt_and_back(tf, tmp_path, model, fmt):
    from tf_ref.models import build_model as build_tf
    from tf_ref.weights import get_weights as tf_weights

    original = build_tf(model, seed=3)
    src = tmp_path / f"{model}{fmt}"
    if fmt == ".keras":
        original.save(src)
    else:
        original.save_weights(src)
    x = _images(model)
    expected = _keras_logits(original, model, x)

    result = convert(model, src, tmp_path / f"{model}.ckpt")
    assert result["max_abs_diff"] <= ATOL and result["members"] == get_spec(model).members
    assert ClassifierModule.load_from_checkpoint(tmp_path / f"{model}.ckpt", model_name=model).hparams.model_name == model
    assert _max_diff(_ckpt_logits(tmp_path / f"{model}.ckpt", x), expected) <= ATOL

    back = tmp_path / f"back{fmt}"
    convert(model, tmp_path / f"{model}.ckpt", back)
    if fmt == ".keras":
        import keras

        from tf_ref.models import Ensemble

        if isinstance(original, Ensemble):  # its config cannot rebuild the members: the catalog model reads it
            reread = build_tf(model, seed=4)
            reread.load_weights(back)
        else:
            reread = keras.saving.load_model(back)
    else:
        reread = build_tf(model, seed=4)
        reread.load_weights(back)
    before, after = tf_weights(original), tf_weights(reread)
    assert sorted(before) == sorted(after)
    for name in before:  # transposes and the flatten permutation undone exactly
        np.testing.assert_array_equal(before[name], after[name], err_msg=name)
    assert _max_diff(_keras_logits(reread, model, x), expected) == 0.0


def test_lightning_checkpoint_with_batchnorm_statistics(tf, tmp_path):
    """A checkpoint written by Trainer.save_checkpoint of bn_cnn with non-trivial moving statistics -> .weights.h5
    -> .ckpt, and Trainer.test on the result gives the same accuracy as on the original."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from tf_ref.models import build_model as build_tf
    from tf_ref.weights import get_weights as tf_weights

    torch.manual_seed(0)
    module = ClassifierModule(model_name="bn_cnn")
    for bn in (m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    x = _images("bn_cnn")
    y = torch.from_numpy(np.resize(np.arange(10), len(x)))
    data = DataLoader(TensorDataset(torch.from_numpy(x).permute(0, 3, 1, 2), y), batch_size=32)

    def trainer():
        return L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")

    tested = trainer()
    tested.test(module, data, verbose=False)
    accuracy = module.epoch_metrics()["test_acc"]
    tested.save_checkpoint(tmp_path / "trained.ckpt")  # Lightning's own file: loops, callbacks, hyper_parameters
    with torch.no_grad():
        expected = module.eval()(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()

    convert("bn_cnn", tmp_path / "trained.ckpt", tmp_path / "bn.weights.h5")
    keras_model = build_tf("bn_cnn", seed=1)
    keras_model.load_weights(tmp_path / "bn.weights.h5")
    moving = tf_weights(keras_model)
    np.testing.assert_array_equal(moving["conv2/bn/moving_variance"], module.model.members[0].conv2.bn.running_var)
    np.testing.assert_array_equal(moving["dense4/bn/moving_mean"], module.model.members[0].dense4.bn.running_mean)
    assert _max_diff(_keras_logits(keras_model, "bn_cnn", x), expected) <= ATOL

    convert("bn_cnn", tmp_path / "bn.weights.h5", tmp_path / "back.ckpt")
    restored = ClassifierModule.load_from_checkpoint(tmp_path / "back.ckpt").state_dict()
    for name, tensor in module.state_dict().items():
        if not name.endswith("num_batches_tracked"):  # no Keras twin: 0 after the round trip
            torch.testing.assert_close(restored[name], tensor, rtol=0, atol=0, msg=name)
    fresh = ClassifierModule(model_name="bn_cnn")
    trainer().test(fresh, data, ckpt_path=tmp_path / "back.ckpt", verbose=False)
    assert fresh.epoch_metrics()["test_acc"] == accuracy
    assert accuracy == pytest.approx(float((expected.argmax(-1) == y.numpy()).mean()))


def test_datacamp_goes_through_npz_and_refuses_keras(tf, tmp_path):
    """Tutorial 004's model is a tf.Module: no Keras file exists for it, its .npz weights convert both ways."""
    from parity.interchange import load_npz, save_npz
    from tf_ref.models import build_model as build_tf
    from tf_ref.weights import get_weights as tf_weights

    original = build_tf("datacamp", seed=5)
    save_npz(tmp_path / "dc.npz", tf_weights(original), model="datacamp", framework="tf")
    x = _images("datacamp")
    convert("datacamp", tmp_path / "dc.npz", tmp_path / "dc.ckpt")
    assert _max_diff(_ckpt_logits(tmp_path / "dc.ckpt", x), np.asarray(original(x))) <= ATOL
    convert("datacamp", tmp_path / "dc.ckpt", tmp_path / "back.npz")
    meta, back = load_npz(tmp_path / "back.npz")
    assert meta["model"] == "datacamp"
    for name, value in tf_weights(original).items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)
    with pytest.raises(ConvertError, match=r"tf\.Module.*\.npz"):
        convert("datacamp", tmp_path / "dc.ckpt", tmp_path / "dc.keras")
    _only(tmp_path, "dc.npz", "dc.ckpt", "back.npz")


def test_torch_only_directions_never_import_tensorflow(tmp_path, monkeypatch):
    """.ckpt <-> .npz and .ckpt -> .onnx work where TensorFlow is not installed (made unimportable here)."""
    torch.manual_seed(1)
    module = ClassifierModule(model_name="convpool")
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, tmp_path / "cp.ckpt")
    for name in [n for n in sys.modules if n.split(".")[0] in ("tensorflow", "keras", "tf_ref")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "tensorflow", None)
    convert("convpool", tmp_path / "cp.ckpt", tmp_path / "cp.npz")
    convert("convpool", tmp_path / "cp.npz", tmp_path / "again.ckpt")
    result = convert("convpool", tmp_path / "cp.ckpt", tmp_path / "cp.onnx")
    assert result["runtimes"] == {"src": "torch", "dst": "onnxruntime"} and result["max_abs_diff"] <= ATOL
    with pytest.raises(ConvertError, match="need TensorFlow"):
        convert("convpool", tmp_path / "cp.ckpt", tmp_path / "cp.keras")
    x = _images("convpool")
    with torch.no_grad():
        expected = module.eval()(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    assert _max_diff(_ckpt_logits(tmp_path / "again.ckpt", x), expected) == 0.0


# ---------------------------------------------------------------------------------------------- errors
def test_file_of_another_model_is_named(tf, tmp_path):
    from tf_ref.models import build_model as build_tf

    build_tf("cnn", seed=0).save_weights(tmp_path / "cnn.weights.h5")
    with pytest.raises(ConvertError) as info:
        convert("convpool", tmp_path / "cnn.weights.h5", tmp_path / "out.ckpt")
    message = str(info.value)
    assert "does not hold a 'convpool' model" in message
    assert "layers/conv2d/vars/0 expected (3, 3, 1, 64), got (3, 3, 1, 32)" in message  # tensors by name
    assert "look like cnn" in message and "parity convert cnn" in message

    build_tf("lenet_a", seed=0).save(tmp_path / "a.keras")  # same weights as lenet_c, another model
    with pytest.raises(ConvertError, match=r"not a 'lenet_c' Keras model.*'lrn1'.*it is a lenet_a model"):
        convert("lenet_c", tmp_path / "a.keras", tmp_path / "out.ckpt")

    module = ClassifierModule(model_name="bn_cnn")
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, tmp_path / "bn.ckpt")
    with pytest.raises(ConvertError, match=r"holds a 'bn_cnn' model .*parity convert bn_cnn"):
        convert("cnn", tmp_path / "bn.ckpt", tmp_path / "out.keras")
    _only(tmp_path, "cnn.weights.h5", "a.keras", "bn.ckpt")


@pytest.mark.parametrize("fmt", [".keras", ".weights.h5", ".ckpt", ".npz"])
def test_corrupt_file_is_refused(tmp_path, fmt, request):
    good = tmp_path / "good"
    if fmt == ".ckpt":
        module = ClassifierModule(model_name="lenet_a")
        torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, good)
    elif fmt == ".npz":
        from parity.interchange import save_npz, torch_to_tf
        from torch_impl.weights import get_weights

        save_npz(good.with_suffix(".npz"), torch_to_tf("lenet_a", get_weights(build_torch("lenet_a"))),
                 model="lenet_a", framework="tf")
        good.with_suffix(".npz").rename(good)
    else:
        request.getfixturevalue("tf")
        from tf_ref.models import build_model as build_tf

        keras_model, keras_file = build_tf("lenet_a", seed=0), tmp_path / f"good{fmt}"
        if fmt == ".keras":
            keras_model.save(keras_file)
        else:
            keras_model.save_weights(keras_file)
        keras_file.rename(good)
    data = good.read_bytes()
    good.unlink()
    (tmp_path / f"bad{fmt}").write_bytes(data[: len(data) // 2])  # a truncated copy
    dst = tmp_path / ("out.npz" if fmt == ".ckpt" else "out.ckpt")
    with pytest.raises(ConvertError, match=r"not a readable .*truncated or corrupt"):
        convert("lenet_a", tmp_path / f"bad{fmt}", dst)
    _only(tmp_path, f"bad{fmt}")


def test_existing_destination_needs_force(tmp_path):
    module = ClassifierModule(model_name="lenet_b")
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, tmp_path / "b.ckpt")
    (tmp_path / "b.npz").write_bytes(b"precious")
    with pytest.raises(ConvertError, match=r"exists: pass --force"):
        convert("lenet_b", tmp_path / "b.ckpt", tmp_path / "b.npz")
    assert (tmp_path / "b.npz").read_bytes() == b"precious"
    _only(tmp_path, "b.ckpt", "b.npz")
    convert("lenet_b", tmp_path / "b.ckpt", tmp_path / "b.npz", force=True)
    from parity.interchange import load_npz

    assert load_npz(tmp_path / "b.npz")[0]["model"] == "lenet_b"
    _only(tmp_path, "b.ckpt", "b.npz")


@pytest.mark.parametrize("dst, message", [("out.pt", "unknown file type"),
                                          ("out.h5", r"must end in \.weights\.h5"),
                                          ("out.onnx.txt", "unknown file type")])
def test_unknown_extension(tmp_path, dst, message):
    (tmp_path / "m.ckpt").write_bytes(b"never read")
    with pytest.raises(ConvertError, match=message):
        convert("cnn", tmp_path / "m.ckpt", tmp_path / dst)
    with pytest.raises(ConvertError, match="ONNX is written, not read"):
        convert("cnn", tmp_path / "m.onnx", tmp_path / "m.npz")
    _only(tmp_path, "m.ckpt")


def test_verification_failure_writes_nothing(tmp_path, monkeypatch):
    """A conversion bug (here: one bias shifted on the way out) is caught by running the written file."""
    import parity.convert

    module = ClassifierModule(model_name="cnn")
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, tmp_path / "c.ckpt")
    real = parity.convert.torch_to_tf

    def broken(model, weights):
        out = real(model, weights)
        return {k: v + 0.01 if k == "dense5/bias" else v for k, v in out.items()}

    monkeypatch.setattr(parity.convert, "torch_to_tf", broken)
    with pytest.raises(ConvertError, match=r"verification failed: max abs logits difference 0\.01 > 1e-05.*nothing"):
        convert("cnn", tmp_path / "c.ckpt", tmp_path / "c.npz")
    _only(tmp_path, "c.ckpt")


# ------------------------------------------------------------------------------------------------ ONNX
@pytest.mark.parametrize("model", MODEL_NAMES)
def test_onnx_export_matches_torch(tmp_path, model, rng):
    spec = get_spec(model)
    torch.manual_seed(0)
    # the ensemble as Lightning holds it (a ClassifierModule); the others as plain catalog nn.Modules
    torch_model = ClassifierModule(model_name=model) if spec.members > 1 else build_torch(model)
    for bn in (m for m in torch_model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    torch_model.train()
    path = export_onnx(torch_model, tmp_path / f"{model}.onnx", model_name=model)
    assert torch_model.training, "exported in eval mode, from a copy: the model keeps its own mode"
    assert onnx_metadata(path)["model_name"] == model
    scale = 255.0 / recipe_for(model).scale if spec.recipe else 1.0
    torch_model.eval()
    for batch in (3, 16):  # neither is the export's example batch (2): the batch axis is dynamic
        x = (rng.random((batch, spec.input_shape[2], *spec.input_shape[:2])) * scale).astype(np.float32)
        with torch.no_grad():
            expected = torch_model(torch.from_numpy(x)) if spec.members > 1 else Logits(torch_model)(torch.from_numpy(x))
        assert _max_diff(run_onnx(path, x), expected.numpy()) <= ATOL


def test_onnx_export_refuses_a_wrong_model_name(tmp_path):
    with pytest.raises(ValueError, match="holds a 'cnn_ensemble3' model"):
        export_onnx(ClassifierModule(model_name="cnn_ensemble3"), tmp_path / "x.onnx", model_name="cnn")
    with pytest.raises(ValueError, match="is model_name='lenet_a' the right catalog name"):
        export_onnx(build_torch("cnn"), tmp_path / "x.onnx", model_name="lenet_a")
    _only(tmp_path)


# ------------------------------------------------------------------------------------------------- CLI
def test_cli_convert(tf, tmp_path, capsys):
    from parity.cli import main
    from tf_ref.models import build_model as build_tf

    build_tf("lenet_d", seed=2).save(tmp_path / "d.keras")
    assert main(["convert", "lenet_d", str(tmp_path / "d.keras"), str(tmp_path / "d.ckpt")]) == 0
    out = capsys.readouterr().out
    assert "d.keras (Keras model) -> " in out and "(Lightning checkpoint)" in out
    assert "verified on 64 mnist test images: max abs logits difference" in out
    assert main(["convert", "lenet_d", str(tmp_path / "d.keras"), str(tmp_path / "d.ckpt")]) == 2
    assert "exists: pass --force" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a building block has no model file to convert
        main(["convert", "residual_block", str(tmp_path / "d.keras"), str(tmp_path / "r.ckpt")])


@pytest.mark.parametrize("target", ["lenet_b", "lenet_c"])
def test_weights_file_of_another_lenet_is_refused(tf, tmp_path, target):
    """lenet_a, b and c have the same weight shapes; only their weightless layers (dropout, LRN) tell the files
    apart. A lenet_a weights file converted as lenet_b or lenet_c (another function) used to pass silently."""
    from tf_ref.models import build_model as build_tf

    build_tf("lenet_a", seed=0).save_weights(tmp_path / "a.weights.h5")
    with pytest.raises(ConvertError, match=f"is not a weights file of {target}: its tensors fit, but its layers"):
        convert(target, tmp_path / "a.weights.h5", tmp_path / "out.npz")
    assert not (tmp_path / "out.npz").exists()
    convert("lenet_a", tmp_path / "a.weights.h5", tmp_path / "out.npz")  # its own model still converts


def test_npz_with_python_objects_is_refused_without_unpickling(tmp_path):
    """numpy's own message for such a file advises allow_pickle=True, i.e. running whatever the file holds."""
    from parity.interchange import WeightTransferError, load_npz

    np.savez(tmp_path / "objects.npz", __meta__=np.array([{"model": "cnn"}], dtype=object))
    with pytest.raises(WeightTransferError, match="holds Python objects, which are not loaded") as error:
        load_npz(tmp_path / "objects.npz")
    assert "allow_pickle" not in str(error.value)
