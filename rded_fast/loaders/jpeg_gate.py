"""The JPEG structure check of a plan's files, run ahead of DALI instead of before it.

DALI must never see a structurally broken JPEG (rded_fast/jpeg_check.py: its parser stops the pipeline on
them and has killed the process). Checking every planned file before the first batch put the check on the
critical path, more than half of the loader's time on a GPU (benchmarks/README.md, "Timings the code quotes"). Here the files are checked in plan order, in chunks, by worker
processes (threads for small plans: a process pool's start costs more than it saves there) while DALI
decodes earlier batches; DALI's feed asks for the verdicts of the batch it is about to decode and waits
only when the check is behind (`waited_s` says how long it waited in all).

Worker processes are forked (as the torch loader's DataLoader workers are) from a background thread, so
the forks never stall the thread that feeds DALI; they only read files and run numpy. A pool that breaks
(a worker killed) costs nothing but speed: its chunks are checked in the background thread instead.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from rded_fast.jpeg_check import sources_problems

CHUNK = 256  # rows per task: large enough that a task's overhead is small, small enough to run ahead soon
PROCESS_MIN_FILES = 20_000  # below this, threads (as rded_fast.index.read_sizes decides)


def checker_processes(cores: int) -> int:
    """Worker processes for the check beside DALI's own `cores` threads: one per four cores (2 to 8), enough to stay
    ahead of GPU decoding (benchmarks/README.md, "Timings the code quotes")."""
    return max(2, min(8, cores // 4))


class JpegGate:
    """Verdicts for `rows` (plan rows, ascending) whose bytes are at `source_of(row)` (a path, or (tar, offset,
    length)), asked in the background thread so that making 300k paths does not delay the first batch;
    `require_jpeg` as in `rded_fast.jpeg_check.source_problem`. Checking starts at construction.

    `processes`: True/False forces worker processes or threads; None picks by plan size (PROCESS_MIN_FILES).
    `verdicts(rows)` waits for those rows' chunks; `known()` returns what is known now without waiting;
    `close()` stops the workers. `seconds()`: the check's wall time so far and the time callers waited."""

    def __init__(
        self,
        rows: np.ndarray,
        source_of: Callable[[int], str | tuple[str, int, int]],
        require_jpeg: bool = False,
        cores: int = 1,
        processes: bool | None = None,
    ):
        self.rows = np.asarray(rows, dtype=np.int64)
        self.source_of = source_of
        self._chunks = [self.rows[i : i + CHUNK] for i in range(0, len(self.rows), CHUNK)]
        self._done: list[Future] = [Future() for _ in self._chunks]
        self.require_jpeg = require_jpeg
        use_processes = len(self.rows) >= PROCESS_MIN_FILES if processes is None else processes
        self.workers = checker_processes(cores) if use_processes else 1
        self._processes = use_processes
        self._stop = threading.Event()
        self._started = time.perf_counter()
        self._finished: float | None = None
        self.waited_s = 0.0
        self._thread = threading.Thread(target=self._run, name="jpeg-gate", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        """Check every chunk in order, handing each verdict list to its Future as it arrives. An unexpected error
        reaches whoever waits for a verdict (never a wait that does not end)."""
        done = 0
        try:
            if self._processes:
                try:
                    done = self._run_pool()
                except (BrokenProcessPool, OSError):  # a killed worker, no fork: go on in this thread
                    done = sum(f.done() for f in self._done)
            for i in range(done, len(self._chunks)):
                if self._stop.is_set():
                    break
                self._deliver(i, sources_problems(self._sources(i), self.require_jpeg))
        except BaseException as exc:
            for future in self._done:
                if not future.done():
                    future.set_exception(exc)
        finally:
            self._finished = time.perf_counter()
            for future in self._done:  # closed early: nobody waits for these any more, but none is left hanging
                if not future.done():
                    future.set_result({})

    def _run_pool(self) -> int:
        """Check the chunks in worker processes, a few per worker in flight and submitted in plan order (so the
        first verdicts come at once, not after every chunk is queued); returns how many were delivered."""
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(self.workers, mp_context=context) as pool:
            pending: deque = deque()
            submitted = done = 0
            while done < len(self._chunks) and not self._stop.is_set():
                while submitted < len(self._chunks) and len(pending) < 4 * self.workers:
                    pending.append(pool.submit(sources_problems, self._sources(submitted), self.require_jpeg))
                    submitted += 1
                self._deliver(done, pending.popleft().result())
                done += 1
            pool.shutdown(wait=True, cancel_futures=True)
        return done

    def _sources(self, i: int) -> list:
        return [self.source_of(row) for row in self._chunks[i].tolist()]

    def _deliver(self, i: int, problems: list[str | None]) -> None:
        rows = self._chunks[i].tolist()
        self._done[i].set_result({row: why for row, why in zip(rows, problems) if why is not None})

    def verdicts(self, rows) -> dict[int, str]:
        """{row: reason} for the broken ones among `rows` (rows this gate does not check are ignored), waiting
        for their chunks if the check has not reached them yet."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        at = np.searchsorted(self.rows, rows).clip(max=max(len(self.rows) - 1, 0))
        mine = rows[self.rows[at] == rows] if len(self.rows) else rows[:0]
        found: dict[int, str] = {}
        for i in np.unique(np.searchsorted(self.rows, mine) // CHUNK).tolist():
            future = self._done[i]
            if not future.done():
                t = time.perf_counter()
                future.result()
                self.waited_s += time.perf_counter() - t
            found.update(future.result())
        wanted = set(mine.tolist())
        return {r: why for r, why in found.items() if r in wanted}

    def known(self) -> dict[int, str]:
        """{row: reason} over every chunk checked so far (no waiting)."""
        found: dict[int, str] = {}
        for future in self._done:
            if future.done():
                found.update(future.result())
        return found

    def seconds(self) -> dict[str, float]:
        """`jpeg_check`: wall seconds from start to the last verdict (so far); `jpeg_check_wait`: seconds callers
        waited for verdicts (the part of the check on the loader's critical path)."""
        end = self._finished if self._finished is not None else time.perf_counter()
        return {"jpeg_check": end - self._started, "jpeg_check_wait": self.waited_s}

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
