"""TensorFlow's import without the start-up lines its C++ writes to fd 2 on every process.

They come before absl logging is initialised, so TF_CPP_MIN_LOG_LEVEL does not stop them:
"All log messages before absl::InitializeLog()" and "Unable to register cuDNN/cuBLAS/cuFFT
factory" (CUDA plugins registered twice by the pip wheel; harmless, also on CPU-only hosts).
Only these exact lines are dropped; everything else written during the import, errors
included, is passed on to stderr as it comes.
"""

from __future__ import annotations

import os
import re
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

KNOWN_HARMLESS = re.compile(
    rb"WARNING: All log messages before absl::InitializeLog\(\) is called are written to "
    rb"STDERR"
    rb"|E\d{4} [\d:.]+ +\d+ cuda_(dnn|blas|fft)\.cc:\d+\] Unable to register cu(DNN|BLAS|FFT) "
    rb"factory: Attempting to register factory for plugin cu(DNN|BLAS|FFT) when one has "
    rb"already been registered"
)


@contextmanager
def stderr_without_known_noise() -> Iterator[None]:
    """Route fd 2 (C++ writes included) through a filter that drops the KNOWN_HARMLESS lines."""
    sys.stderr.flush()
    original = os.dup(2)
    read_end, write_end = os.pipe()

    def forward() -> None:
        with os.fdopen(read_end, "rb") as lines:
            for line in lines:
                if not KNOWN_HARMLESS.fullmatch(line.rstrip(b"\n")):
                    os.write(original, line)

    forwarder = threading.Thread(target=forward, daemon=True)
    forwarder.start()
    os.dup2(write_end, 2)
    os.close(write_end)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(original, 2)  # the pipe's last writer closes: the forwarder sees its end
        forwarder.join(timeout=10)  # a child that inherited the pipe may keep it open longer
        if not forwarder.is_alive():  # else it still forwards that child's lines
            os.close(original)


def import_tensorflow() -> None:
    """Load TensorFlow once, quietly; later `import tensorflow` statements find it loaded."""
    if "tensorflow" in sys.modules:
        return
    with stderr_without_known_noise():
        import tensorflow  # noqa: F401
