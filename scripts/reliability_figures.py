"""Run the adversarial suite and print what it tried: inputs per reader, clean errors, kill cycles, records lost.

    python scripts/reliability_figures.py            # the option bounds, hostile inputs and kill tests
    python scripts/reliability_figures.py --no-kill  # without the kill -9 cycles (about a third of the time)

The counts come from the tests themselves (each test module keeps a ``FIGURES`` counter of what it tried and how
each case came out); this script runs them through pytest and prints one Markdown table, the one in
docs/reliability.md ("Figures"). It exits non-zero if any test failed.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TESTS = ["tests/reliability/test_options.py", "tests/reliability/test_hostile_inputs.py",
         "tests/reliability/test_kill.py"]

# (reader as counted in FIGURES, how the table names it)
READERS = [
    ("score record", "score record parser: JSON values and record objects"),
    ("score line", "score JSONL reader: raw lines (bytes, bad UTF-8, lone surrogates)"),
    ("manifest", "manifest reader: mutated valid manifests, arbitrary text"),
    ("gguf", "GGUF header: truncated and mutated files"),
    ("gguf crafted", "GGUF header: crafted counts, lengths (2**60 items, ...) and value types"),
    ("cli", "CLI numeric option values (generate, bench, score, quantize, export, optimize)"),
    ("sampling option", "SamplingConfig fields: any number, string, None, bool"),
    ("sampling", "next_token: accepted options x finite logits"),
]


class Collect:
    """A pytest plugin: test outcomes, and the FIGURES counters of the test modules once they have run."""

    def __init__(self) -> None:
        self.outcomes: Counter = Counter()
        self.cases: Counter = Counter()  # passed test cases per module
        self.figures: Counter = Counter()

    def pytest_runtest_logreport(self, report) -> None:  # noqa: ANN001
        if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
            self.outcomes[report.outcome] += 1
            if report.outcome == "passed":
                self.cases[Path(report.nodeid.split("::")[0]).name] += 1

    def pytest_sessionfinish(self, session) -> None:  # noqa: ANN001
        for module in list(sys.modules.values()):
            names = getattr(module, "__dict__", {})  # not getattr(module, ...): lazy modules import on it
            figures = names.get("FIGURES")
            if isinstance(figures, Counter) and Path(str(names.get("__file__"))).name in {Path(t).name for t in TESTS}:
                self.figures.update(figures)


def table(c: Collect, seconds: float) -> str:
    f = c.figures
    lines = ["| what the suite tries | inputs | clean errors | accepted | other outcome |", "|---|---|---|---|---|"]
    for key, name in READERS:
        tried = f[f"{key} tried"]
        if not tried:
            continue
        clean = f[f"{key} clean error"] + f[f"{key} bad record"]
        accepted = f[f"{key} accepted"] + f[f"{key} record"]
        lines.append(f"| {name} | {tried} | {clean} | {accepted} | {tried - clean - accepted} |")
    lines.append(f"| option bounds (tests/reliability/test_options.py cases) | {c.cases['test_options.py']} | "
                 f"{c.cases['test_options.py']} | - | 0 |")
    lines += ["", "| kill -9 of | kills landed | new output afterwards: absent | complete | replaced output "
                  "(--force) afterwards: complete | outputs checked in all |", "|---|---|---|---|---|---|"]
    for stage in ("export", "optimize", "quantize"):
        if f[f"{stage} kills"] or f[f"{stage} outputs checked"]:
            lines.append(f"| {stage} | {f[f'{stage} kills']} | {f[f'{stage} absent']} | {f[f'{stage} complete']} | "
                         f"{f[f'{stage} complete (replacing)']} | {f[f'{stage} outputs checked']} |")
    if f["score records checked"]:
        lines += ["", "| score, killed and resumed | kills | records | lost | duplicated | output |", "|---|---|---|---|---|---|",
                  f"| 300-record JSONL, chunks of 4 | {f['score kills']} | {f['score records checked']} | "
                  f"{f['score records lost']} | {f['score records duplicated']} | "
                  f"{'byte-identical' if c.outcomes['failed'] == 0 else 'see the failures'} |"]
    lines += ["", f"tests: {c.outcomes['passed']} passed, {c.outcomes['failed']} failed, "
                  f"{c.outcomes['skipped']} skipped, in {seconds:.0f} s"]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-kill", action="store_true", help="leave out the kill -9 cycles")
    args = ap.parse_args()
    tests = [t for t in TESTS if not (args.no_kill and t.endswith("test_kill.py"))]
    collect = Collect()
    start = time.perf_counter()
    code = pytest.main(["-q", "-p", "no:cacheprovider", "--rootdir", str(ROOT), "--durations", "8",
                        *[str(ROOT / t) for t in tests]], plugins=[collect])
    print()
    print(table(collect, time.perf_counter() - start))
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
