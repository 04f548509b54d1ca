"""PyTorch + Lightning ports of the tutorials' models and recipes. Never imports TensorFlow."""

import sys
import types

# torch.utils.tensorboard's writer imports TensorFlow whenever it is installed (tensorboard.compat.tf); the
# marker module `tensorboard.compat.notf` is TensorBoard's own switch to its TensorFlow-free stub instead.
sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
