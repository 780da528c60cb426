"""This process's memory: its peak over a stretch of code, and handing freed memory back.

``getrusage``'s maximum RSS only ever grows over a process's life, so it can't tell one config
from the next; a thread samples the RSS instead (every 5 ms: allocations that come and go
faster than that can be missed, so the figure is a lower bound of the true peak).
"""

from __future__ import annotations

import ctypes
import gc
import platform
import threading
from types import TracebackType

import psutil

from unraveled.compat import mkl

SAMPLE_SECONDS = 0.005
MB = 1024 * 1024


def return_freed_memory() -> None:
    """Free what only reference cycles hold, then hand the heap's free pages back to the system.

    Reference cycles hold figures and caches once nothing else does.

    glibc keeps freed blocks smaller than its mmap threshold (which grows to 32 MB once a large
    block is freed) for reuse, but the next step often allocates in other sizes and grows the heap
    instead: without this, the process's resident memory climbs step after step, and the next
    model or config counts what the last one freed.

    The buffers MKL (torch's BLAS on x86) keeps for reuse are freed too (see
    ``unraveled.compat.mkl``).
    """
    gc.collect()
    mkl.free_buffers()
    if platform.system() == "Linux":
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (e.g. musl)
            pass


class PeakMemory:
    """``with PeakMemory() as peak: ...`` then ``peak.mb``: the highest RSS seen, in MiB."""

    def __init__(self) -> None:
        """Start from this process's RSS now; sampling starts on entering the ``with`` block."""
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="peak-rss", daemon=True)
        self.peak_bytes = self._process.memory_info().rss

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            self.peak_bytes = max(self.peak_bytes, self._process.memory_info().rss)

    @property
    def mb(self) -> float:
        """The highest RSS seen, in MiB."""
        return self.peak_bytes / MB

    def __enter__(self) -> PeakMemory:
        """Start sampling."""
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        """Stop sampling, counting the RSS at the end too."""
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, self._process.memory_info().rss)
