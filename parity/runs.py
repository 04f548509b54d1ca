"""Run directories and the per-epoch history file, identical for both frameworks so runs can be overlaid.

    <out>/<model>/<framework>/seed<seed>/
        history.json     {"model", "framework", "recipe": {...}, "seed", "epochs": [row, ...],
                          "test_loss", "test_acc", "train_seconds"}
        history.csv      one row per epoch, columns EPOCH_COLUMNS
        tensorboard/     scalars with the tags below, step = epoch (1-based)
        checkpoints/     the framework's own checkpoints

A row has `epoch` (1-based) and any of: train_loss, train_acc, val_loss, val_acc, test_loss, test_acc, lr,
seconds. A metric a recipe does not measure (no validation split) is left out of the row and empty in the CSV.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from pathlib import Path

EPOCH_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc", "lr", "seconds")

# TensorBoard tag for each history column; both frameworks write these, at step = epoch
TB_TAGS = {
    "train_loss": "train/loss",
    "train_acc": "train/acc",
    "val_loss": "val/loss",
    "val_acc": "val/acc",
    "test_loss": "test/loss",
    "test_acc": "test/acc",
    "lr": "lr",
    "seconds": "time/epoch_seconds",
}


def derived_seed(seed: int, *keys: int) -> int:
    """A seed for the stream `keys` (a member index, an epoch and rank, ...) of run `seed`, independent of every
    other run's and stream's (numpy's SeedSequence hashing). `seed + i` would not be: run 0's member 1 would be
    run 1's member 0."""
    import numpy as np

    return int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0])


def member_seed(seed: int, member: int) -> int:
    """The initialization seed of ensemble member `member` in run `seed`; member 0 (and a single model) keeps
    `seed` itself."""
    return seed if member == 0 else derived_seed(seed, member)


def default_out_dir() -> Path:
    return Path(os.environ.get("PARITY_RUNS_DIR", "runs"))


def run_dir(out: str | os.PathLike | None, model: str, framework: str, seed: int) -> Path:
    path = Path(out or default_out_dir()) / model / framework / f"seed{seed}"
    path.mkdir(parents=True, exist_ok=True)
    return path


class History:
    """Accumulates epoch rows and rewrites history.json / history.csv after every epoch (a crash keeps them)."""

    def __init__(self, directory: Path, model: str, framework: str, recipe, seed: int):
        self.directory = Path(directory)
        self.header = {
            "model": model,
            "framework": framework,
            "recipe": dataclasses.asdict(recipe) if dataclasses.is_dataclass(recipe) else dict(recipe),
            "seed": seed,
        }
        self.epochs: list[dict] = []  # a resumed run puts back its earlier epochs here
        self.final: dict = {}
        self._added_here: set[int] = set()  # epochs this process trained

    def add_epoch(self, row: dict) -> None:
        unknown = set(row) - set(EPOCH_COLUMNS)
        if unknown:
            raise ValueError(f"unknown history columns {sorted(unknown)}; valid: {EPOCH_COLUMNS}")
        row = {k: (int(v) if k == "epoch" else float(v)) for k, v in row.items() if v is not None}
        self.epochs = [r for r in self.epochs if r["epoch"] != row["epoch"]] + [row]  # a resumed epoch replaces
        self._added_here.add(row["epoch"])
        self.write()

    def restored_seconds(self) -> float:
        """Recorded seconds of the epochs that earlier processes of a resumed run trained."""
        return sum(r.get("seconds", 0.0) for r in self.epochs if r["epoch"] not in self._added_here)

    def finish(self, **final) -> None:
        """The run's final numbers. `train_seconds` is this process's training time; a resumed run's history adds
        the recorded seconds of the epochs trained before the resume, so it counts the whole run's training."""
        if "train_seconds" in final:
            final["train_seconds"] = float(final["train_seconds"]) + self.restored_seconds()
        self.final.update({k: float(v) for k, v in final.items()})
        self.write()

    def as_dict(self) -> dict:
        return {**self.header, "epochs": self.epochs, **self.final}

    def write(self) -> None:
        tmp = self.directory / "history.json.tmp"
        tmp.write_text(json.dumps(self.as_dict(), indent=2))
        os.replace(tmp, self.directory / "history.json")
        with open(self.directory / "history.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=EPOCH_COLUMNS)
            writer.writeheader()
            writer.writerows(self.epochs)


def load_history(path: str | os.PathLike) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "history.json"
    return json.loads(path.read_text())
