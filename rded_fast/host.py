"""The host stage: a class's select -> stitch -> encode -> write -> journal, off the scoring thread.

`HostStage(commit).submit(prepare)` returns at once (unless `depth` classes are already in flight, the
bounded queue that keeps memory flat): `prepare()` (selection, stitching, encoding: numpy, torch and
PIL's encoders release the GIL) runs in a small thread pool, and `commit([prepared, ...])` (write the
files durably, then journal) runs on one writer thread, in submission order, over every class that is
queued when it starts (up to `max_batch`), so one durability pass covers several classes when the stage
is busy. The journal's guarantee is unchanged: a class is recorded only after its files are durable.
The first error stops the stage: later classes are not committed, and the error is raised to the
scoring thread at its next `submit` or at `close`.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from rded_fast.device import available_cores


def default_host_workers(device: torch.device) -> int:
    """Threads for `prepare`: one on a CPU run (the cores score); beside a GPU, whose scoring thread mostly
    waits, half the cores, at least 2 and at most 8 (a 224 px class of 10 PNGs is ~40 ms of CPU, a GPU
    scores a class in ~25 ms)."""
    if device.type != "cuda":
        return 1
    return max(2, min(8, available_cores() // 2))


class HostStage:
    """A bounded two-step pipeline (pool for `prepare`, one ordered, batching writer for `commit`); see the module doc.

    `waited` is the seconds `submit` spent blocked because `depth` classes were in flight: the time the
    scorer waited for host work."""

    def __init__(self, commit: Callable[[list], None], workers: int = 1, depth: int | None = None, max_batch: int = 8):
        self.commit, self.max_batch = commit, max(1, int(max_batch))
        self.workers = max(1, int(workers))
        self.depth = int(depth) if depth else self.workers + 1
        self.waited = 0.0
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="rded-host")
        self._queue: queue.Queue = queue.Queue(maxsize=self.depth)
        self._error: BaseException | None = None
        self._writer = threading.Thread(target=self._write_loop, name="rded-host-writer", daemon=True)
        self._writer.start()

    def submit(self, prepare: Callable[[], Any]) -> None:
        """Queue one class; raises the stage's first error, if any."""
        self._raise_error()
        future = self._pool.submit(prepare)
        t = time.perf_counter()
        self._queue.put(future)
        self.waited += time.perf_counter() - t

    def close(self, wait: bool = True) -> None:
        """Finish (wait) or drop (not wait: after an error elsewhere) the queued classes; raise the first error."""
        if not wait:
            self._error = self._error or _Stopped()
        self._queue.put(None)
        self._writer.join()
        self._pool.shutdown(wait=True, cancel_futures=not wait)
        if wait:
            self._raise_error()

    def __enter__(self) -> "HostStage":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(wait=exc_type is None)

    def _raise_error(self) -> None:
        if self._error is not None and not isinstance(self._error, _Stopped):
            raise self._error

    def _write_loop(self) -> None:
        while True:
            batch = [self._queue.get()]
            while batch[-1] is not None and len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            futures = [f for f in batch if f is not None]
            if self._error is not None:
                for future in futures:
                    future.cancel()
            elif futures:
                try:
                    self.commit([future.result() for future in futures])
                except BaseException as exc:  # handed to the scoring thread
                    self._error = exc
            if batch[-1] is None:
                return


class _Stopped(Exception):
    """Marks a stage closed without committing the rest (the scoring thread already has its own error)."""


__all__ = ["HostStage", "default_host_workers"]
