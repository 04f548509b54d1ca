"""Tutorial 001's data augmentation, pre-generated exactly as the tutorial does it (framework-neutral).

For every training image the tutorial keeps the original and appends 4 copies, each rotated by
`random.randint(-15, 15)` degrees and then shifted by `np.random.randint(-2, 2, 2)` pixels (so -2..1 on each
axis: the upper bound is exclusive, a quirk), both with `scipy.ndimage` and the empty pixels filled with the
image's median. 60,000 images become 300,000, in the order original, copy 1..4, next image.

The arrays are uint8 (the tutorial augments the uint8 images from `mnist.load_data()` before scaling), cached
on disk per seed because generating them takes a couple of minutes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np


def augment_tut001(images: np.ndarray, labels: np.ndarray, seed: int = 0, copies: int = 4,
                   shift_low: int = -2, shift_high: int = 2, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(N, 28, 28) uint8 -> ((copies + 1) * N, 28, 28) uint8, labels repeated to match."""
    from scipy import ndimage

    if images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(f"expected (N, 28, 28) uint8 images, got {images.shape} {images.dtype}")
    rng = np.random.default_rng(seed)
    n = len(images)
    angles = rng.integers(-15, 16, size=(n, copies))  # random.randint(-15, 15) includes 15
    shifts = rng.integers(shift_low, shift_high, size=(n, copies, 2))  # np.random.randint excludes the high end
    out = np.empty((n, copies + 1, *images.shape[1:]), dtype=np.uint8)
    iterator = range(n)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc="augmenting (tutorial 001)", unit="img", mininterval=1.0)
    for i in iterator:
        image = images[i]
        background = np.median(image)
        out[i, 0] = image
        for c in range(copies):
            rotated = ndimage.rotate(image, angle=int(angles[i, c]), reshape=False, cval=background)
            out[i, c + 1] = ndimage.shift(rotated, shift=shifts[i, c], cval=background)
    return out.reshape(n * (copies + 1), *images.shape[1:]), np.repeat(labels, copies + 1)


def cached_augment_tut001(images: np.ndarray, labels: np.ndarray, seed: int, cache_dir: str | os.PathLike,
                          shift_low: int = -2, shift_high: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """`augment_tut001`, stored as .npy files keyed by the input's hash, the seed and the shift range."""
    key = hashlib.sha256(images.tobytes()).hexdigest()[:16]
    path = Path(cache_dir) / f"aug001_{key}_seed{seed}_shift{shift_low}_{shift_high}"
    if (path / "done").exists():
        cached = _load_verified(path)
        if cached is not None:
            return cached
    x, y = augment_tut001(images, labels, seed=seed, shift_low=shift_low, shift_high=shift_high, progress=True)
    path.mkdir(parents=True, exist_ok=True)
    np.save(path / "images.npy", x)
    np.save(path / "labels.npy", y)
    # written last, with the arrays' checksums: a half-written or damaged cache is regenerated
    (path / "done").write_text(json.dumps(_checksums(x, y)))
    return x, y


def _checksums(images: np.ndarray, labels: np.ndarray) -> dict[str, str]:
    return {name: hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()
            for name, a in (("images", images), ("labels", labels))}


def _load_verified(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """The cached arrays if they load and match the checksums in `done`; None (with a message) if not."""
    try:
        x, y = np.load(path / "images.npy"), np.load(path / "labels.npy")
    except (OSError, ValueError) as error:
        print(f"the cached augmentation in {path} cannot be read ({error}); generating it again", flush=True)
        return None
    try:
        expected = json.loads((path / "done").read_text())
    except ValueError:  # written before the checksums were kept: trust it once and record them
        (path / "done").write_text(json.dumps(_checksums(x, y)))
        return x, y
    if expected != _checksums(x, y):
        print(f"the cached augmentation in {path} does not match its checksums (damaged); generating it again",
              flush=True)
        return None
    return x, y
