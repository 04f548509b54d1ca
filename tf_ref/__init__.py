"""TensorFlow reference: the tutorials' models and training loops, written the way the tutorials wrote them."""

import os

# TensorFlow's C++ start-up chatter (oneDNN notices, missing CUDA drivers) buries the output a user reads.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
