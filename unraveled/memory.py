"""This process's memory: its peak over a stretch of code, and handing freed memory back.

``getrusage``'s maximum RSS only ever grows over a process's life, so it can't tell one config
from the next; a thread samples the RSS instead (every 5 ms: allocations that come and go
faster than that can be missed, so the figure is a lower bound of the true peak).
"""

from __future__ import annotations

import ctypes
import functools
import gc
import platform
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import psutil

SAMPLE_SECONDS = 0.005
MB = 1024 * 1024


def return_freed_memory() -> None:
    """Free what only reference cycles still hold (figures, caches), then hand the heap's free
    pages back to the system.

    glibc keeps freed blocks smaller than its mmap threshold (which grows to 32 MB once a large
    block is freed) for reuse, but the next step often allocates in other sizes and grows the heap
    instead: without this, the process's resident memory climbs step after step, and the next
    model or config counts what the last one freed.

    MKL (torch's BLAS on x86) keeps the buffers its matrix products allocate for reuse, outside
    Python and torch: 15-35 MB after a config on GPT-2 small, more after each config that
    multiplies other shapes. They are freed here too; the next product allocates what it needs.
    """
    gc.collect()
    _free_mkl_buffers()
    if platform.system() == "Linux":
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (e.g. musl)
            pass


def _free_mkl_buffers() -> None:
    torch = sys.modules.get("torch")  # not imported: MKL has allocated nothing
    if torch is None:
        return
    free_buffers = _mkl_free_buffers(torch.__file__)
    if free_buffers is not None:
        free_buffers()


@functools.cache
def _mkl_free_buffers(torch_file: str) -> Callable[[], None] | None:
    """MKL's ``mkl_free_buffers`` in the torch at ``torch_file``; None when it doesn't link MKL.

    torch links MKL statically and exports the function only under its internal name,
    ``mkl_serv_free_buffers`` (``mkl_free_buffers`` is an alias of it in MKL's own libraries).
    """
    try:
        function = ctypes.CDLL(
            str(Path(torch_file).parent / "lib" / "libtorch_cpu.so")
        ).mkl_serv_free_buffers
    except (OSError, AttributeError):  # another platform, or a torch built without MKL
        return None
    function.restype = None
    function.argtypes = []
    return function  # type: ignore[no-any-return]


class PeakMemory:
    """``with PeakMemory() as peak: ...`` then ``peak.mb``: the highest RSS seen, in MiB."""

    def __init__(self) -> None:
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="peak-rss", daemon=True)
        self.peak_bytes = self._process.memory_info().rss

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            self.peak_bytes = max(self.peak_bytes, self._process.memory_info().rss)

    @property
    def mb(self) -> float:
        return self.peak_bytes / MB

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, self._process.memory_info().rss)
