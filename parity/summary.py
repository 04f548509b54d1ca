"""The model-summary format both frameworks print (`parity summary MODEL --framework tf|torch --json`).

    {"model": str, "framework": "tf" | "torch", "total_params": int, "trainable_params": int,
     "non_trainable_params": int,
     "layers": [{"name": str, "type": str, "output_shape": [H, W, C] or [features], "params": int}, ...]}

`output_shape` has no batch dimension and is in Keras's (H, W, C) order on both sides; `layers` lists every
top-level layer of the catalog in forward order. BatchNorm moving statistics count as non-trainable parameters
(Keras's convention; on the torch side they are the running_mean / running_var buffers).
"""

from __future__ import annotations

from parity.catalog import get_spec


def format_summary(summary: dict) -> str:
    """A Keras-like text table."""
    rows = [(layer["name"], layer["type"], str(tuple(layer["output_shape"])), f"{layer['params']:,}")
            for layer in summary["layers"]]
    headers = ("Layer", "Type", "Output shape (H, W, C)", "Params")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    out = [f'Model: "{summary["model"]}" ({summary["framework"]})', "=" * len(line), line, "-" * len(line)]
    out += ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    out += [
        "=" * len(line),
        f"Total params: {summary['total_params']:,}",
        f"Trainable params: {summary['trainable_params']:,}",
        f"Non-trainable params: {summary['non_trainable_params']:,}",
    ]
    return "\n".join(out)


def check_against_catalog(summary: dict) -> list[str]:
    """Differences between a summary and the catalog's numbers; an empty list means it matches."""
    spec = get_spec(summary["model"])
    problems = []
    for key, expected in (
        ("trainable_params", spec.trainable_params),
        ("non_trainable_params", spec.non_trainable_params),
    ):
        if summary[key] != expected:
            problems.append(f"{key}: expected {expected:,}, got {summary[key]:,}")
    got = [(layer["name"], tuple(layer["output_shape"]), layer["params"]) for layer in summary["layers"]]
    want = [(layer.name, layer.output_shape, layer.params) for layer in spec.layers]
    if got != want:
        for i, (g, w) in enumerate(zip(got, want)):
            if g != w:
                problems.append(f"layer {i}: expected (name, shape, params) {w}, got {g}")
        if len(got) != len(want):
            problems.append(f"expected {len(want)} layers, got {len(got)}")
    return problems
