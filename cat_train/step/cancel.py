"""Cancel points inside one step's long work: the loop hands Cancel to its host once per step (the host's callback
raises), but a preview round (30 prompts: 18 s) or an auto-preservation measurement (150 probes: 66 s) is one step.
Such work calls `cancel_point()` between items; a host says what that does with `cancel_check(fn)` (ComfyUI: raise
at Cancel). Without a host's check it does nothing."""
from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Callable, Iterator

_check: ContextVar[Callable[[], None] | None] = ContextVar("cat_cancel_check", default=None)


@contextlib.contextmanager
def cancel_check(fn: Callable[[], None] | None) -> Iterator[None]:
    """Within this block, `cancel_point()` calls fn (which raises to cancel)."""
    token = _check.set(fn)
    try:
        yield
    finally:
        _check.reset(token)


def cancel_point() -> None:
    fn = _check.get()
    if fn is not None:
        fn()
