"""Epoch by epoch, both frameworks side by side: the mean curves of finished `parity train` runs and their difference.

    .venv/bin/python scripts/epoch_curves.py RUNS_DIR MODEL [--metrics test_acc,val_loss,train_loss]
                                             [--epochs N] [--plot PATH.png] [--json PATH]

Reads RUNS_DIR/MODEL/FRAMEWORK/seedS/history.json, as `scripts/accuracy_table.py` does, and prints one Markdown table
per metric: for each epoch, each framework's mean ± std over its seeds and the difference (Lightning - TF) with its
Welch 95% confidence interval. Where the final accuracies of two frameworks differ, this says when the difference
appears: from the first epoch (the training itself), or only through the epoch early stopping restores.

Early stopping ends runs at different epochs, and a mean over the runs still going at epoch e is a mean over a
selected subset. So the table stops at the last epoch every run reached (`--epochs` can only shorten it).
The curves of one run are correlated from epoch to epoch: a table of intervals is not a sequence of independent tests.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy_table import finished_runs  # noqa: E402

from parity.compare import accuracy_equivalence  # noqa: E402

FRAMEWORKS = ("tf", "torch")
LABELS = {"tf": "TF reference", "torch": "Lightning port"}


def curves(runs_dir: Path, model: str, metrics: list[str], epochs: int | None = None) -> dict:
    """Per metric and epoch: each framework's values over its seeds, their mean and std, the difference and its CI."""
    runs = {fw: finished_runs(runs_dir, model, fw) for fw in FRAMEWORKS}
    for fw, histories in runs.items():
        if len(histories) < 2:
            raise SystemExit(f"{model}: {len(histories)} finished {fw} run(s) in {runs_dir}; "
                             "the curves need 2+ per framework (scripts/full_length_runs.sh makes them)")
    common = min(len(h["epochs"]) for histories in runs.values() for h in histories)
    epochs = common if epochs is None else min(epochs, common)
    result = {"model": model, "runs_dir": str(runs_dir), "epochs": epochs,
              "seeds": {fw: [h["seed"] for h in histories] for fw, histories in runs.items()}, "metrics": {}}
    for metric in metrics:
        missing = [fw for fw, histories in runs.items() if metric not in histories[0]["epochs"][0]]
        if missing:
            known = ", ".join(sorted(k for k in runs["tf"][0]["epochs"][0] if k not in ("epoch", "seconds", "lr")))
            raise SystemExit(f"unknown metric {metric!r} (not in the {missing[0]} histories); choose from: {known}")
        rows = []
        for e in range(epochs):
            values = {fw: [h["epochs"][e][metric] for h in histories] for fw, histories in runs.items()}
            stats = accuracy_equivalence(values["tf"], values["torch"], margin=math.inf)
            rows.append({"epoch": e + 1, "tf": stats["tf"], "torch": stats["torch"], "diff": stats["diff"],
                         "ci95": stats["ci95"]})
        result["metrics"][metric] = rows
    return result


def _number(metric: str, value: float, signed: bool = False) -> str:
    sign = "+" if signed else ""
    return f"{value * 100:{sign}.2f}" if metric.endswith("acc") else f"{value:{sign}.4f}"


def markdown(result: dict) -> str:
    n_tf, n_torch = (len(result["seeds"][fw]) for fw in FRAMEWORKS)
    blocks = []
    for metric, rows in result["metrics"].items():
        unit = " (%)" if metric.endswith("acc") else ""
        lines = [f"`{result['model']}`, {metric}{unit}, mean ± std over {n_tf} TF and {n_torch} Lightning seeds",
                 "",
                 "| epoch | TF reference | Lightning port | diff (Lightning - TF), 95% CI |",
                 "|---|---|---|---|"]
        for row in rows:
            cells = [f"{_number(metric, row[fw]['mean'])} ± {_number(metric, row[fw]['std'])}" for fw in FRAMEWORKS]
            diff, low, high = (_number(metric, v, signed=True) for v in (row["diff"], *row["ci95"]))
            diff = f"{diff} [{low}, {high}]"
            lines.append(f"| {row['epoch']} | {cells[0]} | {cells[1]} | {diff} |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(result["metrics"])
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        rows = result["metrics"][metric]
        epochs = [row["epoch"] for row in rows]
        scale = 100 if metric.endswith("acc") else 1
        for fw, color in zip(FRAMEWORKS, ("tab:orange", "tab:blue")):
            mean = [row[fw]["mean"] * scale for row in rows]
            std = [row[fw]["std"] * scale for row in rows]
            ax.plot(epochs, mean, marker="o", color=color, label=f"{LABELS[fw]} ({len(result['seeds'][fw])} seeds)")
            ax.fill_between(epochs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=color, alpha=0.15)
        if metric.endswith("loss"):
            ax.set_yscale("log")  # a loss falls by an order of magnitude in the first epochs
        ax.set_title(f"{result['model']}: {metric}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric + (" (%)" if scale == 100 else ""))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs_dir", type=Path)
    parser.add_argument("model")
    parser.add_argument("--metrics", default="test_acc,val_loss,train_loss",
                        help="comma-separated history columns (default: test_acc,val_loss,train_loss)")
    parser.add_argument("--epochs", type=int, help="at most this many epochs (default: all that every run reached)")
    parser.add_argument("--plot", type=Path, metavar="PNG", help="also draw the mean ± std curves into this file")
    parser.add_argument("--json", type=Path, metavar="PATH")
    args = parser.parse_args(argv)
    result = curves(args.runs_dir, args.model, [m for m in args.metrics.split(",") if m], args.epochs)
    print(markdown(result))
    if args.plot:
        plot(result, args.plot)
        print(f"\nplot: {args.plot}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
