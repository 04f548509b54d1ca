"""Full-length accuracy of finished `parity train` runs, both frameworks side by side, with level 4's statistics.

    .venv/bin/python scripts/accuracy_table.py RUNS_DIR [--models cnn,convpool] [--json PATH]

Reads RUNS_DIR/MODEL/FRAMEWORK/seedS/history.json (as written by `parity train` and
`scripts/full_length_runs.sh`); a run counts once its history has the final test accuracy. Prints one Markdown row per
model: the tutorial's number, each framework's mean ± std over its seeds, the difference (Lightning - TF) with its
Welch 95% confidence interval, the verdict at the dataset's equivalence margin (MNIST 0.15 points, Fashion-MNIST 0.5;
see RESULTS.md) and the epochs run (early stopping: the restored epoch of the epochs run). With one seed per framework
there is no interval and no verdict: a single run's difference moves by a few tenths of a point from seed to seed.
A model with finished runs in one framework only gets a row too, with "-" for the other framework.
Seconds per epoch are in the JSON only: runs made while the machine did other work do not time the frameworks
(BENCHMARKS.md does).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from parity.catalog import get_recipe, get_spec
from parity.compare import accuracy_equivalence

MARGINS = {"mnist": 0.0015, "fashion_mnist": 0.005}


def finished_runs(runs_dir: Path, model: str, framework: str) -> list[dict]:
    histories = []
    for path in sorted((runs_dir / model / framework).glob("seed*/history.json")):
        history = json.loads(path.read_text())
        if "test_acc" in history:
            histories.append(history)
    return histories


def summarize(runs_dir: Path, model: str) -> dict | None:
    runs = {fw: finished_runs(runs_dir, model, fw) for fw in ("tf", "torch")}
    present = {fw: histories for fw, histories in runs.items() if histories}
    if not present:
        return None
    recipe = get_recipe(next(iter(present.values()))[0]["recipe"]["name"])
    if len(present) == 2:
        stats = accuracy_equivalence([h["test_acc"] for h in runs["tf"]], [h["test_acc"] for h in runs["torch"]],
                                     MARGINS[recipe.dataset])
    else:  # one framework's runs so far: its accuracy, nothing to compare
        stats = {"pass": None, "diff": None, "ci95": None, "margin": MARGINS[recipe.dataset]}
        for fw, histories in present.items():
            accs = [h["test_acc"] for h in histories]
            stats[fw] = {"mean": statistics.mean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                         "runs": accs}
    for fw, histories in present.items():
        stats[fw].update(
            seeds=[h["seed"] for h in histories],
            epochs_run=[len(h["epochs"]) for h in histories],
            seconds_per_epoch=statistics.median(row["seconds"] for h in histories for row in h["epochs"]),
        )
        if recipe.early_stopping_patience:  # the restored epoch: the best validation loss
            stats[fw]["best_epoch"] = [min(h["epochs"], key=lambda row: row["val_loss"])["epoch"] for h in histories]
    spec = get_spec(model)
    return {"model": model, "recipe": recipe.name, "dataset": recipe.dataset, "epochs": recipe.epochs,
            "tutorial": spec.reported_accuracy, **stats}


def _acc(stats: dict | None) -> str:
    if stats is None:
        return "-"
    runs = stats["runs"]
    return (f"{stats['mean'] * 100:.2f} ± {stats['std'] * 100:.2f}% ({len(runs)} seeds)" if len(runs) > 1
            else f"{runs[0] * 100:.2f}% (1 seed)")


def _epochs(row: dict, fw: str) -> str:
    stats = row.get(fw)
    if stats is None:
        return "-"
    if "best_epoch" in stats:  # per seed: the restored epoch of the epochs run
        return ", ".join(f"{b} of {n}" for b, n in zip(stats["best_epoch"], stats["epochs_run"]))
    runs = sorted(set(stats["epochs_run"]))
    return ", ".join(str(n) for n in (runs if len(runs) > 1 else runs[:1]))


def markdown(rows: list[dict]) -> str:
    lines = [("| model | recipe | tutorial | TF reference | Lightning port | diff (Lightning - TF), 95% CI | "
              "verdict | epochs TF / Lightning |"),
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        ci = row["ci95"]
        if row["diff"] is None:
            missing = "Lightning" if row.get("torch") is None else "TF"
            diff, verdict = "-", f"- ({missing} run not finished)"
        else:
            diff = f"{row['diff'] * 100:+.2f}" + (f" [{ci[0] * 100:+.2f}, {ci[1] * 100:+.2f}]" if ci else " (no CI)")
            verdict = (("PASS" if row["pass"] else "FAIL") + f" at ±{row['margin'] * 100:.2f}" if ci
                       else "- (needs 2+ seeds each)")
        tutorial = f"{row['tutorial'] * 100:.2f}%" if row["tutorial"] else "-"
        lines.append(
            f"| `{row['model']}` | {row['recipe']} | {tutorial} | {_acc(row.get('tf'))} | {_acc(row.get('torch'))} | {diff} | "
            f"{verdict} | {_epochs(row, 'tf')} / {_epochs(row, 'torch')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs_dir", type=Path)
    parser.add_argument("--models", help="comma-separated (default: every model with finished runs)")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    if not args.runs_dir.is_dir():
        parser.error(f"{args.runs_dir} is not a directory of runs (parity train --out DIR)")
    models = args.models.split(",") if args.models else sorted(p.name for p in args.runs_dir.iterdir() if p.is_dir())
    rows = [row for row in (summarize(args.runs_dir, m) for m in models) if row is not None]
    if not rows:
        print(f"no model in {args.runs_dir} has a finished run", file=sys.stderr)
        return 1
    print(markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
