"""How soon the float32 training runs of the two frameworks part, from the same weights on the same batches, over
several windows of the data (level 3's "float32 drift", which `parity compare` reports for the first window only).

    .venv/bin/python scripts/float32_drift.py [--model cnn] [--steps 50] [--windows 6] [--json PATH]
    PARITY_ONEDNN_LINEAR=0 .venv/bin/python scripts/float32_drift.py ...   # the port's Dense gradients from F.linear

Window k trains both frameworks for `--steps` optimizer steps on MNIST's training batches k * steps onwards (batch
32, as level 3). Per window: the largest parameter difference after the first step, the first step whose losses
differ by more than 1e-5 relative (`--steps` if none does) and the largest relative loss difference over the run.
float32 rounding differs in every product, Adam divides by the square root of tiny second moments, and a
difference that flips a ReLU or a max-pool winner grows from there: the step at which a pair parts is a property of
the window as much as of the two implementations, which is why one window says little and this script runs several.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

THRESHOLD = 1e-5


def window_drift(model: str, steps: int, window: int) -> dict:
    import numpy as np

    from parity.crosscheck import run_both

    tf_losses, torch_losses, first_step = run_both(model, steps, dtype="float32", first_batch=window * steps)
    rel = np.abs(tf_losses - torch_losses) / np.abs(tf_losses)
    parted = np.flatnonzero(rel > THRESHOLD)
    return {"window": window, "first_step_param_diff": float(first_step),
            "parted_at": int(parted[0]) if parted.size else steps, "max_rel_loss_diff": float(rel.max())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--windows", type=int, default=6)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    import torch_impl.lightning_module  # noqa: F401  (torch's side first: see parity_tests/conftest.py)
    from torch_impl import layers

    onednn = layers._INNER_PRODUCT is not None
    print(f"{args.model}: {args.windows} windows of {args.steps} float32 steps; the port's Dense gradients from "
          f"{'oneDNN (large products)' if onednn else 'F.linear'}")
    print(f"{'window':>6s}  {'param diff, step 1':>18s}  {'parted at step':>14s}  {'max rel loss diff':>17s}")
    rows = []
    for window in range(args.windows):
        row = window_drift(args.model, args.steps, window)
        rows.append(row)
        print(f"{window:6d}  {row['first_step_param_diff']:18.1e}  {row['parted_at']:14d}  "
              f"{row['max_rel_loss_diff']:17.1e}", flush=True)
    parted = sum(row["parted_at"] < args.steps for row in rows)
    median = statistics.median(row["max_rel_loss_diff"] for row in rows)
    print(f"parted (> {THRESHOLD:g} relative) within {args.steps} steps in {parted} of {args.windows} windows; "
          f"median of the largest relative loss differences {median:.1e}")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "steps": args.steps, "onednn_linear": onednn,
                                               "threshold": THRESHOLD, "windows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
