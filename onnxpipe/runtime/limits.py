"""Bounds on what a generation may ask for, checked before anything is allocated.

A thread count, a batch, a prompt and a number of new tokens all come from users (the command line, a server's
request). Each is checked here against what the machine and the model can take, so that an absurd value fails at
once, in one line naming it, instead of hanging (10,000 onnxruntime threads) or growing until the kernel kills the
process (a batch of 100,000 rows):

- threads: 1 .. ``MAX_THREADS_PER_CPU`` x the CPUs this process may run on;
- prompt + new tokens: within the model's positions (the manifest's ``max_position_embeddings``);
- batch x positions: the KV cache (and the logits a step returns) must fit in the memory available now, on the CPU.
  On a GPU the cache lives on the device, whose free memory is not known here: onnxruntime reports an allocation
  that does not fit.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from onnxpipe.errors import OnnxpipeError

MAX_THREADS_PER_CPU = 4  # more threads than this per CPU only adds contention; 10,000 made session creation hang
FLOAT_BYTES = 4  # logits come back as float32
# sampling options: wide enough for any use, narrow enough that no arithmetic on a logit overflows
MAX_REPETITION_PENALTY = 1e4  # repetition_penalty in [1/this, this]
MAX_LENGTH_PENALTY = 1e3  # beam search's length_penalty in [-this, this]
MAX_REPEATS = 1000  # bench: timed runs per batch size
# a beam search step scores every (beam, vocabulary token) pair in float64: log-probabilities, candidate scores and
# their order; 74 bytes per pair were measured (peak RSS of 1,000 and 4,000 beams, vocabulary 4,096)
BEAM_BYTES_PER_CANDIDATE = 80


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which containers narrow), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def max_threads() -> int:
    return MAX_THREADS_PER_CPU * usable_cpus()


def check_threads(threads: object, option: str = "threads") -> int | None:
    """``threads`` as an int in 1..max_threads(), or None (onnxruntime's default); an OnnxpipeError otherwise."""
    if threads is None:
        return None
    top = max_threads()
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= top:
        raise OnnxpipeError(f"{option} must be an integer in 1..{top} ({MAX_THREADS_PER_CPU} per usable CPU), "
                            f"got {threads!r}")
    return threads


def check_real(value: object, option: str, low: float | None = None, high: float | None = None,
               low_open: bool = False, high_open: bool = False) -> float:
    """A finite real number within [low, high] (ends open where asked); an OnnxpipeError naming ``option`` otherwise.
    NaN passes every comparison, so it is refused first, with infinities."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not _is_numpy_real(value):
        raise OnnxpipeError(f"{option} must be a number, got {type(value).__name__} {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise OnnxpipeError(f"{option} must be a finite number, got {number}")
    below = low is not None and (number <= low if low_open else number < low)
    above = high is not None and (number >= high if high_open else number > high)
    if below or above:
        raise OnnxpipeError(f"{option} must be {interval(low, high, low_open, high_open)} (got {number:g})")
    return number


def check_int(value: object, option: str, low: int | None = None, high: int | None = None) -> int:
    """An integer (not a bool) within [low, high]; an OnnxpipeError naming ``option`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) and not _is_numpy_int(value):
        raise OnnxpipeError(f"{option} must be an integer, got {type(value).__name__} {value!r}")
    number = int(value)
    if (low is not None and number < low) or (high is not None and number > high):
        raise OnnxpipeError(f"{option} must be {interval(low, high)} (got {number})")
    return number


def interval(low: float | None, high: float | None, low_open: bool = False, high_open: bool = False) -> str:
    """"in [0, 1)", ">= 1", "<= 5": the allowed values in words."""
    if high is None and low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    if low is None and high is not None:
        return f"{'<' if high_open else '<='} {high:g}"
    left = "(" if low_open or low is None else "["
    right = ")" if high_open or high is None else "]"
    return f"in {left}{'-inf' if low is None else f'{low:g}'}, {'inf' if high is None else f'{high:g}'}{right}"


@dataclass(frozen=True)
class GenerationFootprint:
    """The least memory a generation of ``batch`` rows over ``positions`` positions takes (bytes)."""

    batch: int
    positions: int
    kv_bytes: int
    logits_bytes: int
    search_bytes: int = 0  # a beam search step's scores of every (beam, token) pair

    @property
    def total(self) -> int:
        return self.kv_bytes + self.logits_bytes + self.search_bytes


def footprint(session: object, batch: int, positions: int, prompt_width: int, beams: bool = False) -> GenerationFootprint:
    """KV cache + logits of one generation on ``session`` (a DecoderSession): a lower bound, activations left out.

    The cache holds key and value for every layer: 2 x layers x batch x kv_heads x positions x head_dim elements.
    A graph that concatenates (no shared buffer) holds its past and its present at once, so twice that. The
    prefill returns logits for every prompt position unless the graph was cut to the last position. With
    ``beams`` the ``batch`` rows are a beam search's beams, whose every step scores batch x vocabulary candidates."""
    layers = len(session.past_names) // 2
    per_position = 2 * layers * session.num_kv_heads * session.head_dim * session.kv_dtype.itemsize
    kv = per_position * batch * positions * (1 if session.shares_buffer else 2)
    width = 1 if session.last_position else prompt_width
    search = batch * session.vocab_size * BEAM_BYTES_PER_CANDIDATE if beams else 0
    return GenerationFootprint(batch, positions, kv, batch * width * session.vocab_size * FLOAT_BYTES, search)


def available_memory() -> int | None:
    """Bytes of memory available now without swapping (Linux MemAvailable), or None when not known."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def check_fits(session: object, batch: int, positions: int, prompt_width: int, what: str = "batch") -> None:
    """Refuse, before allocating, a generation whose KV cache and logits cannot fit: positions beyond the model's
    context anywhere, memory on the CPU (see the module docstring for the GPU). ``what``: "batch", or "beams" for a
    beam search's beams, whose candidate scores are counted too."""
    limit = session.max_positions
    if positions > limit:
        raise OnnxpipeError(f"{positions} positions (prompt + new tokens) exceed the model's {limit}")
    if session.device != "cpu":
        return
    need, have = footprint(session, batch, positions, prompt_width, beams=what == "beams"), available_memory()
    if have is not None and need.total > have:
        held = "KV cache, logits and candidate scores" if need.search_bytes else "KV cache and logits"
        raise OnnxpipeError(
            f"{what} {batch} x {positions} positions needs at least {_gib(need.total)} for its {held}; "
            f"{_gib(have)} of memory is available: use a smaller {what} or fewer tokens")


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def _is_numpy_real(value: object) -> bool:
    import numpy as np

    return isinstance(value, (np.floating, np.integer))


def _is_numpy_int(value: object) -> bool:
    import numpy as np

    return isinstance(value, np.integer)
