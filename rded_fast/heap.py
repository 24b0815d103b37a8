"""Keep Python's cycle collector off the objects that live through a long stage.

Before a stage that forks loader workers and runs for long, everything the process made so far (torch and its
modules, the index, the plan, the observer: about a million objects) is moved out of the collector's reach with
`gc.freeze()`. Otherwise a full collection walks all of them: in the main process that is tens of milliseconds each
time one falls due, and in a forked worker it writes to every page of the heap it shares with its parent, so the
kernel copies those pages (hundreds of page faults per image decoded were measured in the torch loader's workers,
and 1.2 s of distill's class stage became 1.5 s when one fell due there; benchmarks/README.md). When a full
collection falls due depends on everything allocated before, so this is also what keeps a stage's speed from
changing with unrelated edits (the order modules are imported in).
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

_depth = 0  # frozen() blocks open in this process


@contextmanager
def frozen() -> Iterator[None]:
    """The block runs with every object made before it out of the collector's reach (they are collected again,
    as usual, once it ends). A block inside another freezes what was made since the outer one began (a run's
    setup, before its long stage); all is unfrozen when the outermost block ends."""
    global _depth
    gc.freeze()
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            gc.unfreeze()
