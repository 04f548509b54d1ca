"""An environment without TensorFlow, for the test suite's torch-only pass (`scripts/test.sh`).

On PYTHONPATH, Python imports this file at start-up, in the test process and in every process it starts (DDP ranks,
`parity train` subprocesses): from then on tensorflow, keras and tf_keras cannot be found, as where they are not
installed (`import tensorflow` raises ModuleNotFoundError, `importlib.util.find_spec` returns None), the situation of
a GPU machine that has only PyTorch.
"""

import importlib.machinery
import sys

_BLOCKED = {"tensorflow", "keras", "tf_keras"}


class _PathFinderWithout(importlib.machinery.PathFinder):
    """The standard finder of modules on sys.path, blind to the blocked packages."""

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname.partition(".")[0] in _BLOCKED:
            return None
        return super().find_spec(fullname, path, target)


sys.meta_path[:] = [_PathFinderWithout if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
