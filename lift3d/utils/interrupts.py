"""Ctrl-C, SIGTERM and SIGHUP stop a run the same way.

SIGTERM is what ``timeout``, ``docker stop`` and Slurm send, SIGHUP what a closed terminal sends; left alone,
both end Python at once, with no checkpoint and the trial's lock left behind. While :func:`stop_signals` is
active all three raise :class:`Stopped` (a KeyboardInterrupt, so every ``finally`` runs), except inside
:func:`deferred`: there the first one is only recorded (:func:`pending`) and the training loop stops after the
step it is in, so that the checkpoint it writes is the state of a completed step and a resumed run repeats an
uninterrupted one bit for bit. A second signal stops at once.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator, Optional

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class Stopped(KeyboardInterrupt):
    """A stop signal (``signum``) arrived; ``exit_code`` is the shell's 128 + its number (130, 143, 129)."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message or describe(signum))
        self.signum = signum
        self.exit_code = 128 + signum


def describe(signum: int) -> str:
    """``interrupted`` for Ctrl-C, ``interrupted by SIGTERM`` for the others."""
    return "interrupted" if signum == signal.SIGINT else f"interrupted by {signal.Signals(signum).name}"


class _State:
    installed = False
    deferring = False
    pending: Optional[int] = None


_state = _State()


def _handle(signum, frame) -> None:
    if _state.deferring and _state.pending is None:
        _state.pending = signum
        return
    raise Stopped(signum)


@contextlib.contextmanager
def stop_signals() -> Iterator[None]:
    """Stop signals raise :class:`Stopped` inside this block (a nested block, or one outside the main thread,
    where Python cannot set handlers, changes nothing)."""
    if _state.installed or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _handle) for s in STOP_SIGNALS}
    _state.installed, _state.pending = True, None
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _state.installed, _state.pending = False, None


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Inside this block the first stop signal only sets :func:`pending`; the caller stops where it is consistent."""
    outer = _state.deferring
    _state.deferring = True
    try:
        yield
    finally:
        _state.deferring = outer


def pending() -> Optional[int]:
    """The stop signal received inside :func:`deferred` and not acted on yet (None: none)."""
    return _state.pending
