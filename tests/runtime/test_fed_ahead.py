"""generate's greedy loop with its fed steps launched one ahead of their reads (``CudaGraphs.ahead``), on the CPU
against a stand-in for the CUDA-graph slot: the same tokens as the synced loop, never more steps launched than the
longest row still needs, at most one step beyond the one being read, and nothing left running once the loop ends
however it ends. The real launches (onnxruntime's unsynced run, the copy and event on the session's own stream) are
checked on a GPU (tests/gpu/test_cuda_graphs.py)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from onnxpipe.runtime.cuda_graphs import AHEAD_DEPTH
from onnxpipe.runtime.generate import LanguageModel

VOCAB = 50


def _next(tokens: np.ndarray) -> np.ndarray:
    return (tokens * 7 + 3) % VOCAB


class FakeAhead:
    """The device's state is each row's last token; a launched step computes the next ones (done rows too)."""

    def __init__(self, session: FakeSession):
        self.session = session
        self.launched = self.read_count = 0
        self.queue: list[np.ndarray] = []
        self.drained = self.broken = False

    @property
    def in_flight(self) -> int:
        return self.launched - self.read_count

    def launch(self) -> None:
        assert not self.drained
        assert self.in_flight < AHEAD_DEPTH + 1, "more steps launched than the reader holds"
        self.session.state = _next(self.session.state)
        self.queue.append(self.session.state.copy())
        self.launched += 1
        self.session.steps += 1
        self.session.most_in_flight = max(self.session.most_in_flight, self.in_flight)

    def read(self) -> np.ndarray:
        assert self.in_flight > 0
        self.read_count += 1
        return self.queue.pop(0)

    def drain(self) -> None:
        if self.broken:  # as a stream's sync fails again after a CUDA error
            raise RuntimeError("cudaStreamSynchronize failed (CUDA error 700)")
        self.drain_quietly()

    def drain_quietly(self) -> None:
        self.drained = True
        self.read_count = self.launched


class FakeSession:
    fed = cuda_graph = shares_buffer = True
    device, padding_side, max_positions, vocab_size = "cuda", "right", 1000, VOCAB
    manifest = SimpleNamespace(tokenizer={"eos_token_id": None})

    def __init__(self, ahead: bool):
        self.use_ahead = ahead
        self.state = np.zeros(0, np.int64)
        self.steps = self.most_in_flight = 0
        self.aheads: list[FakeAhead] = []
        self.graphs = SimpleNamespace(ahead=self._ahead)

    def _ahead(self, cache):
        if not self.use_ahead:
            return None
        self.aheads.append(FakeAhead(self))
        return self.aheads[-1]

    def can_feed(self, cache) -> bool:
        return True

    def step_fed(self, cache) -> np.ndarray:
        self.state = _next(self.state)
        self.steps += 1
        return self.state.copy()


def _model(ahead: bool) -> tuple[LanguageModel, FakeSession]:
    session = FakeSession(ahead)
    lm = LanguageModel(session, None)  # type: ignore[arg-type]

    def prefill(rows, capacity, want):  # the prompt's last token is the state; its first new token the next
        session.state = _next(np.array([r.prompt[-1] for r in rows], np.int64))
        return None, None, SimpleNamespace(capacity=capacity), session.state.copy()

    lm.prefill = prefill  # type: ignore[method-assign]
    return lm, session


def _run(ahead: bool, prompts: list[list[int]], stop: list[int], limit: int, stop_after: int | None = None):
    lm, session = _model(ahead)
    cfg = lm._config(dict(max_new_tokens=limit, stop_token_ids=stop))
    rows = lm._rows(prompts, cfg)
    loop = lm._decode(rows, cfg)
    for n, _ in enumerate(loop, 1):
        if stop_after is not None and n == stop_after:
            loop.close()  # the consumer goes away (a stream's client)
            break
    return [list(r.tokens) for r in rows], session


PROMPTS = [[1, 2, 3], [4], [9, 9, 9, 9, 9]]


@pytest.mark.parametrize("limit", [1, 2, 3, 12])
def test_ahead_gives_the_synced_tokens_and_steps(limit):
    synced, plain = _run(False, PROMPTS, [], limit)
    got, session = _run(True, PROMPTS, [], limit)
    assert got == synced and all(len(t) == limit for t in got)
    # no step launched that the synced loop did not run: the last row's limit bounds both
    assert session.steps == plain.steps == limit - 1
    assert 1 <= session.most_in_flight <= AHEAD_DEPTH + 1 or limit == 1
    assert all(a.drained for a in session.aheads)


def test_rows_that_stop_early_are_stepped_unread_within_the_longest_rows_need():
    # row 1's chain (4 -> 31 -> 20 -> 43 ...) meets the stop id 20 at its second token; the others run to 10
    synced, plain = _run(False, PROMPTS, [20], 10)
    got, session = _run(True, PROMPTS, [20], 10)
    assert got == synced
    assert got[1][-1] == 20 and len(got[1]) < 10 and max(len(t) for t in got) == 10
    assert session.steps == plain.steps


def test_a_consumer_that_leaves_drains_the_launched_steps():
    got, session = _run(True, PROMPTS, [], 12, stop_after=3)
    assert all(len(t) == 3 for t in got)
    assert session.aheads and all(a.drained and a.in_flight == 0 for a in session.aheads)
    assert session.steps <= 3 + AHEAD_DEPTH  # what was launched before the consumer left: at most one unread


def test_a_step_that_fails_raises_its_own_error_and_leaves_nothing_running():
    lm, session = _model(True)
    cfg = lm._config(dict(max_new_tokens=12, stop_token_ids=[]))
    rows = lm._rows(PROMPTS, cfg)
    loop = lm._decode(rows, cfg)
    next(loop), next(loop), next(loop)  # the fed steps launched ahead by now
    (a,) = session.aheads

    def failing() -> np.ndarray:
        a.broken = True
        raise RuntimeError("cudaEventSynchronize failed (CUDA error 700)")

    a.read = failing  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="cudaEventSynchronize failed") as e:
        next(loop)
    assert e.value.__context__ is None  # the read's own error, not the sync's on the way out
    assert a.drained and a.in_flight == 0


def test_without_a_stream_the_loop_is_the_synced_one():
    got, session = _run(False, PROMPTS, [], 5)
    assert not session.aheads and session.steps == 4
    assert got[0][:2] == [int(_next(np.array([3]))[0]), int(_next(_next(np.array([3])))[0])]


def test_no_stream_of_our_own_where_there_is_nothing_to_launch_ahead(monkeypatch):
    import onnxruntime as ort

    from onnxpipe.runtime.session import _own_stream

    monkeypatch.setenv("ONNXPIPE_AHEAD", "0")
    assert _own_stream(ort, "cuda", None) == (None, "turned off (ahead=False or ONNXPIPE_AHEAD=0)")
    monkeypatch.delenv("ONNXPIPE_AHEAD")
    assert _own_stream(ort, "cuda", False)[0] is None
    assert _own_stream(ort, "cpu", True) == (None, "no CUDA EP")  # the CPU chain has no CUDA EP to give it to
