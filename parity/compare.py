"""`parity compare MODEL`: run the levels of equivalence between the TF reference and the Lightning port, print a
table, write a report directory (Markdown + PNG plots) and, with --json, the numbers in this format:

    {"model": str, "versions": {...}, "levels": {
        "structure":  {"pass", "params": {"tf", "torch"}, "per_layer": [{"name", "tf_type", "torch_type",
                       "tf_shape", "torch_shape", "tf_params", "torch_params"}], "problems": [...]},
        "forward":    {"pass", "max_abs_diff": {"tf_to_torch", "torch_to_tf", "onnxruntime"}, "per_layer": {...},
                       "max_abs_diff_float64": {"tf_to_torch", "torch_to_tf"},
                       "onnxruntime": {"status", "pass", "vs_torch", "vs_tf", "opset"}},
        "train_step": {"pass", "max_param_diff", "float64_max_rel_loss_diff", "float32_max_rel_loss_diff",
                       "steps"},
        "accuracy":   {"pass", "tf": {"mean", "std", "runs"}, "torch": {...}, "diff", "ci95", "margin", "min_acc",
                       "epochs", "seconds_per_epoch": {"tf", "torch"}}}}

Only the levels that were run appear. The exit status is non-zero when a level fails.

Units: accuracies (`mean`, `std`, `runs`), `diff` (Lightning minus TF), `ci95` and `margin` are fractions: 0.9866 is
98.66%, and `--margin 0.5` (points) is written 0.005. Forward differences are absolute (the level's tolerance is
relative to each activation's magnitude above 1, as `tolerance` says); `first_divergence` is [layer, diff, limit]
or null per direction; loss differences are relative; `seconds_per_epoch` is the median over all epochs of all runs.

The forward level's third column runs the torch model (the tf_to_torch one) exported to ONNX in ONNX Runtime:
`max_abs_diff.onnxruntime` is the larger of its differences from torch (logits) and from TF (the model's output as
the tutorial defines it: probabilities for the softmax models); it counts towards the level's pass when onnx and
onnxruntime are installed, and is null with `onnxruntime.status` "not installed" otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np

LEVELS = ("structure", "forward", "train_step", "accuracy")


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import lightning
    import tensorflow as tf
    import torch

    try:
        onnxruntime = version("onnxruntime")
    except PackageNotFoundError:
        onnxruntime = "not installed"
    return {"python": platform.python_version(), "torch": torch.__version__, "lightning": lightning.__version__,
            "tensorflow": tf.__version__, "onnxruntime": onnxruntime, "numpy": np.__version__,
            "machine": platform.machine(), "cpu_threads": torch.get_num_threads()}


def level_structure(name: str) -> dict:
    from parity.summary import check_against_catalog
    from tf_ref.summary import summarize as tf_summary
    from torch_impl.summary import summarize as torch_summary

    a, b = tf_summary(name), torch_summary(name)
    problems = [f"tf: {p}" for p in check_against_catalog(a)] + [f"torch: {p}" for p in check_against_catalog(b)]
    per_layer = [{"name": la["name"], "tf_type": la["type"], "torch_type": lb["type"],
                  "tf_shape": la["output_shape"], "torch_shape": lb["output_shape"],
                  "tf_params": la["params"], "torch_params": lb["params"]}
                 for la, lb in zip(a["layers"], b["layers"])]
    if [la["name"] for la in a["layers"]] != [lb["name"] for lb in b["layers"]]:
        problems.append(f"layer lists differ: tf {[la['name'] for la in a['layers']]}, "
                        f"torch {[lb['name'] for lb in b['layers']]}")
    problems += [f"{row['name']}: shape tf {row['tf_shape']} vs torch {row['torch_shape']}" for row in per_layer
                 if row["tf_shape"] != row["torch_shape"]]
    return {"pass": not problems, "params": {"tf": a["total_params"], "torch": b["total_params"]},
            "layers": len(a["layers"]), "per_layer": per_layer, "problems": problems}


def level_forward(name: str, x: np.ndarray, atol: float = 1e-5, atol_float64: float = 1e-10) -> dict:
    from parity.crosscheck import first_divergence, forward_diffs

    out = {"max_abs_diff": {}, "per_layer": {}, "first_divergence": {}}
    ok = True
    for direction in ("tf_to_torch", "torch_to_tf"):
        result = forward_diffs(name, direction, x)
        layers = result["layers"]
        out["per_layer"][direction] = {k: v[0] for k, v in layers.items()}
        out["max_abs_diff"][direction] = max(v[0] for v in layers.values())
        divergence = first_divergence(layers, atol)
        out["first_divergence"][direction] = divergence and list(divergence)
        ok &= divergence is None
    # float64: both frameworks have float64 kernels for every op in the catalog, so what is left is rounding
    # (~1e-16 relative); 1e-10 absolute would catch any difference in what is computed
    out["max_abs_diff_float64"] = {}
    for direction in ("tf_to_torch", "torch_to_tf"):
        layers = forward_diffs(name, direction, x, dtype="float64")["layers"]
        out["max_abs_diff_float64"][direction] = max(v[0] for v in layers.values())
        ok &= out["max_abs_diff_float64"][direction] <= atol_float64
    onnx = level_onnxruntime(name, x, atol)
    out["onnxruntime"] = onnx
    out["max_abs_diff"]["onnxruntime"] = max(onnx["vs_torch"], onnx["vs_tf"]) if onnx["status"] == "ok" else None
    if onnx["status"] != "not installed":
        ok &= onnx["pass"]
    out["pass"] = bool(ok)
    out["tolerance"] = f"{atol} x max(1, |activation|max) per layer; float64: {atol_float64} absolute"
    return out


def level_onnxruntime(name: str, x: np.ndarray, atol: float = 1e-5) -> dict:
    """The torch model with TF's weights (the tf_to_torch pair of `forward_diffs`: same seeds) exported to ONNX and
    run in ONNX Runtime: its logits vs torch's, and its output (softmax applied where the tutorial's model has one;
    NHWC for a feature map) vs TF's."""
    import tempfile

    import torch

    from parity.catalog import get_spec
    from parity.interchange import tf_to_torch
    from tf_ref.models import build_model as build_tf
    from tf_ref.weights import get_weights as tf_get
    from torch_impl.export import DEFAULT_OPSET, Logits, export_onnx, onnxruntime_available, run_onnx
    from torch_impl.models import build_model as build_torch
    from torch_impl.weights import set_weights as torch_set

    if not onnxruntime_available():
        return {"status": "not installed", "pass": None, "vs_torch": None, "vs_tf": None}
    tf_model, torch_model = build_tf(name, seed=1), build_torch(name, seed=2).eval()
    torch_set(torch_model, tf_to_torch(name, tf_get(tf_model)))
    x_nchw = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = export_onnx(torch_model, Path(tmp) / f"{name}.onnx", model_name=name)
            ort_out = run_onnx(path, x_nchw)
    except Exception as error:  # noqa: BLE001  (an export or runtime failure is this column's result, not a crash)
        return {"status": f"error: {type(error).__name__}: {error}", "pass": False, "vs_torch": None, "vs_tf": None}
    with torch.no_grad():
        torch_out = Logits(torch_model)(torch.from_numpy(x_nchw)).numpy()
    tf_out = np.asarray(tf_model(x, training=False))
    output = get_spec(name).output
    as_tf = ort_out
    if output == "softmax":
        shifted = np.exp(ort_out - ort_out.max(-1, keepdims=True))
        as_tf = shifted / shifted.sum(-1, keepdims=True)
    elif ort_out.ndim == 4:
        as_tf = ort_out.transpose(0, 2, 3, 1)
    vs_torch = float(np.abs(ort_out - torch_out).max())
    vs_tf = float(np.abs(as_tf - tf_out).max())
    passed = (vs_torch <= atol * max(1.0, float(np.abs(torch_out).max()))
              and vs_tf <= atol * max(1.0, float(np.abs(tf_out).max())))
    return {"status": "ok", "pass": bool(passed), "vs_torch": vs_torch, "vs_tf": vs_tf, "opset": DEFAULT_OPSET}


def level_train_step(name: str, steps: int = 50) -> dict:
    from parity.catalog import get_spec, recipe_for
    from parity.crosscheck import run_both

    spec = get_spec(name)
    members = 2 if spec.members > 1 else 1
    # a recipe with a learning-rate schedule has it stepped within the run: the staircase halves the rate every 10
    # updates (its real period, thousands of updates, would never be reached in 50)
    decay_steps = 10 if spec.recipe and recipe_for(name).lr_decay_rate is not None else None
    tf64, torch64, step64 = run_both(name, steps, members=members, decay_steps=decay_steps, dtype="float64")
    tf32, torch32, step32 = run_both(name, steps, members=members, decay_steps=decay_steps, dtype="float32")
    rel64 = float((np.abs(tf64 - torch64) / np.abs(tf64)).max())
    rel32 = np.abs(tf32 - torch32) / np.abs(tf32)
    return {
        "pass": bool(step64 <= 1e-10 and rel64 <= 1e-9),
        "max_param_diff": step64,
        "max_param_diff_float32": step32,
        "float64_max_rel_loss_diff": rel64,
        "float32_max_rel_loss_diff": float(rel32.max()),
        "float32_rel_loss_diff_first10": float(rel32[:10].max()),
        "steps": steps,
        "lr_halved_every": decay_steps,
        "criteria": "float64: parameters within 1e-10 after one step, losses within 1e-9 relative over all steps",
        "curves": {"tf_float32": tf32.tolist(), "torch_float32": torch32.tolist()},
    }


def _mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.array(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def t_quantile_975(df: float) -> float:
    """The 97.5% quantile of Student's t with df degrees of freedom (a two-sided 95% interval's factor)."""
    from scipy import stats

    return float(stats.t.ppf(0.975, df)) if df > 0 else float("nan")


def accuracy_equivalence(acc_tf: list[float], acc_torch: list[float], margin: float,
                         min_acc: float | None = None) -> dict:
    """Test accuracies of independent runs per framework -> mean, std, difference (torch - tf), Welch 95% CI.

    "Comparable" = the difference of the means is within `margin`, and with 2+ runs per framework the Welch 95%
    confidence interval of the difference also lies inside [-margin, margin] (two one-sided tests). With one run per
    framework there is no interval and only the difference is tested. `min_acc`: also require each framework's mean
    to reach it (two equally broken frameworks would otherwise pass).
    """
    (mean_tf, std_tf), (mean_torch, std_torch) = _mean_std(acc_tf), _mean_std(acc_torch)
    n_tf, n_torch = len(acc_tf), len(acc_torch)
    diff = mean_torch - mean_tf
    ci = None
    if n_tf > 1 and n_torch > 1:
        a, b = std_tf**2 / n_tf, std_torch**2 / n_torch
        se = math.sqrt(a + b)
        df = (a + b) ** 2 / (a**2 / (n_tf - 1) + b**2 / (n_torch - 1)) if se > 0 else min(n_tf, n_torch) - 1
        half = t_quantile_975(df) * se
        ci = [diff - half, diff + half]
    passed = abs(diff) <= margin and (ci is None or (ci[0] >= -margin and ci[1] <= margin))
    if min_acc is not None:
        passed = passed and mean_tf >= min_acc and mean_torch >= min_acc
    return {"pass": bool(passed), "tf": {"mean": mean_tf, "std": std_tf, "runs": list(acc_tf)},
            "torch": {"mean": mean_torch, "std": std_torch, "runs": list(acc_torch)},
            "diff": diff, "ci95": ci, "margin": margin, "min_acc": min_acc}


def level_accuracy(name: str, epochs: int, seeds: int, out_dir: Path, margin: float, progress: bool,
                   limit_train: int | None = None, min_acc: float | None = None) -> tuple[dict, dict]:
    """Train each framework from its own random init over `seeds` seeds; compare test accuracy statistically.

    "Comparable" = the difference of the means is within `margin` (fraction), and with 2+ seeds per framework the
    Welch 95% confidence interval of the difference also lies inside [-margin, margin] (two one-sided tests).
    """
    from parity.catalog import recipe_for
    from tf_ref.train import train as train_tf
    from torch_impl.train import train as train_torch

    recipe = recipe_for(name).replace(epochs=epochs)
    runs = {"tf": [], "torch": []}
    artifacts = {}
    for seed in range(seeds):
        for framework, train in (("tf", train_tf), ("torch", train_torch)):
            history = train(name, recipe, seed=seed, out=out_dir / "runs", progress=progress, limit_train=limit_train)
            runs[framework].append(history)
            if seed == 0:
                artifacts[framework] = history
    acc = {fw: [h["test_acc"] for h in hs] for fw, hs in runs.items()}
    stats = accuracy_equivalence(acc["tf"], acc["torch"], margin, min_acc)

    def sec_per_epoch(histories):
        return float(np.median([row["seconds"] for h in histories for row in h["epochs"]]))

    result = {
        **stats, "epochs": epochs, "seeds": seeds, "recipe": recipe.name,
        "seconds_per_epoch": {"tf": sec_per_epoch(runs["tf"]), "torch": sec_per_epoch(runs["torch"])},
    }
    return result, artifacts


# ------------------------------------------------------------------------------------------ report
def _predictions(name: str, artifacts: dict, x_test_uint8: np.ndarray, scale: float) -> dict[str, np.ndarray]:
    import tensorflow as tf
    import torch

    x = x_test_uint8.astype(np.float32) / np.float32(scale)
    preds = {}
    members = artifacts["tf"]["models"]
    logits = sum(np.concatenate([m(tf.constant(x[i:i + 1000, ..., None]), training=False).numpy()
                                 for i in range(0, len(x), 1000)]) for m in members)
    preds["tf"] = logits.argmax(-1)
    module = artifacts["torch"]["models"][0].eval()
    with torch.no_grad():
        xt = torch.from_numpy(x).unsqueeze(1)
        preds["torch"] = np.concatenate([module(xt[i:i + 1000]).argmax(-1).numpy() for i in range(0, len(x), 1000)])
    return preds


def write_report(name: str, result: dict, out: Path, artifacts: dict | None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    levels = result["levels"]
    lines = [f"# TF reference vs Lightning port: `{name}`", "",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()), "",
             "| level | result | numbers |", "|---|---|---|"]
    lines += [f"| {row[0]} | {row[1]} | {row[2]} |" for row in table_rows(result)]
    images = []

    if "structure" in levels and levels["structure"].get("per_layer"):
        lines += ["", "## Layers (output shapes in TF's (H, W, C) order)", "",
                  "| layer | TF layer | torch module | TF shape | torch shape | TF params | torch params |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['name']} | {r['tf_type']} | {r['torch_type']} | {tuple(r['tf_shape'])} | "
                  f"{tuple(r['torch_shape'])} | {r['tf_params']:,} | {r['torch_params']:,} |"
                  for r in levels["structure"]["per_layer"]]

    if "forward" in levels:
        fig, ax = plt.subplots(figsize=(9, 4))
        for direction, per_layer in levels["forward"]["per_layer"].items():
            values = [max(v, 1e-12) for v in per_layer.values()]
            ax.semilogy(list(per_layer), values, marker="o", label=direction)
        ax.axhline(1e-5, color="red", linestyle="--", label="tolerance 1e-5")
        ax.set_ylabel("max |tf - torch| (zeros drawn at 1e-12)")
        ax.set_title(f"{name}: per-layer forward difference after weight transfer")
        ax.tick_params(axis="x", rotation=45)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "forward_per_layer.png", dpi=100)
        plt.close(fig)
        images.append(("Per-layer forward differences", "forward_per_layer.png"))

    if "train_step" in levels:
        curves = levels["train_step"]["curves"]
        fig, ax = plt.subplots(figsize=(8, 4))
        ax.plot(curves["tf_float32"], label="TensorFlow")
        ax.plot(curves["torch_float32"], "--", label="Lightning port")
        ax.set_xlabel("update")
        ax.set_ylabel("training loss")
        ax.set_title(f"{name}: same weights, same batches, float32")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "train_step_curves.png", dpi=100)
        plt.close(fig)
        images.append(("Training-step equivalence (float32 loss curves)", "train_step_curves.png"))

    if artifacts:
        from parity.catalog import recipe_for
        from parity.data import load_split

        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for framework, style in (("tf", "-"), ("torch", "--")):
            rows = artifacts[framework]["epochs"]
            epochs = [r["epoch"] for r in rows]
            for key in ("train_loss", "test_loss"):
                axes[0].plot(epochs, [r.get(key, np.nan) for r in rows], style, marker="o", label=f"{framework} {key}")
            for key in ("train_acc", "test_acc"):
                axes[1].plot(epochs, [r.get(key, np.nan) for r in rows], style, marker="o", label=f"{framework} {key}")
        axes[0].set_title("loss")
        axes[1].set_title("accuracy")
        for ax in axes:
            ax.set_xlabel("epoch")
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "curves.png", dpi=100)
        plt.close(fig)
        images.append(("Loss and accuracy, TF (solid) and Lightning (dashed), seed 0", "curves.png"))

        recipe = recipe_for(name)
        split = load_split(recipe.dataset, recipe.split)
        preds = _predictions(name, artifacts, split.x_test, recipe.scale)
        y = split.y_test.astype(int)
        fig, axes = plt.subplots(1, 2, figsize=(11, 5))
        for ax, framework in zip(axes, ("tf", "torch")):
            matrix = np.zeros((10, 10), dtype=int)
            np.add.at(matrix, (y, preds[framework]), 1)
            ax.imshow(np.log1p(matrix), cmap="Blues")
            for i in range(10):
                for j in range(10):
                    ax.text(j, i, matrix[i, j], ha="center", va="center", fontsize=7)
            ax.set_title(f"{framework}: confusion (accuracy {(preds[framework] == y).mean():.4f})")
            ax.set_xlabel("predicted")
            ax.set_ylabel("true")
        fig.tight_layout()
        fig.savefig(out / "confusion.png", dpi=100)
        plt.close(fig)
        images.append(("Confusion matrices on the test set", "confusion.png"))

        wrong = np.flatnonzero(preds["torch"] != y)[:40]
        if len(wrong):
            cols = 10
            n_rows = math.ceil(len(wrong) / cols)
            fig, axes = plt.subplots(n_rows, cols, figsize=(12, 1.4 * n_rows))
            for ax in np.atleast_1d(axes).ravel():
                ax.axis("off")
            for ax, i in zip(np.atleast_1d(axes).ravel(), wrong):
                ax.imshow(split.x_test[i], cmap="gray")
                ax.set_title(f"{y[i]}->{preds['torch'][i]} (tf {preds['tf'][i]})", fontsize=7)
            fig.suptitle("Misclassified by the Lightning port: true->predicted (TF's prediction)")
            fig.tight_layout()
            fig.savefig(out / "misclassified.png", dpi=100)
            plt.close(fig)
            images.append(("Misclassified test images", "misclassified.png"))
        both_wrong = int(((preds["tf"] != y) & (preds["torch"] != y)).sum())
        lines += ["", (f"Test errors: TF {int((preds['tf'] != y).sum())}, "
                       f"Lightning {int((preds['torch'] != y).sum())}, both wrong on the same image {both_wrong}. "
                       f"TensorBoard logs of both frameworks, same tags: `tensorboard --logdir {out / 'runs'}`.")]
    for title, file in images:
        lines += ["", f"## {title}", "", f"![{title}]({file})"]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def table_rows(result: dict) -> list[tuple[str, str, str]]:
    levels, rows = result["levels"], []
    verdict = lambda ok: "PASS" if ok else "FAIL"
    if "structure" in levels:
        s = levels["structure"]
        if s["pass"]:
            shapes = f"{s['layers']} layers' shapes equal the catalog"
        else:  # what a failure is about, first: the rest is in the JSON and the report
            more = f" (+{len(s['problems']) - 1} more)" if len(s["problems"]) > 1 else ""
            shapes = f"{s['problems'][0]}{more}"
        rows.append(("1 structure", verdict(s["pass"]),
                     f"params tf {s['params']['tf']:,} / torch {s['params']['torch']:,}; {shapes}"))
    if "forward" in levels:
        f = levels["forward"]["max_abs_diff"]
        onnx = levels["forward"].get("onnxruntime", {"status": "not run"})
        if onnx["status"] == "ok":
            column = (f"onnxruntime {f['onnxruntime']:.2e} (vs torch {onnx['vs_torch']:.2e}, "
                      f"vs tf {onnx['vs_tf']:.2e}){'' if onnx['pass'] else ' FAIL'}")
        else:
            column = f"onnxruntime {onnx['status']}"
        diverging = "".join(f"; first diverging layer ({direction}) {d[0]!r}: {d[1]:.2e} > {d[2]:.2e}"
                            for direction, d in levels["forward"].get("first_divergence", {}).items() if d)
        rows.append(("2 forward", verdict(levels["forward"]["pass"]),
                     (f"max abs diff tf->torch {f['tf_to_torch']:.2e}, torch->tf {f['torch_to_tf']:.2e}"
                      f"{_float64_column(levels['forward'])}, {column}{diverging}")))
    if "train_step" in levels:
        t = levels["train_step"]
        rows.append(("3 train step", verdict(t["pass"]),
                     (f"float64: params {t['max_param_diff']:.1e} after 1 step, "
                      f"loss rel {t['float64_max_rel_loss_diff']:.1e}"
                      f" over {t['steps']} steps; float32 drift {t['float32_max_rel_loss_diff']:.1e}")))
    if "accuracy" in levels:
        a = levels["accuracy"]
        ci = f", 95% CI of diff [{a['ci95'][0] * 100:+.3f}, {a['ci95'][1] * 100:+.3f}] pts" if a["ci95"] else ""
        rows.append(("4 accuracy", verdict(a["pass"]),
                     (f"tf {_percent(a['tf'])}, torch {_percent(a['torch'])} "
                      f"({a['seeds']} seed(s), {a['epochs']} epoch(s)); diff "
                      f"{a['diff'] * 100:+.2f} pts, margin ±{a['margin'] * 100:.2f}{ci}"
                      f"{_floor(a)}; s/epoch tf "
                      f"{a['seconds_per_epoch']['tf']:.1f}, torch {a['seconds_per_epoch']['torch']:.1f}")))
    return rows


def _floor(accuracy: dict) -> str:
    return f", floor {accuracy['min_acc'] * 100:.2f}%" if accuracy.get("min_acc") is not None else ""


def _percent(stats: dict) -> str:
    """"98.66%" for one run (no spread to show), "98.66±0.12%" for several."""
    spread = f"±{stats['std'] * 100:.2f}" if len(stats.get("runs", ())) > 1 else ""
    return f"{stats['mean'] * 100:.2f}{spread}%"


def _float64_column(forward: dict) -> str:
    f64 = forward.get("max_abs_diff_float64")
    return f" (float64: {f64['tf_to_torch']:.1e}, {f64['torch_to_tf']:.1e})" if f64 else ""


def run_compare(name: str, levels=LEVELS, epochs: int = 1, seeds: int = 1, out: Path | None = None,
                margin: float = 0.005, progress: bool = True, limit_train: int | None = None,
                train_steps: int = 50, min_acc: float | None = None) -> dict:
    import parity.crosscheck  # noqa: F401  (torch before TensorFlow)
    from parity.catalog import get_spec, recipe_for
    from parity.data import load_arrays

    spec = get_spec(name)
    out = Path(out or f"reports/{name}")
    result = {"model": name, "versions": _versions(), "levels": {}}
    artifacts = None
    for level in levels:
        t0 = time.perf_counter()
        print(f"[{level}] running ...", flush=True)
        if level == "structure":
            result["levels"]["structure"] = level_structure(name)
        elif level == "forward":
            if spec.input_shape == (28, 28, 1):
                x_test = load_arrays("mnist")["x_test"][:256]
                x = (x_test.astype(np.float32) / np.float32(recipe_for(name).scale))[..., None]
            else:
                x = np.random.default_rng(0).random((8, *spec.input_shape), dtype=np.float32)
            result["levels"]["forward"] = level_forward(name, x)
        elif level == "train_step":
            result["levels"]["train_step"] = level_train_step(name, train_steps)
        elif level == "accuracy":
            if not spec.recipe:
                continue
            result["levels"]["accuracy"], artifacts = level_accuracy(
                name, epochs, seeds, out, margin, progress, limit_train=limit_train, min_acc=min_acc)
        else:
            raise ValueError(f"unknown level {level!r}; choose from {', '.join(LEVELS)}")
        print(f"[{level}] done in {time.perf_counter() - t0:.1f} s", flush=True)
    report = write_report(name, result, out, artifacts)
    result["report"] = str(report)
    return result


def print_table(result: dict) -> None:
    rows = table_rows(result)
    width = max(len(r[0]) for r in rows)
    print(f"\nparity compare {result['model']}")
    for level, verdict, numbers in rows:
        print(f"  {level.ljust(width)}  {verdict}  {numbers}")
    print(f"report: {result['report']}")


def cmd_compare(args) -> int:
    levels = tuple(s.strip() for s in args.levels.split(",")) if args.levels else LEVELS
    unknown = [lv for lv in levels if lv not in LEVELS]
    if unknown:
        raise ValueError(f"unknown level(s) {unknown}; choose from {', '.join(LEVELS)}")
    result = run_compare(args.model, levels, epochs=args.epochs, seeds=args.seeds, out=args.out,
                         margin=args.margin / 100, progress=not args.no_progress, limit_train=args.limit_train,
                         train_steps=args.train_steps,
                         min_acc=None if args.min_acc is None else args.min_acc / 100)
    print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"json: {args.json}")
    return 0 if all(level["pass"] for level in result["levels"].values()) else 1


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except where there is none to show (None: the help says what happens)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def add_compare_parser(sub) -> None:
    from parity.catalog import MODEL_NAMES

    p = sub.add_parser(
        "compare", help="prove the TF reference and the Lightning port agree (4 levels), with a report",
        description="Levels: 1 structure (shapes, params), 2 forward (weights transferred both ways, every layer "
                    "within 1e-5 in float32, 1e-10 in float64), 3 train_step (same weights and batches: float64 "
                    "within 1e-10/1e-9, float32 "
                    "drift reported), 4 accuracy (each framework from its own init, K seeds, equivalence margin). "
                    "Writes OUT/report.md with plots; exit status 1 if a level fails.",
        formatter_class=HelpFormatter)
    p.add_argument("model", choices=MODEL_NAMES, metavar="MODEL", help=f"one of: {', '.join(MODEL_NAMES)}")
    p.add_argument("--levels", default=",".join(LEVELS), help="comma-separated subset of the levels")
    p.add_argument("--epochs", type=int, default=1,
                   help="epochs per accuracy run (the short form; the recipes' full lengths are in README.md)")
    p.add_argument("--seeds", type=int, default=1, help="seeds per framework for the accuracy level")
    p.add_argument("--margin", type=float, default=0.5, help="equivalence margin in accuracy points")
    p.add_argument("--min-acc", type=float, metavar="PERCENT",
                   help="the accuracy level also requires each framework's mean test accuracy to reach this "
                        "(CI's short form: --epochs 2 --min-acc 98.5)")
    p.add_argument("--train-steps", type=int, default=50, help="updates in the training-step level")
    p.add_argument("--limit-train", type=int, metavar="N", help="train on the first N images (smoke runs)")
    p.add_argument("--out", type=Path, help="report directory (reports/MODEL if not given)")
    p.add_argument("--json", metavar="PATH", help="also write the numbers as JSON (format: parity/compare.py)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_compare)
