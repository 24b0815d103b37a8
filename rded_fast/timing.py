"""Where a run's time goes: seconds summed per named part, from any thread (the manifest's `run.seconds`)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


class Stopwatch:
    """Sums elapsed seconds per key; safe to add to from the host stage's threads."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._lock = threading.Lock()

    def add(self, key: str, seconds: float) -> None:
        with self._lock:
            self.seconds[key] = self.seconds.get(key, 0.0) + seconds

    def timed(self, key: str, fn: Callable[..., T]) -> Callable[..., T]:
        """`fn`, its time added under `key` on each call."""

        def run(*args, **kwargs) -> T:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(key, time.perf_counter() - start)

        return run

    def waiting(self, key: str, items: Iterable[T]) -> Iterator[T]:
        """`items`, the time spent waiting for each next one added under `key`."""
        it = iter(items)
        while True:
            start = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                return
            finally:
                self.add(key, time.perf_counter() - start)
            yield item
