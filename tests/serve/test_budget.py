"""The prefill budget (serve/budget.py): fixed, or sized from the measured decode step and prefill costs so that an
iteration that prefills stays within MIXED_STEP_RATIO decode steps."""

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
    PrefillBudget,
)

pytestmark = pytest.mark.fast


def test_parse_takes_auto_or_a_positive_count():
    assert PrefillBudget.parse("auto").chunk is None and PrefillBudget.parse(" AUTO ").chunk is None
    assert PrefillBudget.parse(64).chunk == 64 and PrefillBudget.parse("64").chunk == 64
    for bad in (0, -3, "0", "x", "", 2.5, True, None):
        with pytest.raises(OnnxpipeError, match="prefill_chunk must be a positive integer or 'auto'"):
            PrefillBudget.parse(bad)


def test_a_fixed_budget_ignores_the_measurements():
    b = PrefillBudget.parse(32)
    assert b.tokens(decoding=False) == b.tokens(decoding=True) == 32 and b.largest == 32
    assert b.whole == (0, 0) and PrefillBudget.parse("auto").whole == (WHOLE_PROMPT, SHORT_TOKENS)  # auto only
    b.stepped(0.1)
    b.prefilled(1000, 0.001, decoding=True)
    assert b.tokens(decoding=True) == 32


def test_auto_reads_the_most_while_nothing_decodes_and_probes_first():
    b = PrefillBudget.parse("auto")
    assert b.tokens(decoding=False) == MAX_CHUNK == b.largest
    assert b.tokens(decoding=True) == MIN_CHUNK  # nothing measured yet
    b.prefilled(512, 0.5, decoding=False)  # read while nothing decoded: not a measure of what streams wait for
    b.stepped(0.4)
    assert b.tokens(decoding=True) == MIN_CHUNK
    b.prefilled(MIN_CHUNK, 0.1 + MIN_CHUNK * 0.005, decoding=True)
    assert b.tokens(decoding=True) == PROBE_CHUNK  # a second size, for the fixed cost
    b.prefilled(PROBE_CHUNK, 0.1 + PROBE_CHUNK * 0.005, decoding=True)
    assert b.fixed_s == pytest.approx(0.1) and b.token_s == pytest.approx(0.005)
    assert b.tokens(decoding=True) in (19, 20)  # (0.5 * 0.4 - 0.1) / 0.005


def simulate(b: PrefillBudget, step_s: float, fixed_s: float, token_s: float, iterations: int = 40) -> list[int]:
    """Mixed iterations where a decode step costs ``step_s`` and a chunk of n tokens ``fixed_s + n * token_s``."""
    sizes = []
    for _ in range(iterations):
        n = b.tokens(decoding=True)
        sizes.append(n)
        b.prefilled(n, fixed_s + n * token_s, decoding=True)
        b.stepped(step_s)
    return sizes


def cost_share(step_s: float, fixed_s: float, token_s: float, n: int) -> float:
    """A chunk's cost against a decode step's."""
    return (fixed_s + n * token_s) / step_s


def test_auto_settles_where_a_chunk_costs_the_target():
    """A chunk of n tokens costs a + b n; the target is (MIXED_STEP_RATIO - 1) decode steps: after the two probes the
    chunk costs the target. Where a was taken wrong (here 0, b measured on a cheaper part of a prompt), the chunks
    still settle at the target, within a few tokens (they round down)."""
    step, a, per = 0.4, 0.1, 0.005
    want = ((MIXED_STEP_RATIO - 1) * step - a) / per  # 20 tokens
    sizes = simulate(PrefillBudget.parse("auto"), step, a, per)
    assert sizes[:2] == [MIN_CHUNK, PROBE_CHUNK] and all(want - 1 <= n <= want for n in sizes[2:])
    b = PrefillBudget(None, step_s=step, fixed_s=0.0, token_s=per / 4, first=(MIN_CHUNK, a))
    sizes = simulate(b, step, a, per)
    assert sizes[0] > 3 * want and want - 3 <= sizes[-1] <= want + 3
    assert cost_share(step, a, per, sizes[-1]) == pytest.approx(MIXED_STEP_RATIO - 1, abs=0.02)


def test_auto_follows_the_cost_of_the_prompt_as_it_grows():
    """Later chunks of a long prompt cost more per token (attention over what is before them): the budget shrinks."""
    b = PrefillBudget.parse("auto")
    early = simulate(b, 0.4, 0.05, 0.004)[-1]
    late = simulate(b, 0.4, 0.05, 0.008)[-1]
    assert late < early and cost_share(0.4, 0.05, 0.008, late) <= MIXED_STEP_RATIO - 1 + 0.01


def test_where_a_runs_fixed_cost_passes_the_target_chunks_keep_a_share_of_it():
    """A GPU's shape: a decode step replayed as a CUDA graph (2.2 ms) costs less than a prefill run's launches (4 ms):
    no chunk meets the target, so a chunk's tokens take MIN_SHARE of it instead of shrinking to MIN_CHUNK (which
    would not shorten the iteration, only the prompt's progress)."""
    step, a, per = 0.0022, 0.004, 3.5e-6
    n = simulate(PrefillBudget.parse("auto"), step, a, per)[-1]
    assert n == pytest.approx(MIN_SHARE * (MIXED_STEP_RATIO - 1) * step / per, abs=1) and n > 8 * MIN_CHUNK


def test_auto_keeps_to_its_bounds():
    assert simulate(PrefillBudget.parse("auto"), 0.1, 0.2, 0.01)[-1] == MIN_CHUNK  # a share under MIN_CHUNK tokens
    assert simulate(PrefillBudget.parse("auto"), 10.0, 0.0, 1e-6)[-1] == MAX_CHUNK  # a slow step, a cheap prefill
    b = PrefillBudget.parse("auto")  # the probes' noise: the larger chunk came back cheaper
    b.stepped(0.4)
    b.prefilled(MIN_CHUNK, 0.2, decoding=True)
    b.prefilled(PROBE_CHUNK, 0.15, decoding=True)
    assert b.fixed_s == pytest.approx(0.15) and b.token_s == 0.0 and b.tokens(decoding=True) == MAX_CHUNK
    b.prefilled(MAX_CHUNK, 0.15 + MAX_CHUNK * 0.005, decoding=True)  # a real cost per token comes in
    assert b.tokens(decoding=True) < MAX_CHUNK
