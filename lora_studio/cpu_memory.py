"""While a training runs on the CPU, memory it frees stays in the process for the next step's tensors.

glibc hands each block over 128 KiB back to the system when it is freed, so every step's activations and
gradients land on fresh pages that the kernel must map and zero on first touch: about 17,500 page faults
per step of the demo model at batch 8 (bench/train_step.py), 10-20% of its step on the 2-core machine where
it was measured. Raising glibc's mmap and trim thresholds (`mallopt`) for the training keeps those pages:
under 2,000 faults a step. When the training ends, the thresholds go back to 128 KiB and `malloc_trim`
returns what was kept, so an app that trained once does not hold the training's peak for its lifetime.

It does nothing where the C library is not glibc (macOS, Windows, musl), and on a GPU, whose tensors are
not the C library's.
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
KEPT_BYTES = 1 << 30  # blocks up to 1 GiB come from (and return to) the heap while training
GLIBC_DEFAULT_BYTES = 128 * 1024  # both thresholds' glibc defaults


def glibc() -> ctypes.CDLL | None:
    """The process's glibc, or None where the C library is another one."""
    try:
        if not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"):  # "glibc 2.36"; absent elsewhere
            return None
        libc = ctypes.CDLL("libc.so.6")
    except (AttributeError, ValueError, OSError):  # no os.confstr (Windows), no such name, no such library
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


class KeptHeap:
    """For a training on `device_type`: on the CPU, glibc keeps freed blocks until `release()`."""

    def __init__(self, device_type: str):
        self.libc = glibc() if device_type == "cpu" else None
        if self.libc is not None and not self._set_thresholds(KEPT_BYTES):
            log.info("glibc refused larger malloc thresholds; freed memory is returned as usual")
            self._set_thresholds(GLIBC_DEFAULT_BYTES)
            self.libc = None

    @property
    def active(self) -> bool:
        return self.libc is not None

    def _set_thresholds(self, size: int) -> bool:
        """Both thresholds to `size`; whether glibc took both (it answers 1 for a value it took)."""
        mmap_set = self.libc.mallopt(M_MMAP_THRESHOLD, size)
        trim_set = self.libc.mallopt(M_TRIM_THRESHOLD, size)
        return mmap_set == 1 and trim_set == 1

    def release(self) -> None:
        """glibc's default thresholds again (fixed at 128 KiB: its sliding mmap threshold stays off once set),
        and the kept memory back to the system."""
        if self.libc is None:
            return
        self._set_thresholds(GLIBC_DEFAULT_BYTES)
        self.libc.malloc_trim(0)
        self.libc = None
