"""Whole prompts' runs padded to a few widths, and those shapes run once at start (row_prefill's ``pad_to`` and
``RowPrefill.warm_shapes``): on a GPU the first run of each new [k, width] costs the CUDA EP ~10 ms (run 52), so with
``ONNXPIPE_PREFILL_PAD`` (opt-in until measured on a GPU) a server pads runs from position 0 to a multiple and, on a
GPU, runs the likely shapes while its rows are empty. The padding must not change a token: it runs as tokens of the
row after its prompt, written over before anything reads them."""

from __future__ import annotations

import pytest
from serve.test_slots import LENGTHS, PROMPTS, served, slot_lm, solo_results, thirteen_requests

from onnxpipe.errors import OnnxpipeError
from onnxpipe.serve import row_prefill
from onnxpipe.serve.row_prefill import RowPrefill
from onnxpipe.serve.scheduler import make_scheduler


def recorded_widths(monkeypatch) -> list[tuple[int, int, int]]:
    """(rows, width, first position) of every run of RowPrefill._run."""
    seen: list[tuple[int, int, int]] = []
    original = RowPrefill._run

    def _run(self, row, ids, mask, positions, last, what, logits=True, want="logits"):
        seen.append((ids.shape[0], ids.shape[1], int(positions[0, 0])))
        return original(self, row, ids, mask, positions, last, what, logits, want)

    monkeypatch.setattr(RowPrefill, "_run", _run)
    return seen


@pytest.mark.fast
def test_the_padding_multiple_is_one_unless_set_and_checked(monkeypatch):
    monkeypatch.delenv("ONNXPIPE_PREFILL_PAD", raising=False)
    assert row_prefill.pad_to() == 1
    monkeypatch.setenv("ONNXPIPE_PREFILL_PAD", " 32 ")
    assert row_prefill.pad_to() == 32
    for bad in ("0", "513", "nan", "x", "1.5"):
        monkeypatch.setenv("ONNXPIPE_PREFILL_PAD", bad)
        with pytest.raises(OnnxpipeError, match="ONNXPIPE_PREFILL_PAD must be an integer from 1 to 512"):
            row_prefill.pad_to()


@pytest.mark.parametrize("group", [1, 4])
def test_padded_runs_give_every_request_its_solo_tokens(stdlib_cuda_model, group, monkeypatch):
    """13 requests on 4 rows (greedy and seeded), whole prompts read alone (group 1) or up to 4 in a run, every run
    from position 0 padded to a multiple of 32: the tokens of unpadded solo runs; chunks from later positions keep
    their widths."""
    monkeypatch.delenv("ONNXPIPE_PREFILL_PAD", raising=False)
    lm = slot_lm(stdlib_cuda_model, True)
    sampled = {"temperature": 0.9, "top_k": 50, "seed": 3}
    solo, solo_sampled, alone = solo_results(lm, sampled)  # unpadded (the default)
    assert alone.rows.pad_to == 1
    monkeypatch.setenv("ONNXPIPE_PREFILL_PAD", "32")
    widths = recorded_widths(monkeypatch)
    sched = make_scheduler(lm, max_batch=4, prefill_chunk="auto", max_length=128, prefill_group=group)
    assert sched.rows.pad_to == 32
    assert thirteen_requests(sched, lm, sampled) == solo * 2 + [solo_sampled]
    assert sched.stats.failed == 0
    from_zero = [w for _, w, start in widths if start == 0]
    assert from_zero and all(w % 32 == 0 for w in from_zero), widths
    assert (group > 1) == any(k > 1 for k, _, _ in widths)


def test_warm_shapes_runs_each_padded_shape_once_and_the_rows_then_serve_as_before(stdlib_cuda_model, monkeypatch):
    monkeypatch.delenv("ONNXPIPE_PREFILL_PAD", raising=False)
    lm = slot_lm(stdlib_cuda_model, True)
    solo, _, _ = solo_results(lm, {"temperature": 0.9, "top_k": 50, "seed": 3})
    sched = make_scheduler(lm, max_batch=4, prefill_chunk="auto", max_length=128, prefill_group=3)
    assert sched.rows.warm_shapes(3) == 0  # widths not padded: no bounded set of shapes to run
    sched.rows.pad_to = 32
    widths = recorded_widths(monkeypatch)
    assert sched.rows.warm_shapes(3, widest=96) == 3 * 3 + 3  # widths 32, 64, 96 x 1-3 prompts, the first's logits
    assert sorted(set(widths)) == [(k, w, 0) for k in (1, 2, 3) for w in (32, 64, 96)]
    cap = sched.cache.capacity  # 128 rounded up to the slot's bucket
    assert cap < row_prefill.WARM_WIDTH and sched.rows.warm_shapes(2) == 2 * (cap // 32) + 2  # to the capacity
    widths.clear()  # at most 128 tokens a run: 1-3 prompts of 32, 1-2 of 64, one of 96 (and the logits at 32)
    assert sched.rows.warm_shapes(3, widest=96, tokens=128) == 3 + 2 + 1 + 3
    assert max(k * w for k, w, _ in widths) == 128
    # the rows the warm-up wrote serve requests as if it had not run
    sched.rows.pad_to = 1
    assert served(sched, lm, [(p, n, {}) for p, n in zip(PROMPTS, LENGTHS)]) == solo


def test_a_gpu_schedulers_start_warms_the_shapes_once_and_a_failure_is_kept(stdlib_cuda_model, monkeypatch):
    """``_started`` runs ``warm_shapes`` on a GPU session (here the CPU session called a GPU's for that call) while
    its rows are empty, up to its prefill group; a warm-up that fails is kept in ``stats.warm_error``."""
    monkeypatch.delenv("ONNXPIPE_PREFILL_PAD", raising=False)
    lm = slot_lm(stdlib_cuda_model, True)
    made: list[tuple[int, int]] = []
    monkeypatch.setattr(RowPrefill, "warm_shapes", lambda self, most, pad_id=0: made.append((most, pad_id)) or 7)
    sched = make_scheduler(lm, max_batch=4, prefill_chunk=16, max_length=128, prefill_group=2)
    monkeypatch.setattr(lm.session, "device", "cuda")
    sched._started()
    sched._rows_thread.shutdown(wait=True)
    assert made == [(2, sched.table.pad_id)] and sched.stats.warmed_shapes == 7 and not sched.stats.warm_error
    sched._started()  # warmed already: not again
    sched._rows_thread.shutdown(wait=True)
    assert len(made) == 1

    def fails(self, most, pad_id=0):
        raise RuntimeError("out of memory\nmore lines")

    monkeypatch.setattr(RowPrefill, "warm_shapes", fails)
    other = make_scheduler(lm, max_batch=4, prefill_chunk=16, max_length=128)
    other._started()
    other._rows_thread.shutdown(wait=True)
    assert other.stats.warmed_shapes == 0 and other.stats.warm_error == "out of memory"
    monkeypatch.setattr(lm.session, "device", "cpu")  # on the CPU: no warm-up
    third = make_scheduler(lm, max_batch=4, prefill_chunk=16, max_length=128)
    third._started()
    third._rows_thread.shutdown(wait=True)
    assert third.stats.warm_error == "" and third.stats.warmed_shapes == 0
