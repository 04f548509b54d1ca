"""TensorFlow reference: the tutorials' models and training loops, written the way the tutorials wrote them."""

import os

# TensorFlow's C++ start-up chatter (oneDNN notices, missing CUDA drivers) buries the output a user reads.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# The torch side may have set TensorBoard's "no TensorFlow" marker in this process (see torch_impl/__init__.py);
# TensorFlow's own tf.summary goes through TensorBoard and needs the real TensorFlow, so lift it.
import sys  # noqa: E402

sys.modules.pop("tensorboard.compat.notf", None)
