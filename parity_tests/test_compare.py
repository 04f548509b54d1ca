"""`parity compare`: the documented JSON format, the report files, and a non-zero exit status on a failing level."""

from __future__ import annotations

import json

import numpy as np
import pytest

from parity.cli import main


def test_compare_writes_report_and_json(tf, tmp_path):
    out, js = tmp_path / "report", tmp_path / "result.json"
    status = main(["compare", "lenet_c", "--levels", "structure,forward,train_step,accuracy", "--train-steps", "5",
                   "--limit-train", "256", "--margin", "100", "--out", str(out), "--json", str(js), "--no-progress"])
    assert status == 0
    result = json.loads(js.read_text())
    levels = result["levels"]
    assert result["model"] == "lenet_c"
    assert levels["structure"]["pass"] is True
    layers = levels["structure"]["per_layer"]
    assert len(layers) == levels["structure"]["layers"] == 11 and layers[0]["name"] == "conv1"
    assert all(row["tf_shape"] == row["torch_shape"] and row["tf_params"] == row["torch_params"] for row in layers)
    assert "| conv1 | Conv2D | Conv2d | (14, 14, 8) | (14, 14, 8) | 208 | 208 |" in (out / "report.md").read_text()
    assert set(levels["forward"]["max_abs_diff"]) == {"tf_to_torch", "torch_to_tf", "onnxruntime"}
    assert levels["forward"]["pass"] is True and max(levels["forward"]["max_abs_diff"].values()) <= 1e-3
    assert set(levels["forward"]["max_abs_diff_float64"]) == {"tf_to_torch", "torch_to_tf"}
    assert max(levels["forward"]["max_abs_diff_float64"].values()) <= 1e-10
    onnx = levels["forward"]["onnxruntime"]  # the dev extra installs onnxruntime: the column runs here
    assert onnx["status"] == "ok" and onnx["pass"] is True and max(onnx["vs_torch"], onnx["vs_tf"]) <= 1e-3
    assert "onnxruntime" in (out / "report.md").read_text()
    assert levels["train_step"]["pass"] is True and levels["train_step"]["max_param_diff"] <= 1e-10
    assert {"pass", "tf", "torch"} <= set(levels["accuracy"])
    for name in ("report.md", "forward_per_layer.png", "train_step_curves.png", "curves.png", "confusion.png"):
        assert (out / name).exists(), f"report lacks {name}"
    assert list((out / "runs" / "lenet_c").iterdir()), "both frameworks' runs land under the report directory"


def test_compare_exits_nonzero_when_a_level_fails(tf, tmp_path):
    # a negative margin is one no accuracy difference can meet: the accuracy level must fail
    status = main(["compare", "cnn", "--levels", "accuracy", "--limit-train", "200", "--margin", "-1",
                   "--out", str(tmp_path), "--no-progress"])
    assert status == 1


def test_compare_rejects_unknown_level():
    assert main(["compare", "cnn", "--levels", "speed"]) == 2


def test_compare_rejects_unknown_model():
    with pytest.raises(SystemExit) as info:
        main(["compare", "alexnet"])
    assert info.value.code == 2


def test_onnxruntime_column_counts_and_reports_absence(tf, monkeypatch, rng):
    import parity.compare
    import torch_impl.export
    from parity.compare import level_forward, level_onnxruntime, table_rows

    x = rng.random((4, 28, 28, 1), dtype=np.float32) * 255
    failing = {"status": "ok", "pass": False, "vs_torch": 0.5, "vs_tf": 0.25, "opset": 18}
    monkeypatch.setattr(parity.compare, "level_onnxruntime", lambda *args, **kwargs: failing)
    forward = level_forward("lenet_a", x)
    assert forward["pass"] is False and forward["max_abs_diff"]["onnxruntime"] == 0.5
    assert "onnxruntime 5.00e-01 (vs torch 5.00e-01, vs tf 2.50e-01) FAIL" in table_rows({"levels": {"forward": forward}})[0][2]

    monkeypatch.setattr(torch_impl.export, "onnxruntime_available", lambda: False)
    absent = level_onnxruntime("lenet_a", x)
    assert absent["status"] == "not installed" and absent["pass"] is None
    monkeypatch.setattr(parity.compare, "level_onnxruntime", lambda *args, **kwargs: absent)
    forward = level_forward("lenet_a", x)
    assert forward["pass"] is True and forward["max_abs_diff"]["onnxruntime"] is None
    assert table_rows({"levels": {"forward": forward}})[0][2].endswith("onnxruntime not installed")


@pytest.mark.parametrize("tf_runs, torch_runs", [
    ([0.9929, 0.9930, 0.9934], [0.9929, 0.9916, 0.9935]),
    ([0.985, 0.987, 0.984, 0.986, 0.9855], [0.983, 0.988, 0.985]),  # unequal run counts
])
def test_accuracy_equivalence_is_welchs_interval(tf_runs, torch_runs):
    from scipy import stats

    from parity.compare import accuracy_equivalence

    result = accuracy_equivalence(tf_runs, torch_runs, margin=0.0015)
    expected = stats.ttest_ind(torch_runs, tf_runs, equal_var=False).confidence_interval(0.95)
    assert result["ci95"] == pytest.approx([expected.low, expected.high], rel=1e-9)
    assert result["diff"] == pytest.approx(np.mean(torch_runs) - np.mean(tf_runs))
    assert result["pass"] is bool(-0.0015 <= expected.low and expected.high <= 0.0015)


def test_accuracy_floor_fails_two_equally_poor_frameworks():
    from parity.compare import accuracy_equivalence, table_rows

    assert accuracy_equivalence([0.90], [0.90], margin=0.005)["pass"] is True  # equal, but both far too low
    floored = accuracy_equivalence([0.90], [0.90], margin=0.005, min_acc=0.985)
    assert floored["pass"] is False and floored["min_acc"] == 0.985
    assert accuracy_equivalence([0.986], [0.987], margin=0.005, min_acc=0.985)["pass"] is True
    assert accuracy_equivalence([0.986], [0.984], margin=0.005, min_acc=0.985)["pass"] is False
    row = table_rows({"levels": {"accuracy": {**floored, "seeds": 1, "epochs": 1,
                                              "seconds_per_epoch": {"tf": 1.0, "torch": 1.0}}}})[0]
    assert row[1] == "FAIL" and "floor 98.50%" in row[2]


def test_accuracy_equivalence_with_one_run_tests_the_difference_only():
    from parity.compare import accuracy_equivalence

    assert accuracy_equivalence([0.990], [0.989], margin=0.0015)["pass"] is True
    assert accuracy_equivalence([0.990], [0.988], margin=0.0015)["pass"] is False
    assert accuracy_equivalence([0.990], [0.989], margin=0.0015)["ci95"] is None


def test_accuracy_table_summarizes_finished_runs_only(tmp_path, capsys, load_script):
    """scripts/accuracy_table.py over run directories: finished runs counted, unfinished ones ignored."""
    table = load_script("accuracy_table")

    def write(framework, seed, acc, finished=True, model="lenet_a"):
        directory = tmp_path / model / framework / f"seed{seed}"
        directory.mkdir(parents=True)
        epochs = [{"epoch": e, "val_loss": 1.0 / e if e <= 3 else 0.5, "test_acc": acc, "seconds": 5.0}
                  for e in range(1, 6)]
        history = {"model": model, "framework": framework, "recipe": {"name": "tut003"}, "seed": seed,
                   "epochs": epochs, **({"test_acc": acc} if finished else {})}
        (directory / "history.json").write_text(json.dumps(history))

    write("tf", 0, 0.990)
    write("tf", 1, 0.992)
    write("torch", 0, 0.989)
    write("torch", 1, 0.991)
    write("torch", 2, 0.5, finished=False)
    write("tf", 0, 0.985, model="lenet_b")  # one framework finished so far: a row with "-" for the other
    write("torch", 0, 0.5, finished=False, model="lenet_b")
    assert table.main([str(tmp_path), "--json", str(tmp_path / "t.json")]) == 0
    row, single = json.loads((tmp_path / "t.json").read_text())
    assert row["torch"]["runs"] == [0.989, 0.991] and row["tf"]["seeds"] == [0, 1]
    assert row["tf"]["best_epoch"] == [3, 3]  # early-stopping recipe: the epoch of the lowest val_loss
    assert row["diff"] == pytest.approx(-0.001)
    assert single["tf"]["runs"] == [0.985] and "torch" not in single and single["diff"] is None
    out = capsys.readouterr().out
    assert "| `lenet_a` | tut003 | 98.82% | 99.10 ± 0.14% (2 seeds) | 99.00 ± 0.14% (2 seeds) |" in out
    assert "| `lenet_b` | tut003 | 97.76% | 98.50% (1 seed) | - | - | - (Lightning run not finished) | 3 of 5 / - |" in out


def test_epoch_curves_compares_the_frameworks_epoch_by_epoch_up_to_the_last_common_epoch(tmp_path, capsys,
                                                                                            load_script):
    """scripts/epoch_curves.py: per epoch, each framework's mean over its seeds and the Welch CI of the difference,
    only over the epochs every finished run reached; an unknown metric or a lone run is a clear error."""
    curves = load_script("epoch_curves")

    def write(framework, seed, accs, finished=True):
        directory = tmp_path / "lenet_d" / framework / f"seed{seed}"
        directory.mkdir(parents=True)
        epochs = [{"epoch": e + 1, "test_acc": acc, "val_loss": 1.0 - acc, "train_loss": 0.1, "seconds": 1.0}
                  for e, acc in enumerate(accs)]
        history = {"model": "lenet_d", "framework": framework, "recipe": {"name": "tut003"}, "seed": seed,
                   "epochs": epochs, **({"test_acc": accs[-1]} if finished else {})}
        (directory / "history.json").write_text(json.dumps(history))

    write("tf", 0, [0.980, 0.990, 0.991, 0.992])
    write("tf", 1, [0.982, 0.992, 0.993])
    write("torch", 0, [0.970, 0.990, 0.990, 0.990, 0.990])
    write("torch", 1, [0.972, 0.988, 0.992])
    write("torch", 2, [0.5], finished=False)  # not finished: not counted, and does not shorten the table
    plot = tmp_path / "curves.png"
    assert curves.main([str(tmp_path), "lenet_d", "--metrics", "test_acc,val_loss", "--plot", str(plot),
                        "--json", str(tmp_path / "c.json")]) == 0
    result = json.loads((tmp_path / "c.json").read_text())
    assert result["epochs"] == 3 and result["seeds"] == {"tf": [0, 1], "torch": [0, 1]}
    first = result["metrics"]["test_acc"][0]
    assert first["tf"]["mean"] == pytest.approx(0.981) and first["torch"]["mean"] == pytest.approx(0.971)
    assert first["diff"] == pytest.approx(-0.010)
    # Welch with equal stds 0.001414 and n = 2: se = 0.001414, df = 2, t = 4.303
    assert first["ci95"] == pytest.approx([-0.010 - 4.303 * 0.001414, -0.010 + 4.303 * 0.001414], abs=1e-5)
    assert result["metrics"]["val_loss"][1]["diff"] == pytest.approx(0.002)
    out = capsys.readouterr().out
    assert "| 1 | 98.10 ± 0.14 | 97.10 ± 0.14 | -1.00 [-1.61, -0.39] |" in out
    assert "| 4 |" not in out
    assert plot.stat().st_size > 0
    assert curves.main([str(tmp_path), "lenet_d", "--epochs", "2", "--json", str(tmp_path / "c2.json")]) == 0
    assert json.loads((tmp_path / "c2.json").read_text())["epochs"] == 2
    with pytest.raises(SystemExit, match="unknown metric 'val_acc'.*choose from: test_acc, train_loss, val_loss"):
        curves.main([str(tmp_path), "lenet_d", "--metrics", "val_acc"])
    with pytest.raises(SystemExit, match="0 finished tf run"):
        curves.main([str(tmp_path), "lenet_a"])


def test_same_init_run_summary_pairs_each_seeds_two_frameworks(tmp_path, capsys, load_script):
    """scripts/same_init_run.py --summary: the mean of the per-seed differences (port - TF) and its paired t CI."""
    same_init = load_script("same_init_run")
    lines = []
    for seed, (tf_acc, torch_acc) in enumerate([(0.990, 0.985), (0.980, 0.977), (0.970, 0.966)]):
        rows = {fw: [{"epoch": 1, "train_loss": 0.2, "val_loss": 1.0 - acc, "val_acc": acc, "test_acc": acc}]
                for fw, acc in (("tf", tf_acc), ("torch", torch_acc))}
        lines.append(json.dumps({"model": "lenet_d", "seed": seed, **rows}))
    path = tmp_path / "paired.jsonl"
    path.write_text("\n".join(lines) + "\n")
    assert same_init.main(["--summary", str(path)]) == 0
    out = capsys.readouterr().out
    # paired diffs -0.5, -0.3, -0.4 points: mean -0.40, sd 0.10, t(2) 4.303 -> half width 0.248
    assert ("| `lenet_d`, init torch, order torch | 1 | 3 | 0.2000, 0.2000, +0.0000 [+0.0000, +0.0000] | 0.0200, 0.0240, "
            "+0.0040 [+0.0015, +0.0065] | 98.00, 97.60, -0.40 [-0.65, -0.15] |" in out)
    assert same_init.main(["--summary"]) == 2


@pytest.mark.tf
@pytest.mark.parametrize("start, order", [("torch", "torch"), ("tf", "tf")])
def test_same_init_run_epochs_trains_both_frameworks_from_one_point(tf, tmp_path, capsys, load_script, start, order):
    """scripts/same_init_run.py --epochs: both frameworks start from one initialization (the port's or TF's seed-S
    one) and take the same batches (the port's or TF's order), so after 2 epochs of 3 float32 steps they are still
    rounding apart (the runs part only after 10-60 steps: RESULTS.md), and the JSON line records both."""
    same_init = load_script("same_init_run")
    path = tmp_path / "paired.jsonl"
    assert same_init.main(["lenet_a", "--seed", "3", "--epochs", "2", "--limit-train", "96", "--start", start,
                           "--order", order, "--json", str(path)]) == 0
    run = json.loads(path.read_text())
    assert (run["model"], run["seed"], run["start"], run["order"]) == ("lenet_a", 3, start, order)
    assert [row["epoch"] for row in run["tf"]] == [row["epoch"] for row in run["torch"]] == [1, 2]
    for tf_row, torch_row in zip(run["tf"], run["torch"]):
        for metric in ("train_loss", "val_loss"):
            assert torch_row[metric] == pytest.approx(tf_row[metric], rel=1e-4), metric
        # the accuracies count argmaxes over 5,000 images: a logit tie broken by rounding may move one image
        for metric in ("val_acc", "test_acc"):
            assert torch_row[metric] == pytest.approx(tf_row[metric], abs=2 / 5000), metric
    # six updates of RMSprop on raw pixels move the model: a start that was not shared could not agree as above
    assert run["tf"][1]["train_loss"] < run["tf"][0]["train_loss"]
    assert same_init.main(["--summary", str(path)]) == 0
    assert f"| `lenet_a`, init {start}, order {order} | 2 | 1 |" in capsys.readouterr().out


def test_crosscheck_batches_start_at_the_first_batch_asked_for():
    from parity.crosscheck import BATCH, _batches

    mnist = {"x_train": np.arange(10 * BATCH * 4, dtype=np.uint8).reshape(-1, 2, 2) % 251,
             "y_train": np.arange(10 * BATCH) % 10}
    first, later = _batches(mnist, 255.0, 3), _batches(mnist, 255.0, 3, first_batch=4)
    assert len(first) == len(later) == 3 and later[0][0].shape == (BATCH, 2, 2, 1)
    np.testing.assert_array_equal(later[0][1], mnist["y_train"][4 * BATCH:5 * BATCH])
    np.testing.assert_array_equal(later[2][0][..., 0], mnist["x_train"][6 * BATCH:7 * BATCH] / np.float32(255.0))
    np.testing.assert_array_equal(first[1][1], mnist["y_train"][BATCH:2 * BATCH])


@pytest.mark.tf
def test_float32_drift_runs_each_window_on_its_own_batches(tf, tmp_path, capsys, load_script):
    """scripts/float32_drift.py on a tiny budget: one row per window (the windows' batches: the test above), both
    frameworks' first step within float32 rounding of each other, and the summary line."""
    drift = load_script("float32_drift")
    path = tmp_path / "drift.json"
    assert drift.main(["--model", "cnn", "--steps", "2", "--windows", "2", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["windows"]
    assert [row["window"] for row in rows] == [0, 1]
    for row in rows:
        assert 0 < row["first_step_param_diff"] < 1e-5 and row["parted_at"] in (0, 1, 2)
    assert "parted (> 1e-05 relative) within 2 steps in" in capsys.readouterr().out


def test_full_length_runs_skips_finished_and_resumes_interrupted_runs(tmp_path):
    """scripts/full_length_runs.sh with a stand-in `parity` that records its arguments: a finished run is skipped,
    an interrupted one resumed (both frameworks, every loop), a missing one started."""
    import os
    import pathlib
    import subprocess

    script = pathlib.Path(__file__).parent.parent / "scripts" / "full_length_runs.sh"
    calls = tmp_path / "calls.txt"
    stub = tmp_path / "parity"
    stub.write_text(f'#!/usr/bin/env bash\necho "$*" >> {calls}\n')
    stub.chmod(0o755)
    out = tmp_path / "runs"

    def write(model, framework, finished):
        directory = out / model / framework / "seed0"
        directory.mkdir(parents=True)
        history = {"epochs": [{"epoch": 1}], **({"test_acc": 0.99} if finished else {})}
        (directory / "history.json").write_text(json.dumps(history))

    write("lenet_a", "tf", finished=False)
    write("lenet_a", "torch", finished=False)
    write("cnn", "tf", finished=True)
    write("cnn", "torch", finished=False)
    result = subprocess.run(["bash", str(script), str(out), "0 1", "lenet_a", "cnn"], env={"PARITY": str(stub),
                            "PATH": os.environ["PATH"]}, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    common = f"--out {out} --no-progress"
    assert calls.read_text().splitlines() == [
        f"train lenet_a --framework tf --seed 0 {common} --resume",
        f"train lenet_a --framework torch --seed 0 {common} --resume",
        f"train lenet_a --framework tf --seed 1 {common}",
        f"train lenet_a --framework torch --seed 1 {common}",
        f"train cnn --framework torch --seed 0 {common} --resume",
        f"train cnn --framework tf --seed 1 {common}",
        f"train cnn --framework torch --seed 1 {common}",
    ]
    assert "skip cnn tf seed 0 (finished)" in result.stdout


def test_accuracy_row_shows_a_spread_only_for_several_seeds():
    from parity.compare import table_rows

    def row(tf_runs, torch_runs):
        stats = {k: {"mean": float(np.mean(r)), "std": float(np.std(r, ddof=1)) if len(r) > 1 else 0.0, "runs": r}
                 for k, r in (("tf", tf_runs), ("torch", torch_runs))}
        accuracy = {"pass": True, **stats, "seeds": len(tf_runs), "epochs": 1, "diff": 0.0, "ci95": None,
                    "margin": 0.005, "seconds_per_epoch": {"tf": 1.0, "torch": 1.0}}
        return table_rows({"levels": {"accuracy": accuracy}})[0][2]

    assert row([0.9866], [0.9818]).startswith("tf 98.66%, torch 98.18% (1 seed(s)")
    assert row([0.985, 0.987], [0.983, 0.985]).startswith("tf 98.60±0.14%, torch 98.40±0.14% (2 seed(s)")


def test_structure_level_names_a_shape_mismatch(tf, monkeypatch):
    """A torch layer whose output shape differs from its TF twin fails level 1 and is named, in the JSON and in the
    printed table."""
    import torch_impl.summary
    from parity.compare import level_structure, table_rows

    real = torch_impl.summary.summarize

    def wrong_pool(name):
        summary = real(name)
        summary["layers"][1]["output_shape"] = [13, 13, 8]  # e.g. PyTorch's 'valid' pooling where TF pads
        return summary

    monkeypatch.setattr(torch_impl.summary, "summarize", wrong_pool)
    result = level_structure("lenet_c")
    assert result["pass"] is False
    assert "pool1: shape tf [7, 7, 8] vs torch [13, 13, 8]" in result["problems"]
    level, verdict, numbers = table_rows({"levels": {"structure": result}})[0]
    assert verdict == "FAIL" and "'pool1', (13, 13, 8)" in numbers and "(+1 more)" in numbers, numbers


def test_forward_row_names_the_first_diverging_layer():
    from parity.compare import table_rows

    forward = {"pass": False, "max_abs_diff": {"tf_to_torch": 3e-3, "torch_to_tf": 1e-7},
               "first_divergence": {"tf_to_torch": ["conv2", 3e-3, 1e-5], "torch_to_tf": None}}
    level, verdict, numbers = table_rows({"levels": {"forward": forward}})[0]
    assert verdict == "FAIL" and "first diverging layer (tf_to_torch) 'conv2': 3.00e-03 > 1.00e-05" in numbers
    assert "torch_to_tf)" not in numbers
    forward.update({"pass": True, "first_divergence": {"tf_to_torch": None, "torch_to_tf": None}})
    assert "diverging" not in table_rows({"levels": {"forward": forward}})[0][2]


def test_train_step_level_steps_the_recipes_schedule(monkeypatch):
    """Level 3 in `parity compare` runs a recipe's learning-rate schedule (halving every 10 updates) and runs
    constant-rate recipes without one."""
    import parity.crosscheck
    from parity.compare import level_train_step

    calls = []

    def fake_run_both(name, steps, members=1, decay_steps=None, dtype="float32"):
        calls.append((name, members, decay_steps, dtype))
        return np.ones(steps), np.ones(steps), 0.0

    monkeypatch.setattr(parity.crosscheck, "run_both", fake_run_both)
    assert level_train_step("bn_cnn", 5)["lr_halved_every"] == 10
    assert level_train_step("cnn_ensemble3", 5)["lr_halved_every"] is None
    assert calls == [("bn_cnn", 1, 10, "float64"), ("bn_cnn", 1, 10, "float32"),
                     ("cnn_ensemble3", 2, None, "float64"), ("cnn_ensemble3", 2, None, "float32")]
