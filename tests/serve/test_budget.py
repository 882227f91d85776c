"""The prefill budget (serve/budget.py): fixed, or with auto the runs that fit (MIXED_STEP_RATIO - 1) decode steps,
sized from a cost model of a run (fixed + per token + per token and position before it) fitted on measured runs."""

from __future__ import annotations

import pytest

from onnxpipe.errors import OnnxpipeError
from onnxpipe.serve.budget import (
    MAX_CHUNK,
    MIN_CHUNK,
    MIN_SHARE,
    MIXED_STEP_RATIO,
    PROBE_CHUNK,
    SHORT_TOKENS,
    WHOLE_PROMPT,
    WINDOW,
    PrefillBudget,
    RunCost,
)

pytestmark = pytest.mark.fast

CPU = RunCost(fixed=0.04, token=0.0027, context=1.26e-6)  # SmolLM2-135M fp32 on the 2-core CPU, idle (measured)


def test_parse_takes_auto_or_a_positive_count():
    assert PrefillBudget.parse("auto").chunk is None and PrefillBudget.parse(" AUTO ").chunk is None
    assert PrefillBudget.parse(64).chunk == 64 and PrefillBudget.parse("64").chunk == 64
    for bad in (0, -3, "0", "x", "", 2.5, True, None):
        with pytest.raises(OnnxpipeError, match="prefill_chunk must be a positive integer or 'auto'"):
            PrefillBudget.parse(bad)


def test_a_fixed_budget_is_tokens_an_iteration_shared_by_its_runs_and_ignores_the_measurements():
    b = PrefillBudget.parse(32)
    assert b.largest == 32 and b.whole == (0, 0) and PrefillBudget.parse("auto").whole == (WHOLE_PROMPT, SHORT_TOKENS)
    b.stepped(0.1)
    a = b.iteration(decoding=True)
    assert a.next(0, 1000) == 32 and a.next(0, 10) == 10
    a.ran(10, 0, 0.001)  # the first prompt's last 10 tokens: the next prompt gets the rest
    assert a.next(0, 1000) == 22
    a.ran(22, 0, 5.0)
    assert a.next(22, 1000) == 0 and not b.runs and b.tokens(decoding=True) == 32


def test_auto_reads_the_most_while_nothing_decodes_and_probes_first():
    b = PrefillBudget.parse("auto")
    assert b.tokens(decoding=False) == MAX_CHUNK == b.largest
    a = b.iteration(decoding=False)
    a.ran(MAX_CHUNK, 0, 0.5)  # read while nothing decoded: not a measure of what streams wait for
    assert a.next(MAX_CHUNK, 10_000) == 0 and not b.runs
    assert b.tokens(decoding=True) == MIN_CHUNK  # nothing measured yet
    b.stepped(0.4)
    a = b.iteration(decoding=True)
    assert a.next(0, 4096) == MIN_CHUNK
    a.ran(MIN_CHUNK, 0, CPU.seconds(MIN_CHUNK, 0))
    assert a.next(MIN_CHUNK, 4096) == 0  # one probe an iteration
    assert b.tokens(decoding=True, start=MIN_CHUNK) == PROBE_CHUNK  # a second size, for the fixed cost
    b.iteration(decoding=True).ran(PROBE_CHUNK, MIN_CHUNK, CPU.seconds(PROBE_CHUNK, MIN_CHUNK))
    m = b.model
    assert m is not None and m.fixed == pytest.approx(CPU.fixed, rel=0.05) and m.context == 0  # 2 points: no context
    n = b.tokens(decoding=True, start=40)
    assert CPU.seconds(n, 40) == pytest.approx(b.target_s, rel=0.05)  # (0.5 * 0.4 - 0.04) / 0.0027 ~ 59


def read_prompt(b: PrefillBudget, cost: RunCost, step_s: float, length: int) -> list[tuple[int, int, float]]:
    """Iterations reading a prompt of ``length`` tokens beside streams whose decode step costs ``step_s``; runs
    cost ``cost``. Returns each iteration's (start, tokens read, prefill seconds)."""
    out, start = [], 0
    while start < length:
        a = b.iteration(decoding=True)
        n = a.next(start, length - start)
        seconds = a.spent_s
        if n:
            a.ran(n, start, cost.seconds(n, start))
            seconds = a.spent_s
        out.append((start, n, seconds))
        start += n
        b.stepped(step_s)
    return out


def test_auto_keeps_each_iterations_prefill_at_the_target_along_a_long_prompt():
    """The cost of a token grows along a prompt (attention over what is before it): the chunks shrink as the prompt
    is read, each iteration's prefill at the target (after the two probes), whatever the position."""
    step = 0.25
    target = (MIXED_STEP_RATIO - 1) * step
    its = read_prompt(PrefillBudget.parse("auto"), CPU, step, 4096)
    assert [n for _, n, _ in its[:2]] == [MIN_CHUNK, PROBE_CHUNK]
    rest = its[2:]
    assert all(s <= target * 1.02 for *_, s in rest)  # never past it
    one_more = lambda p, n: CPU.token + CPU.context * (p + n)  # noqa: E731  (a token's cost there)
    assert all(s + one_more(p, n) > target for p, n, s in rest[:-1])  # nor a token under (the last reads what is left)
    sizes = [n for _, n, _ in rest[:-1]]
    assert sizes[0] > 2 * sizes[-1] and sizes == sorted(sizes, reverse=True)


def test_short_prompts_read_in_the_same_iteration_count_against_the_target_run_by_run():
    """Two 64-token prompts read whole every other iteration (a run each, each paying the fixed cost): the long
    prompt's chunk gets what is left of the target, and the model, fitted per run, keeps the fixed cost apart (an
    iteration's total over its tokens would not)."""
    step = 1.2
    target = (MIXED_STEP_RATIO - 1) * step
    b = PrefillBudget.parse("auto")
    b.stepped(step)
    start, its = 0, []
    for i in range(60):
        a = b.iteration(decoding=True)
        for _ in range(2 if i % 2 else 0):
            a.ran(64, 0, CPU.seconds(64, 0))
        n = a.next(start, 4096 - start)
        if n:
            a.ran(n, start, CPU.seconds(n, start))
        its.append((start, n, a.spent_s, i % 2))
        start += n
    assert b.model is not None and b.model.fixed == pytest.approx(CPU.fixed, rel=0.05)
    measured = its[4:]  # after the probes
    assert all(s <= target * 1.02 for _, _, s, _ in measured)
    assert all(s + CPU.token + CPU.context * (p + n) > target for p, n, s, _ in measured)  # within a token of it
    with_shorts = [n for _, n, _, shorts in measured if shorts]
    without = [n for _, n, _, shorts in measured if not shorts]
    assert min(with_shorts) > MIN_CHUNK and max(with_shorts) < min(without)  # what is left of the target
    a = b.iteration(decoding=True)
    for _ in range(4):
        a.ran(64, 0, 0.15)  # a slow moment: the shorts took the whole target
    assert a.next(1000, 1000) == 0  # not a run past the target; the long prompt goes on next iteration


def test_where_a_runs_fixed_cost_passes_the_target_the_first_run_keeps_a_share_of_it():
    """A GPU's shape: a decode step replayed as a CUDA graph (2.2 ms) costs less than a prefill run's launches (4 ms):
    no chunk meets the target, so the first run's tokens take MIN_SHARE of it instead of shrinking to MIN_CHUNK
    (which would not shorten the iteration, only the prompt's progress)."""
    gpu = RunCost(fixed=0.004, token=3.5e-6, context=0.0)
    step = 0.0022
    its = read_prompt(PrefillBudget.parse("auto"), gpu, step, 4096)
    n = its[4][1]
    assert n == pytest.approx(MIN_SHARE * (MIXED_STEP_RATIO - 1) * step / gpu.token, abs=2) and n > 8 * MIN_CHUNK


def test_auto_keeps_to_its_bounds():
    slow = read_prompt(PrefillBudget.parse("auto"), RunCost(0.2, 0.01, 0.0), 0.1, 200)  # under MIN_CHUNK fit
    assert [n for _, n, _ in slow[2:-1]] == [MIN_CHUNK] * len(slow[2:-1])
    cheap = read_prompt(PrefillBudget.parse("auto"), RunCost(0.0, 1e-6, 0.0), 10.0, 4096)  # a slow step
    assert cheap[2][1] == MAX_CHUNK
    b = PrefillBudget.parse("auto")  # the probes' noise: the larger run came back cheaper
    b.stepped(0.4)
    b.ran(MIN_CHUNK, 0, 0.2)
    b.ran(PROBE_CHUNK, MIN_CHUNK, 0.15)
    assert b.model == RunCost(pytest.approx(0.175), 0.0, 0.0) and b.tokens(decoding=True) == MAX_CHUNK
    for start in range(40, 600, 100):
        b.ran(100, start, 0.15 + 100 * 0.005)  # a real cost per token comes in
    assert MIN_CHUNK < b.tokens(decoding=True) < MAX_CHUNK


def test_the_cost_model_fits_runs_of_several_rows_and_inverts():
    runs = [(r, n, p, CPU.seconds(n, p, rows=r)) for r, n, p in [(1, 8, 0), (4, 64, 0), (1, 100, 2000), (2, 30, 0)]]
    m = RunCost.fit(runs)
    assert m is not None
    for field in ("fixed", "token", "context"):
        assert getattr(m, field) == pytest.approx(getattr(CPU, field), rel=1e-6)
    for start in (0, 1000, 4000):
        n = CPU.tokens(0.3, start)
        assert CPU.seconds(n, start) <= 0.3 < CPU.seconds(n + 1, start)
    assert CPU.tokens(0.01, 0) == 0 and RunCost.fit([(1, 8, 0, 0.1)] * 3) is None  # one size: no model


def test_a_wrong_early_measurement_washes_out_of_the_window():
    """Nothing is held from the first runs: a run that took 0.8 s (the machine busy elsewhere) and a probe that came
    back cheap skew the model only while they are among the last WINDOW runs; after that every iteration's prefill
    is at the target again (a fixed cost estimated once from them and kept let chunks settle at 5x the target)."""
    step = 0.3
    target = (MIXED_STEP_RATIO - 1) * step
    b = PrefillBudget.parse("auto")
    b.stepped(step)
    b.ran(64, 0, 0.8)
    b.ran(MIN_CHUNK, 0, 0.01)
    its = read_prompt(b, CPU, step, 4096)
    assert len(its) > WINDOW + 10
    settled = its[WINDOW:-1]
    assert all(target - (CPU.token + CPU.context * (p + n)) < s <= target * 1.02 for p, n, s in settled)
