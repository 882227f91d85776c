"""The slot layout's overlap: a greedy step fed on the device starts before the step before's rows are processed
(their text and events made on the rows thread). Requests that end there unexpectedly (a stop token, a stop string)
still get exactly their solo tokens, and the rows they leave are reused."""

from __future__ import annotations

import queue

from serve.test_slots import LENGTHS, PROMPTS, result, slot_lm, wait_until

from onnxpipe.serve.scheduler import make_scheduler


def _submit(sched, lm, prompt, n, stop_ids):
    out: queue.Queue = queue.Queue()

    def emit(event):
        if event[0] in ("done", "error"):
            out.put(("done", event[1].token_ids) if event[0] == "done" else event)

    sched.submit(lm.prepare(prompt, max_new_tokens=n, stop_token_ids=stop_ids), emit)
    return out


def test_rows_ending_on_a_stop_token_mid_overlap_get_their_solo_tokens(stdlib_cuda_model):
    lm = slot_lm(stdlib_cuda_model, True)
    long = [n + 12 for n in LENGTHS]
    alone = make_scheduler(lm, max_batch=3, prefill_chunk=16, max_length=128)
    alone.start()
    try:
        free = [result(_submit(alone, lm, p, n, [])) for p, n in zip(PROMPTS, long)]
        # each request stops on a token its free run produces a few steps in: an end the scheduler cannot foresee
        stops = [[ids[min(6, len(ids) - 2)]] for ids in free]
        solo = [result(_submit(alone, lm, p, n, s)) for p, n, s in zip(PROMPTS, long, stops)]
    finally:
        alone.stop()
    assert all(len(s) < len(f) and s[-1] in st for s, f, st in zip(solo, free, stops))
    sched = make_scheduler(lm, max_batch=3, prefill_chunk=16, max_length=128)
    waiting = [_submit(sched, lm, p, n, s) for p, n, s in zip(PROMPTS * 2, long * 2, stops * 2)]
    sched.start()
    try:
        assert [result(q) for q in waiting] == solo * 2
        wait_until(lambda: sched.table.free_rows() == 3)
        assert sched.stats.failed == 0
        assert sched.stats.overlapped_steps > 0  # steps ran while the step before's rows were processed
    finally:
        sched.stop()


def test_a_step_after_which_a_request_waits_is_processed_at_once_not_handed_to_the_rows_thread(stdlib_cuda_model):
    """Driven by hand on this thread (the loop's steps, no thread of the loop's own): a fed step's rows go to the
    rows thread while nothing waits; once a request waits, the step's rows are processed before the step returns
    (the admission would wait for the rows thread at once), and both requests get their solo tokens."""
    lm = slot_lm(stdlib_cuda_model, True)
    alone = make_scheduler(lm, max_batch=3, prefill_chunk=16, max_length=128)
    alone.start()
    try:
        solo = [result(_submit(alone, lm, p, 20, [])) for p in PROMPTS[:2]]
    finally:
        alone.stop()
    sched = make_scheduler(lm, max_batch=3, prefill_chunk=16, max_length=128)
    sched._started()
    try:
        first = _submit(sched, lm, PROMPTS[0], 20, [])

        def iteration() -> None:
            with sched._cond:
                allowance = sched.budget.iteration(decoding=bool(sched._running))
                sched._admit(sched.budget.chunk or 16)
            sched._drop_cancelled()
            sched._prefill(allowance)
            if sched._running:
                sched._decode_step()

        iteration()  # the prompt read, a host-fed step
        iteration()  # fed, nothing changed, nothing waits: its rows on the rows thread
        assert sched._pending is not None
        second = _submit(sched, lm, PROMPTS[1], 20, [])
        sched._decode_step()  # fed, overlapped; a request waits: this step's rows processed now
        assert sched._pending is None and sched.stats.overlapped_steps == 1
        while sched._running or sched._waiting or sched._admitted:
            iteration()
        sched._settle()
        assert [result(first), result(second)] == solo
    finally:
        sched._settle()
        sched._rows_thread.shutdown(wait=True)


def test_a_steps_rows_go_to_the_rows_thread_as_the_next_step_starts(stdlib_cuda_model):
    """The overlapped step's rows are held until the next step's run is about to start (then processed on the rows
    thread while it runs), not handed over as their own step ends, when their processing would compete with the
    loop's preparation of the next run; a step that is not run after them (here the end) processes them itself."""
    lm = slot_lm(stdlib_cuda_model, True)
    alone = make_scheduler(lm, max_batch=3, prefill_chunk=16, max_length=128)
    alone.start()
    try:
        solo = result(_submit(alone, lm, PROMPTS[0], 12, []))
    finally:
        alone.stop()
    sched = make_scheduler(lm, max_batch=3, prefill_chunk=16, max_length=128)
    sched._started()
    seen: list[tuple[bool, bool]] = []  # at each fed run's start: (rows held, rows handed over)
    step_fed = lm.session.step_fed

    def watched(cache):
        pending = sched._pending
        seen.append((sched._held is not None, pending is not None and pending[1] is not None))
        return step_fed(cache)

    lm.session.step_fed = watched
    try:
        out = _submit(sched, lm, PROMPTS[0], 12, [])
        with sched._cond:
            sched._admit(16)
        sched._prefill(sched.budget.iteration(decoding=False))
        sched._decode_step()  # host-fed: processed at once
        sched._decode_step()  # fed, nothing pending before it: its rows held, not handed over
        assert sched._pending is not None and sched._pending[1] is None and sched._held is not None
        sched._decode_step()  # fed, overlapped: the held rows handed over just before its run
        assert seen[-1] == (False, True) and sched.stats.overlapped_steps == 1
        while sched._running:
            sched._decode_step()
        sched._settle()  # the last step's rows, held: processed here
        assert sched._pending is None and sched._held is None
        assert result(out) == solo
    finally:
        lm.session.step_fed = step_fed
        sched._settle()
        sched._rows_thread.shutdown(wait=True)
