"""The thread that processes a decode step's rows while the next step runs (the slot layout's overlap), and the
handoff to it, at a cost the scheduler's serial path can afford.

Between one decode step's end and the next one's start the scheduler's thread hands the step's rows over and, a step
later, takes the result back: twice per step, on the path that keeps the device waiting. ``ThreadPoolExecutor``'s
``submit`` makes a ``Future`` (a ``Condition`` and its lock), a work item and a semaphore round trip per call; here a
job is one lock, taken when it is made and released when it is done, and the queue a ``queue.SimpleQueue`` (C). On the
2-core machine a submit to the waiting thread took 5.1 against 2.5 us at p50 in a hot loop, and 33-39 against 20-27
us as the first call after a 1.7 ms sleep (as the loop's thread makes it after a step; waking the thread is most of
that, and stays). Jobs run in the order submitted.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable

_STOP = None


class Job:
    """One submitted call: ``result()`` waits for it (releasing the GIL while it waits) and returns its value or
    raises its exception; ``done()`` says whether it has finished."""

    __slots__ = ("_lock", "_value", "_error")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()  # released once the call has finished
        self._value: Any = None
        self._error: BaseException | None = None

    def done(self) -> bool:
        return not self._lock.locked()

    def result(self) -> Any:
        with self._lock:  # blocks until the worker releases it
            pass
        if self._error is not None:
            raise self._error
        return self._value


class RowsWorker:
    """One thread running submitted calls in order: ``submit(fn, *args) -> Job``, ``shutdown()``."""

    def __init__(self, name: str = "onnxpipe-rows"):
        self._queue: queue.SimpleQueue[tuple[Job, Callable[..., Any], tuple[Any, ...]] | None] = queue.SimpleQueue()
        self._closed = False
        self._closing = threading.Lock()  # a submit and a shutdown in two threads: no job queued after the end
        self.thread = threading.Thread(target=self._work, name=name, daemon=True)
        self.thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Job:
        job = Job()
        with self._closing:
            if self._closed:
                raise RuntimeError("the rows worker is shut down")
            self._queue.put((job, fn, args))
        return job

    def shutdown(self, wait: bool = True) -> None:
        """Run what was submitted, then end the thread (``wait``: until it has ended)."""
        with self._closing:
            if not self._closed:
                self._closed = True
                self._queue.put(_STOP)
        if wait and self.thread is not threading.current_thread():
            self.thread.join()

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            job, fn, args = item
            try:
                job._value = fn(*args)
            except BaseException as e:  # handed to the caller of result(), as a Future does
                job._error = e
            finally:
                job._lock.release()
