"""The scheduler-thread -> event-loop handoff: order kept, one wakeup per burst, nothing lost across requests."""

from __future__ import annotations

import asyncio
import threading

import pytest

from onnxpipe.serve.handoff import TICK_S, Inbox, Mailbox

pytestmark = pytest.mark.fast


def test_a_burst_posted_while_the_loop_is_busy_wakes_it_once_and_arrives_in_order():
    async def main() -> tuple[list[list[int]], Mailbox]:
        box = Mailbox(asyncio.get_running_loop())
        a, b = Inbox(box), Inbox(box)

        def producer() -> None:  # the scheduler's thread: one "step" emits to both requests, 50 steps
            for i in range(50):
                a.emit(i)
                b.emit(100 + i)

        t = threading.Thread(target=producer)
        t.start()
        t.join()  # the loop did not run meanwhile: everything is pending in one burst
        got_a = await a.take(1.0)
        got_b = await b.take(1.0)
        return [got_a, got_b], box

    (got_a, got_b), box = asyncio.run(main())
    assert got_a == list(range(50)) and got_b == list(range(100, 150))
    assert box.posted == 100 and box.wakeups == 1


def test_take_waits_for_the_first_event_and_times_out_empty():
    async def main() -> tuple[list[int], list[int], Mailbox]:
        box = Mailbox(asyncio.get_running_loop())
        inbox = Inbox(box)
        empty = await inbox.take(0.01)
        loop = asyncio.get_running_loop()
        loop.call_later(0.02, lambda: threading.Thread(target=inbox.emit, args=(7,)).start())
        first = await inbox.take(2.0)
        return empty, first, box

    empty, first, box = asyncio.run(main())
    assert empty == [] and first == [7] and box.wakeups == 1


def test_events_interleaved_with_deliveries_are_neither_lost_nor_duplicated():
    async def main() -> list[int]:
        box = Mailbox(asyncio.get_running_loop())
        inbox = Inbox(box)

        def producer() -> None:
            for i in range(2000):
                inbox.emit(i)

        t = threading.Thread(target=producer)
        t.start()
        got: list[int] = []
        while len(got) < 2000:
            got += await inbox.take(2.0)
        t.join()
        return got

    assert asyncio.run(main()) == list(range(2000))


def test_a_take_waits_on_a_future_of_its_own_not_a_task_and_a_timer_per_wait():
    async def main() -> tuple[int, int, list[int]]:
        box = Mailbox(asyncio.get_running_loop())
        inboxes = [Inbox(box) for _ in range(8)]
        before = len(asyncio.all_tasks())
        takers = [asyncio.create_task(i.take(5.0)) for i in inboxes]
        await asyncio.sleep(0.01)  # every take is waiting now
        waiting = len(asyncio.all_tasks()) - before  # the 8 takers; asyncio.wait_for added a task per wait
        timers = len(asyncio.get_running_loop()._scheduled)  # type: ignore[attr-defined]  # one tick for all
        threading.Thread(target=lambda: [i.emit(n) for n, i in enumerate(inboxes)]).start()
        got = [x for t in takers for x in await t]
        return waiting, timers, got

    waiting, timers, got = asyncio.run(main())
    assert waiting == 8 and timers == 1 and got == list(range(8))


def test_timed_out_and_cancelled_takes_leave_nothing_waiting_and_the_tick_stops():
    async def main() -> tuple[list[int], int, bool, list[int]]:
        box = Mailbox(asyncio.get_running_loop())
        inbox, other = Inbox(box), Inbox(box)
        empty = await inbox.take(0.01)  # times out at the next tick past 10 ms
        task = asyncio.create_task(other.take(5.0))
        await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        left = len(box._waiting)
        await asyncio.sleep(3 * TICK_S)
        threading.Thread(target=inbox.emit, args=(3,)).start()  # a later event still arrives
        return empty, left, box._ticking, await inbox.take(2.0)

    empty, left, ticking, later = asyncio.run(main())
    assert empty == [] and left == 0 and not ticking and later == [3]
