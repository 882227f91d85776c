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
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any


class Mailbox:
    """One per event loop: ``post(inbox, event)`` from any thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[Inbox, Any]] = []
        self.wakeups = 0  # times the loop was woken (information: events per wakeup = batching achieved)
        self.posted = 0

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
            inbox.ready.set()


class Inbox:
    """One request's events, read on the event loop."""

    def __init__(self, mailbox: Mailbox):
        self.mailbox = mailbox
        self.items: list[Any] = []
        self.ready = asyncio.Event()

    def emit(self, event: Any) -> None:
        """The scheduler's callback (its thread)."""
        self.mailbox.post(self, event)

    async def take(self, timeout: float) -> list[Any]:
        """Every event delivered so far (waiting at most ``timeout`` s for the first; [] if none came)."""
        if not self.items:
            try:
                await asyncio.wait_for(self.ready.wait(), timeout)
            except asyncio.TimeoutError:
                return []
        items, self.items = self.items, []
        self.ready.clear()
        return items
