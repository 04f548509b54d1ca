"""TensorFlow reference: the tutorials' models and training loops, written the way the tutorials wrote them."""

import os
import sys

# TensorFlow's C++ start-up chatter (oneDNN notices, missing CUDA drivers) buries the output a user reads.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _tensorboard_with_tensorflow() -> None:
    """A torch run earlier in this process may have switched tensorboard to its TF-free writer
    (`torch_impl.cpu_tuning.tensorboard_without_tensorflow`, which registers `tensorboard.compat.notf`); then
    `tf.summary` fails with "cannot import tensorflow 2.0 API". Switch it back and point tensorboard's already
    resolved TF module at the real TensorFlow."""
    if sys.modules.pop("tensorboard.compat.notf", None) is None:
        return
    compat = sys.modules.get("tensorboard.compat")
    resolved = getattr(compat, "tf", None) if compat is not None else None
    # once resolved, the lazy module holds a copy of the stub's attributes, `__name__` included
    if resolved is not None and vars(resolved).get("__name__") == "tensorboard.compat.tensorflow_stub":
        import tensorflow

        vars(resolved).update(vars(tensorflow))


_tensorboard_with_tensorflow()
