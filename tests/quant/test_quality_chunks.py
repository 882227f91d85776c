"""The quality report's figures are the same whether log-probabilities are taken a window or a few positions at a
time, and whatever number of windows a session runs at once (quality.compare_on_text bounds both for large
vocabularies)."""

from __future__ import annotations

import numpy as np
import pytest

from onnxpipe.artifact import Manifest
from onnxpipe.quant import quality

pytestmark = pytest.mark.fast

VOCAB, CONTEXT = 37, 24


class Logits:
    """A stand-in session: fixed logits per token id (a bigram table), so any batching gives the same numbers."""

    def __init__(self, seed: int) -> None:
        self.table = np.random.default_rng(seed).normal(size=(VOCAB, VOCAB)).astype(np.float32) * 3

    def run(self, names: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [self.table[feed["input_ids"]]]


def _manifest() -> Manifest:
    return Manifest.from_json({"model": {"vocab_size": VOCAB, "num_layers": 0, "num_kv_heads": 1, "head_dim": 4},
                               "graph": {"logits": "logits", "inputs": [], "outputs": [], "kv": {"num_layers": 0}},
                               "steps": []})


def _whole_windows(before: Logits, after: Logits, ids: np.ndarray) -> dict[str, float]:
    """The figures computed the plain way: each window's log-probabilities at once."""
    nll_b = nll_a = kl = 0.0
    agree = scored = 0
    for b in quality.window_starts(len(ids), CONTEXT):
        row = ids[b:b + CONTEXT]
        lp_b = quality.log_softmax(before.table[row[:-1]])
        lp_a = quality.log_softmax(after.table[row[:-1]])
        t = row[1:, None]
        nll_b -= float(np.take_along_axis(lp_b, t, -1).sum())
        nll_a -= float(np.take_along_axis(lp_a, t, -1).sum())
        kl += float((np.exp(lp_b) * (lp_b - lp_a)).sum())
        agree += int((lp_b.argmax(-1) == lp_a.argmax(-1)).sum())
        scored += t.size
    return {"ppl_before": np.exp(nll_b / scored), "ppl_after": np.exp(nll_a / scored), "mean_kl": kl / scored,
            "top1_agreement": agree / scored, "eval_tokens": scored}


@pytest.mark.parametrize("chunk, logits_bytes", [(5, 1 << 30), (64, 1), (1, 1 << 30)])
def test_chunked_scoring_matches_whole_windows(monkeypatch: pytest.MonkeyPatch, chunk: int, logits_bytes: int) -> None:
    monkeypatch.setattr(quality, "POSITION_CHUNK", chunk)
    monkeypatch.setattr(quality, "LOGITS_BYTES", logits_bytes)
    ids = np.random.default_rng(1).integers(0, VOCAB, size=CONTEXT * 5 + 7)
    before, after = Logits(2), Logits(3)
    got = quality.compare_on_text(before, after, _manifest(), _manifest(), ids, CONTEXT)
    want = _whole_windows(before, after, ids)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-9), key
    assert got["windows"] == 6


def test_a_large_vocabulary_runs_one_window_at_a_time() -> None:
    assert quality.logits_batch(256, 151936) == 1  # 156 MB of fp32 logits a window
    assert quality.logits_batch(256, 32000) == 4
    assert quality.logits_batch(256, 1 << 30) == 1


class OneAtATime(quality.Side):
    """A stand-in Side that fails when another is in memory while it runs (it is, from its first run to its
    release)."""

    live: set[str] = set()

    def __init__(self, name: str, logits: Logits) -> None:
        self.name, self.logits, self.manifest = name, logits, _manifest()

    def prefills(self, batches: list[np.ndarray], consume) -> None:  # noqa: ANN001
        assert OneAtATime.live <= {self.name}, f"{self.name} runs while {OneAtATime.live} is held"
        OneAtATime.live.add(self.name)
        for i, ids in enumerate(batches):
            consume(i, self.logits.run(["logits"], {"input_ids": ids})[0])

    def release(self) -> None:
        OneAtATime.live.discard(self.name)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_the_models_run_one_after_the_other_through_a_spill(tmp_path, dtype) -> None:  # noqa: ANN001
    """The input model's logits wait in a file (their own dtype: fp16 logits come back as they were) while the
    quantized model runs; the figures are those of both at once, and the file is gone afterwards."""
    ids = np.random.default_rng(1).integers(0, VOCAB, size=CONTEXT * 5 + 7)
    before, after = Logits(2), Logits(3)
    before.table, after.table = before.table.astype(dtype), after.table.astype(dtype)
    OneAtATime.live.clear()
    got = quality.compare_on_text(OneAtATime("before", before), OneAtATime("after", after), _manifest(), _manifest(),
                                  ids, CONTEXT, spill_dir=tmp_path)
    want = _whole_windows(before, after, ids)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-9), key
    assert not OneAtATime.live and not list(tmp_path.iterdir())


def test_the_quantized_model_cannot_be_compared_before_the_input_ran(tmp_path) -> None:  # noqa: ANN001
    ids = np.random.default_rng(1).integers(0, VOCAB, size=CONTEXT * 3)
    with quality.TextComparison(_manifest(), ids, CONTEXT, spill_dir=tmp_path) as text:
        with pytest.raises(quality.OnnxpipeError, match="before the input model ran"):
            text.run_after(OneAtATime("after", Logits(3)))


class TableSide(OneAtATime):
    """OneAtATime with a decode path: each step's logits are the table's row of the token before."""

    def trace(self, prompts: np.ndarray, forced=None, on_step=None):  # noqa: ANN001, ANN201
        from types import SimpleNamespace

        logits, tokens = [self.logits.table[prompts]], np.zeros((len(prompts), quality.DECODE_STEPS), np.int64)
        for t in range(quality.DECODE_STEPS):
            tokens[:, t] = forced[:, t] if forced is not None else logits[-1][:, -1].argmax(-1)
            logits.append(self.logits.table[tokens[:, t]][:, None])
        return SimpleNamespace(logits=logits, tokens=tokens)


@pytest.mark.parametrize("chunk", [5, 64])
def test_the_selection_judge_scores_as_whole_windows(monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    """A candidate's perplexity change and top-1 agreement on the selection text, the input model's and the
    candidate's log-probabilities taken a few positions at a time, one model after the other."""
    monkeypatch.setattr(quality, "POSITION_CHUNK", chunk)
    monkeypatch.setattr(quality, "model_bytes", lambda path: 1)
    tables = {"before": Logits(2), "after": Logits(3)}
    monkeypatch.setattr(quality, "model_side", lambda path, manifest, provider, form: TableSide(path, tables[path]))
    ids = np.random.default_rng(1).integers(0, VOCAB, size=CONTEXT * 5 + 7)
    OneAtATime.live.clear()
    judge = quality.SelectionJudge("before", _manifest(), ids, CONTEXT)  # type: ignore[arg-type]
    score = judge.score("after", _manifest())  # type: ignore[arg-type]
    want = _whole_windows(tables["before"], tables["after"], ids)
    assert score.ppl_change_pct == pytest.approx((want["ppl_after"] / want["ppl_before"] - 1) * 100, rel=1e-9)
    assert score.top1_agreement == pytest.approx(want["top1_agreement"], rel=1e-12)
    assert 0 <= score.greedy_agreement <= score.greedy_agreement_ties <= 1 and not OneAtATime.live
