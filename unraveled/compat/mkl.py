"""Freeing the buffers MKL keeps, through the name torch exports; checked on torch 2.13.0.

MKL (torch's BLAS on x86) keeps the buffers its matrix products allocate for reuse, outside
Python and torch, and more after each config that multiplies other shapes. ``mkl_free_buffers()``
is MKL's public call that frees them, but torch links MKL statically and exports it only under
MKL's internal name, ``mkl_serv_free_buffers`` (of which ``mkl_free_buffers`` is an alias in
MKL's own libraries), with the same signature: ``void (void)``.

Where torch says it has MKL (``torch.backends.mkl.is_available()``) on Linux, that name must be
in ``libtorch_cpu.so``: if it is not, ``free_buffers`` raises ``IncompatibleDependencyError``
rather than keep the buffers silently. Elsewhere (no MKL, or another platform's library names)
there is nothing it knows how to free, and it does nothing.
"""

from __future__ import annotations

import ctypes
import functools
import platform
import sys
from collections.abc import Callable
from pathlib import Path

from unraveled import compat

SYMBOL = "mkl_serv_free_buffers"


def free_buffers() -> None:
    """Free the buffers MKL keeps for reuse; the next product allocates what it needs.

    Raises:
        IncompatibleDependencyError: torch has MKL on Linux but does not export ``SYMBOL``.
    """
    torch = sys.modules.get("torch")  # not imported: MKL has allocated nothing
    if torch is None or platform.system() != "Linux" or not torch.backends.mkl.is_available():
        return
    _mkl_free_buffers(torch.__file__)()


@functools.cache
def _mkl_free_buffers(torch_file: str) -> Callable[[], None]:
    """MKL's ``mkl_free_buffers`` in the torch at ``torch_file``, which links MKL."""
    library = Path(torch_file).parent / "lib" / "libtorch_cpu.so"
    try:
        function = getattr(ctypes.CDLL(str(library)), SYMBOL)
    except (OSError, AttributeError) as error:
        raise compat.missing(
            "torch", f"{SYMBOL} in {library}", "handing back the buffers MKL keeps"
        ) from error
    function.restype = None
    function.argtypes = []
    return function  # type: ignore[no-any-return]
