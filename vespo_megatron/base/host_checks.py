"""Value checks done on a host copy, so that the same check on the device copy needs no device sync.

Argument checks such as "every token id lies in [0, V)" read tensor values (`int(t.max())`): on CUDA each read
waits for the GPU to finish all queued work, and the host then launches the next kernels onto an idle GPU.
In a host-bound update (the testbed's N = 64 updates, a loss head that runs the loss per chunk) that costs a
GPU drain per check. The training step builds its micro-batches on the host, so it checks the values there
(free) and declares the result for the device copies while it runs the loss:

    with checked_on_host(token_seq=True, targets=(lo, hi)):
        ...  # check_token_seq skips its device read; check_head_args compares (lo, hi) with the vocabulary

`token_seq=True`: every sequence index the loss sees was checked to lie in [0, num_seqs) of its micro-batch
(or of a chunk of whole sequences derived from it). `targets=(lo, hi)`: the smallest and largest target id of
the micro-batch, read on the host; the head still compares them with its vocabulary and raises the same error.
Outside the context (the library's own callers) every check reads the device values as before.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar

__all__ = ["checked_on_host", "host_checked"]

_CHECKED: ContextVar[dict | None] = ContextVar("vespo_host_checked", default=None)


@contextlib.contextmanager
def checked_on_host(**facts):
    """Declare facts checked on the host for the code run inside (see the module docstring)."""
    token = _CHECKED.set({**(_CHECKED.get() or {}), **facts})
    try:
        yield
    finally:
        _CHECKED.reset(token)


def host_checked(name: str):
    """The fact `name` declared by an enclosing `checked_on_host`, or None."""
    facts = _CHECKED.get()
    return None if facts is None else facts.get(name)
