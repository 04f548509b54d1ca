"""Process settings for torch training that change no result: CPU speed, and no TensorFlow in torch processes.

`keep_freed_memory()`: glibc returns every large freed block (PyTorch's CPU allocator uses malloc) to the operating
system and maps fresh pages for the next one, so each training step page-faults through its largest activations
again (tens of MB per step for `cnn` at batch 100). Raising glibc's mmap and trim thresholds keeps freed blocks in
the heap for reuse, as TensorFlow's own CPU allocator does. Measured with `parity bench` (BENCHMARKS.md). Opt out
with PARITY_KEEP_FREED_MEMORY=0; does nothing where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_THRESHOLD = 1 << 30  # blocks up to 1 GiB come from (and go back to) the heap
_done = False


def keep_freed_memory() -> bool:
    """Set glibc's M_MMAP_THRESHOLD / M_TRIM_THRESHOLD once per process; True if they are set."""
    global _done
    if _done:
        return True
    if os.environ.get("PARITY_KEEP_FREED_MEMORY", "1") == "0" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _done = bool(libc.mallopt(_M_MMAP_THRESHOLD, _THRESHOLD) and libc.mallopt(_M_TRIM_THRESHOLD, _THRESHOLD))
    except (OSError, AttributeError):
        return False
    return _done


def tensorboard_without_tensorflow() -> bool:
    """Keep TensorFlow out of a torch training process (Lightning's TensorBoard logger writes through `tensorboard`,
    which imports TensorFlow whenever it is installed: +0.5-0.9 GB of resident memory and seconds of start-up).

    `tensorboard.compat.notf` is tensorboard's own switch for "use the TF-free writer" (its `no_tensorflow` build
    target provides that module); registering it does the same at run time. Local log directories are written the
    same way. Skipped when TensorFlow is already imported (e.g. `parity compare` runs both frameworks).
    Returns whether the switch is on.
    """
    import sys
    import types

    if sys.modules.get("tensorflow") is not None:
        return "tensorboard.compat.notf" in sys.modules
    sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
    return True
