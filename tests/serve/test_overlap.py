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
