"""What a scoring run reports: its totals, throughput, options and bad records, written beside the output
(``OUTPUT.summary.json``) when the run completes."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from onnxpipe.score.checkpoint import Checkpoint
from onnxpipe.score.encoding import Encoder
from onnxpipe.score.job import ScoreJob
from onnxpipe.score.output import write_json_atomic


@dataclass
class ScoreSummary:
    records: int
    bad_records: int
    tokens: int
    loglik: float
    perplexity: float | None  # None for --task generate
    seconds: float
    tokens_per_s: float
    records_per_s: float
    input_tokens: int
    padding_fraction: float
    provider: str
    engine: str
    workers: int
    task: str
    context: int
    stride: int
    batch_tokens: int
    max_padding: float
    runs: int
    model_dir: str
    input: str
    output: str
    bad: list[dict[str, str]] = field(default_factory=list)
    placement: dict[str, Any] = field(default_factory=dict)  # ray: workers, CPUs and GPUs each, GPU ids seen
    special_tokens: str = ""  # what the tokenizer adds to a text record (the convention text was scored under)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        head = (f"generated {self.tokens} tokens for {self.records} records" if self.perplexity is None else
                f"scored {self.records} records, {self.tokens} tokens: corpus perplexity {self.perplexity:.4f} "
                f"(loglik {self.loglik:.3f})")
        out = [
            head,
            f"{self.tokens_per_s:.0f} tokens/s, {self.records_per_s:.1f} records/s over {self.seconds:.1f}s "
            f"({self.runs} run{'s' if self.runs != 1 else ''}); padding {self.padding_fraction:.1%} of batch slots; "
            f"engine {self.engine} x{self.workers}"
            f"{' (1 GPU each)' if self.placement.get('gpus_per_worker') else ''}; {self.provider}",
        ]
        if self.special_tokens:
            out.append(f"special tokens: {self.special_tokens}")
        if self.bad_records:
            out.append(f"skipped {self.bad_records} bad record(s); first: "
                       + "; ".join(f"{b['where']}: {b['error']}" for b in self.bad[:3]))
        return out



def make_summary(job: ScoreJob, ckpt: Checkpoint, provider: str, workers: int) -> ScoreSummary:
    c = job.config
    secs = max(ckpt.seconds, 1e-9)
    return ScoreSummary(
        records=ckpt.records_scored, bad_records=ckpt.bad_count, tokens=ckpt.tokens, loglik=ckpt.loglik,
        perplexity=math.exp(-ckpt.loglik / ckpt.tokens) if ckpt.tokens and c.task != "generate" else None,
        seconds=ckpt.seconds, tokens_per_s=ckpt.tokens / secs, records_per_s=ckpt.records_scored / secs,
        input_tokens=ckpt.input_tokens,
        padding_fraction=1.0 - ckpt.input_tokens / ckpt.padded_slots if ckpt.padded_slots else 0.0,
        provider=provider, engine=c.engine, workers=workers, task=c.task, context=job.context, stride=job.stride,
        batch_tokens=c.batch_tokens, max_padding=c.max_padding, runs=ckpt.runs, model_dir=str(job.model_dir.path),
        input=str(job.input_path), output=str(job.output), bad=list(ckpt.bad),
        special_tokens=Encoder(job.model_dir).special_tokens(),
    )


def finished_summary(job: ScoreJob, ckpt: Checkpoint) -> ScoreSummary:
    """The summary of a run that is already complete (rebuilt from the checkpoint if its file went missing)."""
    try:
        return ScoreSummary(**json.loads(job.summary_path.read_text()))
    except (OSError, ValueError, TypeError):
        summary = make_summary(job, ckpt, "unknown (the summary file was missing; rebuilt from the checkpoint)", 0)
        write_json_atomic(job.summary_path, summary.to_json())
        return summary


def finish(job: ScoreJob, ckpt: Checkpoint, summary: ScoreSummary) -> None:
    """The summary file first, then the checkpoint marked complete: a kill between them reruns to the same end."""
    write_json_atomic(job.summary_path, summary.to_json())
    ckpt.complete = True
    ckpt.save(job.checkpoint_path)

