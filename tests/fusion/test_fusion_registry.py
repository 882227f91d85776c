"""Every registered fusion rule has a unit test case (tests/fusion/rule_cases.py), and every case names a rule."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from rule_cases import CASES  # noqa: E402

from onnxpipe.fusion.pipeline import PASS_NAMES  # noqa: E402
from onnxpipe.fusion.registry import all_rules  # noqa: E402


def test_every_rule_has_a_unit_test() -> None:
    rules = set(all_rules())
    assert rules, "no rules registered"
    missing = sorted(rules - set(CASES))
    assert not missing, f"rules without a unit test case in rule_cases.CASES: {missing}"
    stale = sorted(set(CASES) - rules)
    assert not stale, f"test cases for rules that are not registered: {stale}"


def test_every_rule_case_has_a_near_miss() -> None:
    assert all(misses for _, _, misses, _ in CASES.values())


def test_pass_names_are_unique() -> None:
    assert len(PASS_NAMES) == len(set(PASS_NAMES))
