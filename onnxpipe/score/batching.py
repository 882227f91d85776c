"""Windows and batches: how a chunk's records are cut to the context and packed into model runs.

Long records: a record longer than the context C (the manifest's ``max_position_embeddings``, or ``--max-context``)
is cut into windows of C tokens starting every ``stride`` tokens (default C // 2); each window scores only the
tokens no earlier window scored, so every scored token sees at least C - stride tokens of history (all of it
in the first window). Each window is run alone from an empty cache, so a record's result does not depend on which
batch it lands in (up to float rounding of the batch shape, ~1e-6 per token in fp32).

Batching. Input is read in chunks of ``chunk_records`` records, in order. Within a chunk the windows are sorted by
length and packed greedily into batches of at most ``batch_tokens`` slots (batch size x longest window, padding
included; a single window longer than the budget runs alone) whose padding is at most ``max_padding`` of the
slots: a window that would break either bound starts a new batch. Batches are right-padded prefills.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

# (records finished, tokens scored or generated, windows done, windows of the chunk); for --task generate: prompts
Progress = Callable[[int, int, int, int], None]


@dataclass
class ChunkStats:
    """What one chunk's batches cost: tokens fed, batch slots (padding included), model runs."""

    input_tokens: int = 0
    padded_slots: int = 0
    batches: int = 0
    max_batch_padding: float = 0.0


def cut_windows(n_tokens: int, context: int, stride: int, score_from: int = 1) -> list[tuple[int, int, int]]:
    """(begin, end, first_target) windows over n_tokens positions: every position >= score_from is scored once
    (given stride < context), by the first window that holds it and one token before it."""
    windows, begin, scored_up_to = [], 0, max(1, score_from)
    while n_tokens > 1:
        end = min(begin + context, n_tokens)
        first = max(scored_up_to, begin + 1)
        if first < end:
            windows.append((begin, end, first))
        scored_up_to = max(scored_up_to, end)
        if end == n_tokens:
            break
        begin += stride
    return windows


def plan_batches(lengths: Sequence[int], batch_tokens: int, max_padding: float) -> list[list[int]]:
    """Indices grouped into batches: sorted by length, each batch within batch_tokens slots and max_padding."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    cur_sum = 0
    for i in order:
        n = lengths[i]
        if cur:
            slots = (len(cur) + 1) * n  # ascending order: n is the new longest
            if slots > batch_tokens or 1.0 - (cur_sum + n) / slots > max_padding:
                batches.append(cur)
                cur, cur_sum = [], 0
        cur.append(i)
        cur_sum += n
    if cur:
        batches.append(cur)
    return batches

