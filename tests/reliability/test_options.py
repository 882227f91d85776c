"""Option bounds: every numeric option of generate/bench (and the float options of score and quantize) is checked
before any work, in one line naming it. NaN, infinities, absurd thread counts, batches and token counts are refused
instead of hanging, looping or growing until the machine runs out of memory."""

from __future__ import annotations

import math
import resource
import time

import pytest
from click.testing import CliRunner

from onnxpipe.cli import main
from onnxpipe.errors import OnnxpipeError
from onnxpipe.runtime import limits
from onnxpipe.runtime.generate import load


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_option_error(result, option, *fragments):
    """click's usage error: exit code 2, the option named on the error line, no traceback."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "unexpected" not in result.output
    error = [ln for ln in result.output.splitlines() if ln.startswith("Error:")]
    assert len(error) == 1 and option in error[0], result.output
    for f in fragments:
        assert f in error[0], error[0]


def assert_one_line(result, *fragments):
    """A library error turned into one line: exit code 1, no traceback, nothing unexpected."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and "unexpected" not in result.output
    error = [ln for ln in result.stdout.splitlines() + result.stderr.splitlines() if ln.startswith("Error:")]
    assert len(error) == 1, result.output  # (stderr also holds the provider line of a model that was loaded)
    for f in fragments:
        assert f in error[0], error[0]


@pytest.fixture(scope="module")
def lm(tiny_onnx):
    return load(tiny_onnx("llama"), "cpu")


# ---- the command line: refused at parse time ----

NON_FINITE = ["nan", "NaN", "inf", "-inf", "+Infinity"]


@pytest.mark.parametrize("value", NON_FINITE)
@pytest.mark.parametrize("option", ["--temperature", "--top-p", "--repetition-penalty"])
def test_generate_float_options_refuse_non_finite(option, value):
    assert_option_error(run("generate", "no-such-dir", "--prompt", "x", option, value), option, "not a finite number")


@pytest.mark.parametrize("command,option", [
    (["score", "no-such-dir", "in.jsonl", "-o", "out.jsonl"], "--max-padding"),
    (["quantize", "no-such-dir", "-o", "out", "--mode", "dynamic"], "--max-ppl-increase"),
    (["quantize", "no-such-dir", "-o", "out", "--mode", "dynamic"], "--smoothquant"),
])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_score_and_quantize_float_options_refuse_non_finite(command, option, value):
    assert_option_error(run(*command, option, value), option, "not a finite number")


@pytest.mark.parametrize("option,value,fragment", [
    ("--repetition-penalty", "0", "not in the range"),
    ("--repetition-penalty", "1e300", "not in the range"),
    ("--top-p", "0", "not in the range"),
    ("--top-p", "1.5", "not in the range"),
    ("--temperature", "-0.1", "not in the range"),
])
def test_generate_float_options_refuse_out_of_range(option, value, fragment):
    assert_option_error(run("generate", "no-such-dir", "--prompt", "x", option, value), option, fragment)


@pytest.mark.parametrize("command", [
    ["generate", "no-such-dir", "--prompt", "x"],
    ["bench", "no-such-dir"],
    ["score", "no-such-dir", "in.jsonl", "-o", "out.jsonl"],
])
@pytest.mark.parametrize("value", ["10000", "0", "-1"])
def test_threads_bounded_at_parse_time(command, value):
    start = time.perf_counter()
    r = run(*command, "--threads", value)
    assert_option_error(r, "--threads", f"1<=x<={limits.max_threads()}")
    assert time.perf_counter() - start < 5  # `generate --threads 10000` hung in session creation


def test_bench_repeats_bounded():
    assert_option_error(run("bench", "no-such-dir", "--repeats", "1000000000"), "--repeats")


# ---- the library: what a server would pass straight from a request ----

@pytest.mark.parametrize("options,named", [
    ({"repetition_penalty": math.nan}, "repetition_penalty"),  # emitted one token forever, exit 0
    ({"repetition_penalty": math.inf}, "repetition_penalty"),
    ({"temperature": math.nan}, "temperature"),  # died with an unexpected ValueError in numpy
    ({"temperature": math.inf}, "temperature"),
    ({"temperature": -math.inf}, "temperature"),
    ({"top_p": math.nan}, "top_p"),
    ({"top_k": 2.5}, "top_k"),
    ({"top_k": "5"}, "top_k"),
    ({"max_new_tokens": True}, "max_new_tokens"),
    ({"max_new_tokens": 3.0}, "max_new_tokens"),
    ({"seed": "0"}, "seed"),
    ({"length_penalty": math.nan, "num_beams": 2}, "length_penalty"),
    ({"stop_strings": "abc"}, "stop_strings"),
    ({"stop_token_ids": [1, None]}, "stop_token_ids"),
    ({"max_new_tokens": 10**12 + 0.5}, "max_new_tokens"),
])
def test_generate_refuses_bad_values_naming_the_option(lm, options, named):
    with pytest.raises(OnnxpipeError, match=named):
        lm.generate([1, 2, 3], **options)
    with pytest.raises(OnnxpipeError, match=named):
        next(iter(lm.stream([1, 2, 3], **options)))


@pytest.mark.parametrize("prompt", [None, 5, [1, None], [[1, 2], 3.5], {"a": 1}])
def test_generate_refuses_prompts_of_the_wrong_type(lm, prompt):
    with pytest.raises(OnnxpipeError, match="prompt"):
        lm.generate(prompt)


def test_the_tightest_accepted_values_still_generate(lm):
    """The bounds leave every legitimate value in: the edges run and give a token from the vocabulary."""
    edges = [dict(temperature=1e-300, seed=0), dict(temperature=1e300, seed=0), dict(top_p=1e-12, temperature=1, seed=0),
             dict(repetition_penalty=limits.MAX_REPETITION_PENALTY), dict(repetition_penalty=1 / limits.MAX_REPETITION_PENALTY),
             dict(repetition_penalty=limits.MAX_REPETITION_PENALTY, temperature=0.7, seed=1),
             dict(max_new_tokens=124)]
    for options in edges:
        r = lm.generate([1, 2, 3], stop_token_ids=[], **{"max_new_tokens": 3, **options})
        assert r.token_ids and all(0 <= t < 256 for t in r.token_ids), options


@pytest.mark.parametrize("max_new_tokens", [128, 10**12])
def test_max_new_tokens_beyond_the_context_stops_at_it(lm, max_new_tokens):
    """A most, not a promise: a row stops where the context (128 positions) ends, and nothing is allocated for
    positions past it (the cache's capacity is the prompt + what is left)."""
    r = lm.generate([1, 2, 3], max_new_tokens=max_new_tokens, stop_token_ids=[])
    assert len(r.token_ids) == 125 and r.finish_reason == "length"


def test_load_refuses_absurd_threads_before_making_a_session(tiny_onnx, monkeypatch):
    from onnxpipe.runtime import generate

    monkeypatch.setattr(generate, "DecoderSession", lambda *a, **k: pytest.fail("a session was made"))
    for bad in (10_000, 0, -3, 2.0, "4", True):
        with pytest.raises(OnnxpipeError, match="threads must be an integer in 1.."):
            load(tiny_onnx("llama"), "cpu", threads=bad)


# ---- memory: the KV cache a call would need, refused before it is allocated ----

def test_footprint_counts_the_kv_cache_and_logits(lm):
    s = lm.session  # tiny llama: 2 layers, 2 KV heads of 16, fp32, a graph that concatenates its cache
    f = limits.footprint(s, batch=3, positions=10, prompt_width=4)
    assert f.kv_bytes == 2 * 2 * 2 * 16 * 4 * 3 * 10 * 2
    width = 1 if s.last_position else 4
    assert f.logits_bytes == 3 * width * 256 * 4


def test_bench_batch_refused_before_allocating(tiny_onnx):
    """`bench --batch 100000` grew to 15 GB RSS before it was killed. A batch whose cache cannot fit is refused at
    once, naming the batch, before its prompts or cache exist."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    r = run("bench", tiny_onnx("llama"), "--provider", "cpu", "--batch", "1,100000000", "--prompt-tokens", "16",
            "--new-tokens", "16")
    assert_one_line(r, "batch 100000000 x 32 positions needs at least", "GiB", "available")
    assert time.perf_counter() - start < 60  # (a model load on a busy machine; the refusal itself is immediate)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 500 * 1024  # KiB: nothing big was allocated


def test_generate_batch_and_beams_refused_when_memory_is_short(lm, monkeypatch):
    monkeypatch.setattr(limits, "available_memory", lambda: 1 << 16)  # 64 KiB: one row of 11 positions fits
    need = limits.footprint(lm.session, 64, 3 + 8, 3).total
    assert need > 1 << 16 > limits.footprint(lm.session, 1, 11, 3).total
    with pytest.raises(OnnxpipeError, match=r"batch 64 x 11 positions needs at least"):
        lm.generate([[1, 2, 3]] * 64, max_new_tokens=8)
    with pytest.raises(OnnxpipeError, match=r"beams 400 x 11 positions"):
        lm.generate([1, 2, 3], max_new_tokens=8, num_beams=400)
    with pytest.raises(OnnxpipeError, match=r"batch 64 x 11 positions"):
        next(iter(lm.stream([[1, 2, 3]] * 64, max_new_tokens=8)))
    assert lm.generate([1, 2, 3], max_new_tokens=8).token_ids  # one row fits


def test_beams_refused_when_their_candidate_scores_cannot_fit(lm, monkeypatch):
    """`generate --num-beams 100000` grew past 24 GB (a step scores beams x vocabulary candidates in float64) until
    the kernel killed it, while its KV cache and logits alone looked small. The candidates are counted now."""
    beams, positions = 400, 3 + 8
    cache_and_logits = limits.footprint(lm.session, beams, positions, 3).total
    monkeypatch.setattr(limits, "available_memory", lambda: cache_and_logits + (1 << 20))
    assert limits.footprint(lm.session, beams, positions, 3, beams=True).search_bytes == beams * 256 * 80
    with pytest.raises(OnnxpipeError, match=r"beams 400 x 11 positions needs at least .* candidate scores"):
        lm.generate([1, 2, 3], max_new_tokens=8, num_beams=beams)
    assert lm.generate([1, 2, 3], max_new_tokens=8, num_beams=4).token_ids  # a few beams fit


def test_bench_library_checks_types_and_counts(lm):
    from onnxpipe.runtime.bench import bench

    for kwargs, named in [({"batches": [1, 2.5]}, "batch sizes"), ({"batches": [True]}, "batch sizes"),
                          ({"batches": [1], "new_tokens": 1}, "new tokens"),
                          ({"batches": [1], "prompt_tokens": 0}, "prompt tokens"),
                          ({"batches": [1], "repeats": 10**9}, "repeats"),
                          ({"batches": [1], "prompt_tokens": 100, "new_tokens": 100}, "exceed the model's 128")]:
        with pytest.raises(OnnxpipeError, match=named):
            bench(lm, **kwargs)
