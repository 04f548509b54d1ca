"""`parity bench` runs end to end on a tiny budget and reports what it documents (its timings are not tested:
speed lives in BENCHMARKS.md, not in assertions)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest

from parity import bench
from parity.cli import main


def test_models_parse_and_bad_names_are_refused():
    assert bench.parse_models("cnn, bn_cnn:5") == [("cnn", 1), ("bn_cnn", 5)]
    with pytest.raises(ValueError, match="cnn"):
        bench.parse_models("no_such_model")
    assert bench.steps_for(5, 30) == 6 and bench.steps_for(3, 1) == 1
    assert not bench.applicable("vectorized_bare", 1) and bench.applicable("vectorized_fit", 3)


def test_unknown_variant_is_an_error_that_lists_the_valid_ones(capsys):
    status = main(["bench", "--models", "cnn", "--variants", "eager,warp_speed", "--steps", "1", "--repeats", "1"])
    assert status == 2
    err = capsys.readouterr().err
    assert "warp_speed" in err and "channels_last" in err


def test_bench_runs_every_default_variant_on_a_tiny_budget(tf, tmp_path, capsys, monkeypatch):
    """Both frameworks, every default variant of a single model and of an ensemble, one timed step each, plus the
    memory table for one recipe: every row is measured (status ok) and the JSON has the documented fields, and no
    temporary file or directory of the bench or its workers is left behind."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() reads TMPDIR again
    out = tmp_path / "bench.json"
    status = main(["bench", "--models", "lenet_a,cnn:2", "--batch-sizes", "32", "--steps", "1", "--repeats", "1",
                   "--warmup", "1", "--threads", "1", "--data", "synthetic", "--memory", "--memory-models",
                   "lenet_a", "--memory-steps", "2", "--json", str(out)])
    printed = capsys.readouterr().out
    assert status == 0, printed
    result = json.loads(out.read_text())
    assert result["command"].startswith("parity bench --models lenet_a,cnn:2")
    assert {"torch", "lightning", "tensorflow"} <= result["versions"].keys()

    rows = {(r["variant"], r["model"], r["members"]): r for r in result["rows"]}
    expected = {(v, "lenet_a", 1) for v in ("tf", "eager", "channels_last", "bare", "fit")}
    expected |= {(v, "cnn", 2) for v in ("tf", "eager", "channels_last", "fit", "vectorized_bare", "vectorized_fit")}
    assert set(rows) == expected
    for key, row in rows.items():
        assert row["status"] == "ok", (key, row["status"])
        assert row["images_per_s"] > 0 and row["peak_rss_mb"] > 0 and row["batch"] == 32
        assert (row["ratio_to_tf"] == 1.0) if row["framework"] == "tf" else row["ratio_to_tf"] > 0
        assert row["tf_imported"] == (row["framework"] == "tf"), key  # torch workers never import TensorFlow
    modes = {(o["model"], o["mode"]) for o in result["lightning_overhead"]}
    assert modes == {("lenet_a", "single"), ("cnn", "vectorized")}

    (memory,) = [r for r in result["memory"] if r["framework"] == "torch"]
    assert memory["status"] == "ok" and memory["recipe"] == "tut003" and memory["peak_rss_mb"] > memory["base_rss_mb"]
    assert {r["framework"] for r in result["memory"]} == {"tf", "torch"}
    assert "images/s" in printed and "Lightning overhead" in printed and "Peak resident memory" in printed
    # 'of matmul' divides by the best rate either framework reaches on this CPU
    by_framework = result["matmul_gflops_by_framework"]
    assert set(by_framework) == {"torch", "tf"}
    for dtype in ("float32", "bfloat16"):
        assert result["matmul_gflops"][dtype] == max(rates[dtype] for rates in by_framework.values()) > 0
    for row in result["rows"]:
        dtype = "bfloat16" if row["variant"] == "bf16" else "float32"
        assert row["fraction_of_matmul"] == pytest.approx(row["gflops"] / result["matmul_gflops"][dtype])
    assert list(scratch.iterdir()) == []


def test_torch_only_bench_never_imports_tensorflow(tmp_path):
    """`--frameworks torch` is what runs on a GPU machine without TensorFlow: no TF in any process."""
    out = tmp_path / "bench.json"
    status = main(["bench", "--models", "lenet_a", "--frameworks", "torch", "--variants", "eager,bf16,fit",
                   "--batch-sizes", "16", "--steps", "1", "--repeats", "1", "--warmup", "0", "--threads", "1",
                   "--data", "synthetic", "--json", str(out)])
    assert status == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [r["variant"] for r in rows] == ["eager", "bf16", "fit"]
    assert all(r["status"] == "ok" and r["tf_imported"] is False and r["ratio_to_tf"] is None for r in rows)
    # the arithmetic columns: FLOPs per image from the model, the rate at the measured speed, the share of the
    # matrix-multiply rate of the row's dtype
    assert set(result["matmul_gflops"]) == {"float32", "bfloat16"}
    assert set(result["matmul_gflops_by_framework"]) == {"torch"}  # no TensorFlow process for its rate either
    from torch_impl.flops import flops_per_image

    for row in rows:
        assert row["train_gflop_per_image"] == flops_per_image("lenet_a") / 1e9
        assert row["gflops"] == pytest.approx(row["images_per_s"] * row["train_gflop_per_image"])
        dtype = "bfloat16" if row["variant"] == "bf16" else "float32"
        assert row["fraction_of_matmul"] == pytest.approx(row["gflops"] / result["matmul_gflops"][dtype])


def test_layer_bench_runs_end_to_end_on_a_tiny_budget(tf, tmp_path):
    """`scripts/layer_bench.py` (BENCHMARKS.md, "where the remaining gap is"): every part timed in both frameworks,
    the numbers in its JSON; with oneDNN's verbose lines on, which the libraries print to stdout, the workers'
    answers still get through."""
    import os
    import subprocess
    import sys

    out = tmp_path / "layers.json"
    script = Path(__file__).resolve().parent.parent / "scripts" / "layer_bench.py"
    result = subprocess.run([sys.executable, str(script), "--repeats", "1", "--iters", "1", "--batch", "8",
                             "--json", str(out)], capture_output=True, text=True, timeout=300, check=False,
                            env={**os.environ, "ONEDNN_VERBOSE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [row["part"] for row in rows][-1] == "whole step" and len(rows) == 9
    for row in rows:
        assert row["tf_ms"] > 0 and row["torch_ms"] > 0, row
    assert "whole step" in result.stdout


def test_bench_proposals_runs_lightning_configs_on_a_tiny_budget(tmp_path):
    """`scripts/bench_proposals.py` (BENCHMARKS.md, Lightning's overhead): the bare loop, the port's Trainer and
    `Trainer(barebones=True)` each time their steps; the speed-ups are paired against the port's Trainer."""
    import subprocess
    import sys

    out = tmp_path / "proposals.json"
    script = Path(__file__).resolve().parent.parent / "scripts" / "bench_proposals.py"
    result = subprocess.run([sys.executable, str(script), "--model", "lenet_a", "--batch", "8", "--steps", "2",
                             "--repeats", "1", "--warmup", "1", "--threads", "1", "--data", "synthetic",
                             "--configs", "bare,fit,fit_barebones", "--json", str(out)],
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {row["config"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"bare", "fit", "fit_barebones"}, result.stdout
    assert all(row["ms_per_step"] > 0 for row in rows.values())
    assert rows["fit_barebones"]["patches"] == ["barebones"] and rows["fit_barebones"]["speedup"] > 0
    assert rows["bare"]["speedup"] is None  # a base is not compared with itself


def test_dropout_bench_times_every_row_on_a_tiny_budget(tf, tmp_path):
    """`scripts/dropout_bench.py` (BENCHMARKS.md, dropout): both torch layers, Keras's layer and torch's two draws."""
    import subprocess
    import sys

    out = tmp_path / "dropout.json"
    script = Path(__file__).resolve().parent.parent / "scripts" / "dropout_bench.py"
    result = subprocess.run([sys.executable, str(script), "--shapes", "4x8x5x5", "--iterations", "2", "--repeats", "1",
                             "--threads", "1", "--json", str(out)], capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {row["row"]: row["ms"] for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"torch nn.Dropout (bernoulli)", "torch port Dropout (uniform >= rate)",
                         "torch bernoulli_ alone", "torch rand_like alone", "tf keras Dropout"}, result.stdout
    assert all(ms > 0 for ms in rows.values())


def test_profile_step_prints_the_op_table():
    """`scripts/profile_step.py`: torch.profiler's per-op table of a training step, convolutions included."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parent.parent / "scripts" / "profile_step.py"
    result = subprocess.run([sys.executable, str(script), "--model", "lenet_a", "--batch", "4", "--steps", "1",
                             "--channels-last"], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "aten::convolution_backward" in result.stdout and "Self CPU time total" in result.stdout


def test_layer_bench_tf_parts_compute_the_forward_pass(tf, load_script):
    """A linear layer's gradients do not need its output, so a `tf.function` that returned only them would have its
    forward pass pruned by Grappler and time the backward alone against torch's forward + backward. Every TF part
    returns the layer's output (of the layer's output shape) with the gradients."""
    parts = load_script("layer_bench").tf_parts(batch=4, threads=None, inter_op=None)
    shapes = {"conv1 1->32 @28": (4, 28, 28, 32), "relu @28 (32 ch)": (4, 28, 28, 32),
              "maxpool 28->14": (4, 14, 14, 32), "conv2 32->64 @14": (4, 14, 14, 64),
              "conv3 64->128 @7": (4, 7, 7, 128), "dense 2048->256": (4, 256), "dense 256->10": (4, 10)}
    for name, shape in shapes.items():
        output, gradients = parts[name]()
        assert tuple(output.shape) == shape, name
        assert all(g is not None for g in gradients), name


def test_hardware_names_the_gpu_on_a_cuda_device(monkeypatch):
    """A GPU bench records which GPU and CUDA / cuDNN versions it ran with (faked here: the CPU machine has none)."""
    from types import SimpleNamespace

    import torch

    assert "gpu" not in bench._hardware("cpu")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: f"NVIDIA H100 80GB HBM3 #{index}")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: SimpleNamespace(total_memory=85 * 2**30))
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 91002)
    hardware = bench._hardware("cuda:1")
    assert hardware["gpu"] == "NVIDIA H100 80GB HBM3 #1" and hardware["gpu_memory_gib"] == 85.0
    assert hardware["cudnn"] == 91002 and "cuda" in hardware and hardware["cores"] == bench._hardware()["cores"]


@pytest.mark.slow
def test_gpu_measurements_script_runs_every_stage_on_a_tiny_budget(tmp_path, mnist):
    """scripts/gpu_measurements.sh, the GPU section's commands in stages for a short device lease: with DEVICE=cpu and
    QUICK=1 every stage runs its commands on tiny budgets and writes its files (a check of the script, not a
    measurement), taking MNIST from a folder of gz files into an empty cache without the network, as on a machine
    without internet; an unknown stage is refused before anything runs."""
    import gzip
    import os
    import subprocess
    import sys

    from parity.data import FILES, default_cache_dir

    script = Path(__file__).resolve().parent.parent / "scripts" / "gpu_measurements.sh"
    source = tmp_path / "device_data"
    source.mkdir()
    for name in FILES:
        (source / f"{name}.gz").write_bytes(gzip.compress((default_cache_dir() / "mnist" / name).read_bytes(), 1))
    cache, out = tmp_path / "cache", tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, DEVICE="cpu", QUICK="1", DATA_SOURCE=str(source),
               PARITY_DATA_DIR=str(cache), PARITY_OFFLINE="1", RUNS_DIR=str(tmp_path / "runs"))
    refused = subprocess.run(["bash", str(script), str(out), "env", "gpu"], env=env, capture_output=True, text=True)
    assert refused.returncode == 2 and "unknown stage 'gpu'" in refused.stderr and not out.exists()

    result = subprocess.run(["bash", str(script), str(out), "all"], env=env, capture_output=True, text=True,
                            timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(p.name for p in (cache / "mnist").glob("*-ubyte")) == sorted(FILES)
    env_txt = (out / "env.txt").read_text()
    assert "torch " in env_txt and "lightning " in env_txt and "TensorFlow imported: False" in env_txt
    bench_rows = json.loads((out / "bench.json").read_text())["rows"]
    assert {(r["model"], r["members"]) for r in bench_rows} == {("cnn", 1), ("bn_cnn", 2)}
    assert {r["variant"] for r in bench_rows} == {"channels_last", "bf16", "fit", "vectorized_bare"}
    assert all(r["status"] == "ok" and r["tf_imported"] is False for r in bench_rows)
    assert "images/s" in (out / "bench.txt").read_text()
    scale_rows = json.loads((out / "scale.json").read_text())["rows"]
    assert scale_rows and all(r["status"] == "ok" for r in scale_rows)
    assert {r["batch"] for r in scale_rows} == {8, 16}
    cnn_lines = (out / "cnn.txt").read_text().splitlines()
    assert [line.split()[:4] for line in cnn_lines] == [["cnn_32-true", "cnn", "tut001_cnn", "epochs"],
                                                        ["cnn_bf16-mixed", "cnn", "tut001_cnn", "epochs"]]
    assert all("test acc" in line for line in cnn_lines)
    assert (out / "best.txt").read_text().split()[:5] == ["best_vectorized_bf16", "bn_cnn", "tut001_best", "epochs", "1"]
    assert sorted(p.name for p in out.iterdir()) == ["bench.json", "bench.txt", "best.txt", "cnn.txt", "env.txt",
                                                     "scale.json", "scale.txt"]  # the runs stay in RUNS_DIR

    # a training run stopped at TRAIN_LIMIT_S is reported with the epochs it finished, and the next stage still runs
    env.update(TRAIN_LIMIT_S="1")
    stopped = subprocess.run(["bash", str(script), str(out), "cnn", "env"], env=env, capture_output=True, text=True,
                             timeout=600)
    assert stopped.returncode == 0, stopped.stdout[-3000:] + stopped.stderr[-3000:]
    assert "cnn_32-true: stopped after 1 s" in stopped.stdout and "stage env" in stopped.stdout
    assert "no history.json: the run finished no epoch" in (out / "cnn.txt").read_text()

    # a failed stage (here: no CUDA device) does not stop the next one; the script names it and exits 1
    env.update(DEVICE="cuda", CUDA_VISIBLE_DEVICES="")
    failing = subprocess.run(["bash", str(script), str(out), "bench", "env"], env=env, capture_output=True, text=True,
                             timeout=600)
    assert failing.returncode == 1 and "failed stages: bench env" in failing.stderr, failing.stderr[-3000:]
    assert "stage env" in failing.stdout
