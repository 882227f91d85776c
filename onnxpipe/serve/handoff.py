"""Events from the scheduler's thread to the HTTP event loop, at a cost that does not grow with the tokens per step.

The scheduler emits one event per running request per decode step: at batch 32 on a GPU that is over 15,000
events a second. Handing each over with its own ``loop.call_soon_threadsafe`` wakes the event loop (a write to its
self-pipe) once per event, and awaiting each with ``asyncio.wait_for`` makes a timer and a task per event; at that
rate the event loop's thread holds the GIL most of the time and the scheduler's thread waits for it between steps.
Here the scheduler's thread appends to one shared list and wakes the loop only when the list was empty (once per
burst, about once per decode step); the loop moves the events into each request's ``Inbox`` and sets its
``asyncio.Event``; a handler takes everything its inbox holds at once (``Inbox.take``), so a stream that fell behind
catches up in one write instead of one per token. asyncio offers no batched cross-thread queue; this is the small
piece it lacks.

A handler waits for its next events on a future of its own, woken by the delivery; its timeout (the server looks at
the connection every half second) is kept by one timer per event loop that looks at the waiting inboxes every TICK_S,
not by ``asyncio.wait_for``, which makes a task and a timer for every wait: at 32 streams that was a task and a timer
per token on the thread every stream's writes share (``scripts/serve_overhead.py``).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

TICK_S = 0.05  # how often the waiting inboxes' timeouts are looked at: a take times out up to this late


class Mailbox:
    """One per event loop: ``post(inbox, event)`` from any thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[Inbox, Any]] = []
        self.wakeups = 0  # times the loop was woken (information: events per wakeup = batching achieved)
        self.posted = 0
        self._waiting: dict[Inbox, float] = {}  # inboxes waiting for a first event: their deadlines (loop.time())
        self._ticking = False  # a _tick is scheduled

    def post(self, inbox: "Inbox", event: Any) -> None:
        with self._lock:
            self._pending.append((inbox, event))
            self.posted += 1
            if len(self._pending) > 1:
                return  # a wakeup is already on its way; it takes this event too
            self.wakeups += 1
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the loop is closed (shutting down): nobody is left to read the event
            pass

    def _deliver(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for inbox, event in pending:
            inbox.items.append(event)
            inbox._wake()

    # ---- on the event loop: the waiting inboxes' timeouts ----
    def _wait(self, inbox: "Inbox", timeout: float) -> "asyncio.Future[None]":
        """A future that ``inbox``'s next delivery (or its timeout, at the next tick past it) completes."""
        waiter = self.loop.create_future()
        inbox._waiter = waiter
        self._waiting[inbox] = self.loop.time() + timeout
        if not self._ticking:
            self._ticking = True
            self.loop.call_later(TICK_S, self._tick)
        return waiter

    def _tick(self) -> None:
        now = self.loop.time()
        for inbox in [i for i, deadline in self._waiting.items() if deadline <= now]:
            inbox._wake()
        if self._waiting:
            self.loop.call_later(TICK_S, self._tick)
        else:
            self._ticking = False


class Inbox:
    """One request's events, read on the event loop."""

    def __init__(self, mailbox: Mailbox):
        self.mailbox = mailbox
        self.items: list[Any] = []
        self._waiter: asyncio.Future[None] | None = None

    def emit(self, event: Any) -> None:
        """The scheduler's callback (its thread)."""
        self.mailbox.post(self, event)

    async def take(self, timeout: float) -> list[Any]:
        """Every event delivered so far (waiting for the first at most ``timeout`` s, up to TICK_S more; [] if none
        came)."""
        if not self.items:
            waiter = self.mailbox._wait(self, timeout)
            try:
                await waiter
            finally:  # woken, timed out or cancelled: no longer waiting
                if self._waiter is waiter:
                    self._waiter = None
                    self.mailbox._waiting.pop(self, None)
        items, self.items = self.items, []
        return items

    def _wake(self) -> None:
        self.mailbox._waiting.pop(self, None)
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
