"""The prefill budget (serve/budget.py): fixed, or sized so an iteration that prefills stays within
MIXED_STEP_RATIO decode steps, from the measured step and prefill times."""

from __future__ import annotations

import pytest

from onnxpipe.errors import OnnxpipeError
from onnxpipe.serve.budget import MAX_CHUNK, MIN_CHUNK, MIXED_STEP_RATIO, SHORT_TOKENS, WHOLE_PROMPT, PrefillBudget

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
    b.stepped(0.1)
    assert b.tokens(decoding=True) == MIN_CHUNK  # a step, but no prefill read while streams decode
    b.prefilled(512, 0.5, decoding=False)  # read while nothing decoded: a big chunk's cost per token says little
    assert b.tokens(decoding=True) == MIN_CHUNK


def simulate(b: PrefillBudget, step_s: float, fixed_s: float, token_s: float, iterations: int = 40) -> list[int]:
    """Mixed iterations where a decode step costs ``step_s`` and a chunk of n tokens ``fixed_s + n * token_s``."""
    sizes = []
    for _ in range(iterations):
        n = b.tokens(decoding=True)
        sizes.append(n)
        b.prefilled(n, fixed_s + n * token_s, decoding=True)
        b.stepped(step_s)
    return sizes


def test_auto_settles_where_a_chunk_costs_the_target():
    """A chunk of n tokens costs a + b n: the budget settles at (target - a) / b, the target being
    (MIXED_STEP_RATIO - 1) decode steps, from below (the first probe) and from above (a cheaper past), within a
    few tokens (it rounds down)."""
    step, a, per = 0.4, 0.1, 0.005
    want = ((MIXED_STEP_RATIO - 1) * step - a) / per  # 20 tokens
    sizes = simulate(PrefillBudget.parse("auto"), step, a, per)
    assert sizes[0] == MIN_CHUNK and want - 3 <= sizes[-1] <= want
    assert sizes == sorted(sizes)  # grows toward it without overshooting
    b = PrefillBudget(None, step_s=step, token_s=per / 4)  # measured on a cheaper part of a prompt
    sizes = simulate(b, step, a, per)
    assert sizes[0] > 3 * want and want <= sizes[-1] <= want + 3
    assert (a + sizes[-1] * per) / step <= MIXED_STEP_RATIO - 1 + 0.01


def test_auto_follows_the_cost_of_the_prompt_as_it_grows():
    """Later chunks of a long prompt cost more per token (attention over what is before them): the budget shrinks."""
    b = PrefillBudget.parse("auto")
    early = simulate(b, 0.4, 0.05, 0.004)[-1]
    late = simulate(b, 0.4, 0.05, 0.008)[-1]
    assert late < early and (0.05 + late * 0.008) <= (MIXED_STEP_RATIO - 1) * 0.4 + 0.01


def test_auto_keeps_to_its_bounds():
    assert simulate(PrefillBudget.parse("auto"), 0.1, 0.2, 0.001)[-1] == MIN_CHUNK  # a run's fixed cost passes it
    assert simulate(PrefillBudget.parse("auto"), 10.0, 0.0, 1e-6)[-1] == MAX_CHUNK  # a slow step, a cheap prefill
