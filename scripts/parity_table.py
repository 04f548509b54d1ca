"""Levels 1-3 of `parity compare` for every catalog model, as a Markdown table (the one in RESULTS.md).

    .venv/bin/python scripts/parity_table.py > table.md
"""

from __future__ import annotations

import parity.crosscheck  # noqa: F401  (torch before TensorFlow)
from parity.catalog import MODEL_NAMES, get_spec, recipe_for
from parity.compare import level_forward, level_structure, level_train_step
from parity.data import load_arrays

import numpy as np


def main() -> None:
    x_test = load_arrays("mnist")["x_test"][:256]
    print("| model | params | 1 structure | 2 forward max abs diff tf->torch / torch->tf | "
          "2 float64: tf->torch / torch->tf | "
          "3 float64: param diff after 1 step / max rel loss diff, 50 steps | "
          "3 float32: max rel loss diff, 10 / 50 steps |")
    print("|---|---|---|---|---|---|---|")
    for name in MODEL_NAMES:
        spec = get_spec(name)
        s = level_structure(name)
        if spec.input_shape == (28, 28, 1):
            x = (x_test.astype(np.float32) / np.float32(recipe_for(name).scale))[..., None]
        else:
            x = np.random.default_rng(0).random((8, *spec.input_shape), dtype=np.float32)
        f = level_forward(name, x)
        fwd = f"{f['max_abs_diff']['tf_to_torch']:.1e} / {f['max_abs_diff']['torch_to_tf']:.1e} " + (
            "PASS" if f["pass"] else "FAIL")
        fwd64 = f"{f['max_abs_diff_float64']['tf_to_torch']:.1e} / {f['max_abs_diff_float64']['torch_to_tf']:.1e}"
        t = level_train_step(name, 50)  # the residual block, without a recipe: Keras Adam on a regression
        step = (f"{t['max_param_diff']:.1e} / {t['float64_max_rel_loss_diff']:.1e} "
                + ("PASS" if t["pass"] else "FAIL"))
        drift = f"{t['float32_rel_loss_diff_first10']:.1e} / {t['float32_max_rel_loss_diff']:.1e}"
        print(f"| `{name}` | {s['params']['tf']:,} | {'PASS' if s['pass'] else 'FAIL'} | {fwd} | {fwd64} | {step} "
              f"| {drift} |", flush=True)


if __name__ == "__main__":
    main()
