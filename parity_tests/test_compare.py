"""`parity compare`: the documented JSON format, the report files, and a non-zero exit status on a failing level."""

from __future__ import annotations

import json

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
    assert set(levels["forward"]["max_abs_diff"]) == {"tf_to_torch", "torch_to_tf"}
    assert levels["forward"]["pass"] is True and max(levels["forward"]["max_abs_diff"].values()) <= 1e-3
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
