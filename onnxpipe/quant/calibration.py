"""Calibration data: real text, tokenized, fed through the model as it runs in use, prefill then decode.

A sample is ``prefill_len + decode_steps`` consecutive tokens of the calibration text. Samples are taken evenly
across the token stream (not just its start), at most ``max_samples`` of them. The stream is the text's first
``CALIBRATION_MAX_TOKENS`` tokens (or ``max_samples`` whole samples, if more): a longer file, or one huge line, is
cut before it is tokenized, so its size does not set the memory calibration takes. The feeds are made lazily:
a batch of samples is prefilled, then each decode step feeds the next real token with the KV cache that the
float model itself produced, so the calibrated ranges see the decode path's inputs (one token, a growing cache)
and not only prefills. Nothing is kept but the current batch's cache: memory does not grow with the number of
samples.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from onnxpipe.artifact import Manifest
from onnxpipe.errors import OnnxpipeError
from onnxpipe.parity import position_ids_for
from onnxpipe.quant.quality import prefill_feed
from onnxpipe.quant.text import read_documents, tokenize_documents

Feed = dict[str, np.ndarray]
CALIBRATION_MAX_TOKENS = 262_144  # the text the samples are spread over; data/calibration.txt is ~70k tokens


@dataclass(frozen=True)
class CalibrationConfig:
    """How much calibration text is run, and how: each field checked when made (a one-line error naming it)."""

    max_samples: int = 32
    prefill_len: int = 128
    decode_steps: int = 4
    batch_size: int = 4

    def __post_init__(self) -> None:
        for name, flag, lo, hi in (("max_samples", " (--calib-samples)", 1, 4096),
                                   ("prefill_len", " (--calib-seq-len)", 2, 8192),
                                   ("decode_steps", "", 0, 1024), ("batch_size", "", 1, 4096)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise OnnxpipeError(f"calibration {name}{flag} must be an integer in {lo}..{hi}, got {value!r}")

    @property
    def sample_len(self) -> int:
        return self.prefill_len + self.decode_steps

    def to_json(self) -> dict[str, int]:
        return asdict(self)


def calibration_samples(tokenizer: Any, path: str | Path, config: CalibrationConfig) -> np.ndarray:
    """[n, prefill_len + decode_steps] token ids from the file, n <= max_samples, spread over the whole text."""
    docs = read_documents(path, "calibration")
    need = config.sample_len
    ids = tokenize_documents(tokenizer, docs, max(CALIBRATION_MAX_TOKENS, config.max_samples * need))
    if len(ids) < need:
        raise OnnxpipeError(
            f"{path}: the calibration file is too short: {len(ids)} tokens, and one sample needs {need} "
            f"(prefill {config.prefill_len} + {config.decode_steps} decode steps); give more text"
        )
    chunks = len(ids) // need
    picks = np.linspace(0, chunks - 1, num=min(chunks, config.max_samples)).round().astype(int)
    return np.stack([ids[p * need:(p + 1) * need] for p in np.unique(picks)])


def feed_count(samples: np.ndarray, config: CalibrationConfig, decode: bool = True) -> int:
    batches = -(-len(samples) // config.batch_size)
    return batches * (1 + (config.decode_steps if decode else 0))


def kv_feeds(
    session: Any, manifest: Manifest, samples: np.ndarray, config: CalibrationConfig, decode: bool = True
) -> Iterator[Feed]:
    """Prefill feeds, each followed by ``decode_steps`` one-token feeds carrying the cache ``session`` made."""
    presents = [n for i in range(manifest.num_layers) for n in manifest.present_names(i)]
    pasts = [n for i in range(manifest.num_layers) for n in manifest.past_names(i)]
    for b in range(0, len(samples), config.batch_size):
        ids = samples[b:b + config.batch_size]
        feed = prefill_feed(manifest, ids[:, :config.prefill_len])
        yield feed
        if not decode:
            continue
        mask = feed["attention_mask"]
        for t in range(config.decode_steps):
            cache = session.run(presents, feed)
            mask = np.concatenate([mask, np.ones((len(ids), 1), np.int64)], axis=1)
            pos = config.prefill_len + t
            feed = {"input_ids": ids[:, pos:pos + 1].astype(np.int64), "attention_mask": mask}
            if "position_ids" in manifest.input_names:
                feed["position_ids"] = position_ids_for(mask, 1)
            feed.update(zip(pasts, cache))
            yield feed


def counted(feeds: Iterator[Feed], total: int, label: str,
            progress: Callable[[str, int, int], None] | None) -> Iterator[Feed]:
    """The same feeds, reporting (label, done, total) to ``progress`` after each."""
    for done, feed in enumerate(feeds, 1):
        yield feed
        if progress:
            progress(label, done, total)


class StreamingReader:
    """An ORT CalibrationDataReader over a feed iterator, one feed at a time, with a progress callback."""

    def __init__(self, feeds: Iterator[Feed], total: int, progress: Callable[[int, int], None] | None = None):
        self._feeds, self.total, self.done, self._progress = feeds, total, 0, progress

    def get_next(self) -> Feed | None:
        feed = next(self._feeds, None)
        if feed is not None:
            self.done += 1
            if self._progress:
                self._progress(self.done, self.total)
        return feed

    def __iter__(self):  # noqa: ANN204
        while (feed := self.get_next()) is not None:
            yield feed

    def __len__(self) -> int:
        return self.total


class SingleFeedReader:
    """Hands one feed to a calibrator, so each ``collect_data`` call holds one run's activations only."""

    def __init__(self, feed: Feed):
        self._feed: Feed | None = feed

    def get_next(self) -> Feed | None:
        feed, self._feed = self._feed, None
        return feed


class ListReader:
    """A re-iterable, deep-copyable reader over feeds held in memory (ORT's GPTQ copies its reader)."""

    def __init__(self, feeds: list[Feed]):
        self.feeds, self._i = feeds, 0

    def get_next(self) -> Feed | None:
        if self._i >= len(self.feeds):
            return None
        self._i += 1
        return self.feeds[self._i - 1]

    def __iter__(self):  # noqa: ANN204
        return iter(self.feeds)

    def __len__(self) -> int:
        return len(self.feeds)
