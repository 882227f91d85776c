"""click parameter types for bounded numbers: every float option is finite, every thread count bounded.

click's ``FloatRange`` lets ``nan`` through (NaN fails no comparison) and ``inf`` wherever a side is unbounded:
``--repetition-penalty nan`` then generated one token forever and ``--temperature nan`` died in numpy. These types
fail at parse time instead, with click's one line naming the option and exit code 2.
"""

from __future__ import annotations

import math
from typing import Any

import click

from onnxpipe.runtime.limits import MAX_REPEATS, MAX_REPETITION_PENALTY, MAX_THREADS_PER_CPU, max_threads

__all__ = ["FiniteFloat", "Threads", "finite", "MAX_REPEATS", "MAX_REPETITION_PENALTY"]


class FiniteFloat(click.FloatRange):
    """A finite float, optionally within [min, max] (ends open where asked), like ``click.FloatRange``."""

    name = "finite float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return super().convert(number, param, ctx)

    def _describe_range(self) -> str:
        if self.min is None and self.max is None:  # click's own text would read "x<=None"
            return "finite"
        return super()._describe_range()

    def __repr__(self) -> str:
        return f"FiniteFloat({self._describe_range()})"


class Threads(click.IntRange):
    """A thread count: 1 .. MAX_THREADS_PER_CPU x the CPUs this process may use (more hung session creation)."""

    name = "threads"

    def __init__(self) -> None:
        super().__init__(1, max_threads())

    def _describe_range(self) -> str:
        return f"1<=x<={self.max} ({MAX_THREADS_PER_CPU} per usable CPU)"


def finite(low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False) -> FiniteFloat:
    return FiniteFloat(low, high, min_open=low_open, max_open=high_open)
