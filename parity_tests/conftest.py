"""Shared fixtures. TensorFlow-dependent tests use the `tf` fixture: in an environment without TensorFlow they are
skipped, unless PARITY_REQUIRE_TF=1 (set by the CI command), where a missing TensorFlow is an error."""

from __future__ import annotations

import os

import numpy as np
import pytest

# Import order matters when both frameworks share a process: triton's native library (pulled in by
# torchmetrics / Lightning) segfaults when it is loaded after TensorFlow's. Loading the torch side first is safe.
import torch_impl.lightning_module  # noqa: F401,E402


@pytest.fixture(scope="session")
def tf():
    try:
        import tf_ref  # noqa: F401  (quiets TensorFlow's start-up logging)
        import tensorflow
    except ImportError:
        if os.environ.get("PARITY_REQUIRE_TF") == "1":
            pytest.fail("TensorFlow is required here (PARITY_REQUIRE_TF=1) but cannot be imported")
        pytest.skip("TensorFlow is not installed (the torch-only environment)")
    return tensorflow


@pytest.fixture(scope="session")
def load_script():
    """Imports a file of scripts/ (not a package) by name, e.g. `load_script("layer_bench")`."""
    import importlib.util
    from pathlib import Path

    def load(name: str):
        path = Path(__file__).resolve().parent.parent / "scripts" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(scope="session")
def mnist():
    """The real MNIST arrays (fetched once per machine into the cache; offline copies where there is no network)."""
    from parity.data import load_arrays

    return load_arrays("mnist")


@pytest.fixture
def rng():
    return np.random.default_rng(0)
