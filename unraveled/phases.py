"""Where a computation's phases end: the runner hands freed memory back there, a notebook doesn't.

Library code computes and returns; the process's memory belongs to whoever runs it. Where a step
frees much of what it built just before the next one allocates (a conversion between folding the
blocks and folding the unembedding), it calls ``phase_done()``. That does nothing unless the
caller installed a hand-back for the stretch of code (``handing_back``), as the runner does
around loading a model and computing a config: a notebook user of the same function pays for no
garbage collection or heap trimming inside their process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_hand_back: ContextVar[Callable[[], None] | None] = ContextVar("hand_back", default=None)


def phase_done() -> None:
    """Let the caller hand back what the phase just done freed, if it installed a hand-back."""
    hand_back = _hand_back.get()
    if hand_back is not None:
        hand_back()


@contextmanager
def handing_back(hand_back: Callable[[], None]) -> Iterator[None]:
    """Call ``hand_back`` at every ``phase_done()`` inside the ``with`` block."""
    token = _hand_back.set(hand_back)
    try:
        yield
    finally:
        _hand_back.reset(token)
