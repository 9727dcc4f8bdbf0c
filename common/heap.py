"""Keeping full garbage collections off the request and batch paths.

A long-running process holds a large heap that lives as long as it does: modules, the model's id maps,
the catalog (serving: ~210k tracked objects). CPython's full collection walks all of it whenever enough
objects have survived into the oldest generation, a pause of ~120 ms in a serving worker (measured
in-process on the serving bench's state): one such pause at a few hundred requests a second holds up
more than 1 % of a ten-second window's requests. Frozen objects are never walked; they are still freed by
reference counting when replaced.
"""

from __future__ import annotations

import gc


def freeze_long_lived() -> None:
    """Collect everything, then freeze what is alive now. Call it once the process has loaded what it
    keeps, and again after replacing a large part of that (a model reload): unfreezing first lets the
    collection reach the replaced objects' reference cycles, which a frozen heap would keep forever."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
