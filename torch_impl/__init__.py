"""PyTorch + Lightning ports of the tutorials' models and recipes. Never imports TensorFlow.

(TensorBoard's writer, used by the loggers, imports TensorFlow by itself when it happens to be installed, and
falls back to its own stub when it is not: the torch side runs the same either way, see
parity_tests/test_training.py::test_torch_side_runs_without_tensorflow.)
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # ... and then its C++ start-up chatter is kept quiet
