"""scripts/serve_overhead.py's CPU-side logic (no model, no server): the stand-in device's offline figure, how a run
is paced and classified, where a served window's time is counted, and the bounds of a run. Its timings are not
checked here (the script measures them)."""

from __future__ import annotations

import argparse

import pytest
from scripts_module import load_script

pytestmark = pytest.mark.fast


def script():
    return load_script("serve_overhead")


so = script()


def test_the_offline_figure_is_one_prefill_run_and_the_rest_decode_steps_per_request():
    cost = so.DeviceCost(step_s=0.0017, prefill_s=0.0021, prefill_token_s=1.6e-6)
    off = cost.offline(32, 128, 2, prompt_tokens=128)
    assert off["steps"] == 254 and off["prefill_runs"] == 2 and off["tokens"] == 8192
    # per request a client sends: one [32, 128] prefill (2.1 ms + 4096 tokens at 1.6 us), 127 steps
    assert off["seconds"] == pytest.approx(2 * (0.0021 + 4096 * 1.6e-6 + 127 * 0.0017))
    assert off["tokens_per_s"] == pytest.approx(8192 / off["seconds"])
    assert 18_000 < cost.offline(32, 128)["tokens_per_s"] < 18_500  # the H100's offline figure it was fitted to
    assert so.DeviceCost(0.001, 0.001, 0.0).offline(1, 2, prompt_tokens=9)["seconds"] == pytest.approx(0.002)
    for bad in (dict(step_s=0), dict(prefill_s=-1), dict(step_s=2.0), dict(step_s="1"), dict(prefill_token_s=-1e-6),
                dict(step_s=True)):
        with pytest.raises(ValueError):
            so.DeviceCost(**bad)
    with pytest.raises(ValueError, match="new_tokens"):
        cost.offline(32, 0)


class _Options:
    def __init__(self, gid: str):
        self.gid = gid

    def get_run_config_entry(self, name: str) -> str:
        assert name == "gpu_graph_id"
        return self.gid


class _Clock:
    """A clock that the inner run and the sleep move: the inner run takes ``inner`` s, a sleep lasts what it is
    asked plus ``late``."""

    def __init__(self, inner: float, late: float):
        self.now, self.inner, self.late, self.slept = 100.0, inner, late, []

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.now += s + self.late


class _Inner:
    """The wrapped session: its runs move the clock; its bindings take the inputs."""

    def __init__(self, clock: _Clock):
        self.clock, self.calls, self.other, self.bound = clock, 0, "kept", []

    def run_with_iobinding(self, io, run_options=None):
        assert not isinstance(io, so.TokenCount)  # the wrapped session gets its own binding
        self.calls += 1
        self.clock.now += self.clock.inner

    def io_binding(self):
        inner = self

        class Binding:
            def bind_cpu_input(self, name, array):
                inner.bound.append(name)

        return Binding()


def test_a_run_is_paced_to_its_kind_and_tokens_and_what_it_stood_for_is_recorded():
    import numpy as np

    clock = _Clock(inner=0.0004, late=0.0001)
    inner = _Inner(clock)
    paced = so.PacedRuns(inner, so.DeviceCost(0.0017, 0.0021, 1e-6), clock=clock, sleep=clock.sleep)
    paced.run_with_iobinding(paced.io_binding(), _Options("3"))  # a replay of the decode graph: a step
    io = paced.io_binding()
    io.bind_cpu_input("input_ids", np.zeros((2, 100), np.int64))  # 200 tokens
    io.bind_cpu_input("attention_mask", np.zeros((2, 300), np.int64))
    paced.run_with_iobinding(io, _Options("-1"))  # outside any graph: a prefill of 200 tokens
    paced.run_with_iobinding(None, None)  # no run options, no binding of ours: a prefill of none counted
    assert inner.calls == 3 and paced.other == "kept" and inner.bound == ["input_ids", "attention_mask"]
    assert [r.kind for r in paced.runs] == ["step", "prefill", "prefill"]
    assert clock.slept == pytest.approx([0.0013, 0.0021 + 0.0002 - 0.0004, 0.0017])  # the cost less the inner run
    assert [r.device_s for r in paced.runs] == pytest.approx([0.0017, 0.0023, 0.0021])
    assert [r.late_s for r in paced.runs] == pytest.approx([0.0001] * 3)
    clock.inner = 0.005  # an inner run longer than the cost: no sleep, the run stands for its own time
    paced.run_with_iobinding(None, _Options("1"))
    assert len(clock.slept) == 3 and paced.runs[-1].device_s == pytest.approx(0.005)


def test_each_thread_that_runs_is_set_up_once_before_its_first_run():
    """--sleep precise: each thread that runs the stand-in gets its timer slack set (here a stand-in callable) once,
    before its first sleep; plain: nothing is asked."""
    import threading

    clock = _Clock(inner=0.0004, late=0.0)
    calls: list[int] = []
    paced = so.PacedRuns(_Inner(clock), so.DeviceCost(0.0017, 0.0021, 1e-6), clock=clock, sleep=clock.sleep,
                         new_thread=lambda: calls.append(threading.get_ident()))
    for _ in range(3):
        paced.run_with_iobinding(None, _Options("3"))
    other = threading.Thread(target=lambda: paced.run_with_iobinding(None, _Options("3")))
    other.start()
    other.join()
    assert calls == [threading.get_ident(), other.ident] and len(paced.runs) == 4
    plain = so.PacedRuns(_Inner(clock), so.DeviceCost(0.0017, 0.0021, 1e-6), clock=clock, sleep=clock.sleep)
    plain.run_with_iobinding(None, _Options("3"))
    assert len(calls) == 2 and so.parse_args([]).sleep == "precise" and so.parse_args(["--sleep", "plain"]).sleep == "plain"


def test_the_breakdown_counts_the_window_only():
    Run = so.Run
    runs = [Run("prefill", 0.5, 0.001, 0.001, 0.0023, 0.0),  # before the window
            Run("prefill", 1.0, 0.001, 0.001, 0.0023, 0.0001),
            Run("step", 1.003, 0.0004, 0.0004, 0.0017, 0.0002),
            Run("step", 1.005, 0.0004, 0.0004, 0.0017, 0.0),
            Run("step", 2.5, 0.0004, 0.0004, 0.0017, 0.0)]  # after it
    trace = [(1.0, 128, 0.0024, 0.0019, 1), (1.0045, 0, 0.0, 0.0018, 1), (2.5, 0, 0.0, 0.0017, 1)]
    b = so.breakdown(runs, trace, (1.0, 1.01), offline_s=0.005)
    assert b["steps"] == 2 and b["prefill_runs"] == 1 and b["iterations"] == 2
    assert b["device_s"] == pytest.approx(0.0023 + 2 * 0.0017)
    assert b["wall_s"] == pytest.approx(0.01) and b["server_own_s"] == pytest.approx(0.01 - 0.0057)
    assert b["late_s"] == pytest.approx(0.0003) and b["busy_s"] == pytest.approx(0.0024 + 0.0019 + 0.0018)
    # between runs: 1.003 - (1.0 + 0.0023 + 0.0001), then 1.005 - (1.003 + 0.0017 + 0.0002)
    assert b["between_runs_s"] == pytest.approx(0.0006 + 0.0001)
    assert b["schedule"] == pytest.approx(0.005 / 0.0057) and b["overhead"] == pytest.approx(0.0057 / 0.01)


def _args(**changes) -> argparse.Namespace:
    args = so.parse_args([])
    for k, v in changes.items():
        setattr(args, k, v)
    return args


def test_a_run_is_bounded():
    so.check_bounds(_args())  # the defaults fit
    with pytest.raises(ValueError, match="--budget-s"):
        so.check_bounds(_args(budget_s=so.MAX_BUDGET_S + 1))
    with pytest.raises(ValueError, match="--streams"):
        so.check_bounds(_args(streams=65))
    with pytest.raises(ValueError, match="do not fit"):  # 10 repeats of a slow device in 100 s
        so.check_bounds(_args(repeats=10, step_ms=20.0, max_tokens=256, requests_per_client=8))
    with pytest.raises(ValueError, match="--prefill-group"):
        so.check_bounds(_args(prefill_group=33))
    with pytest.raises(SystemExit):  # the command line says which option
        so.parse_args(["--budget-s", "600"])
