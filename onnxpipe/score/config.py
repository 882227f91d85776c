"""The options of one scoring run (``onnxpipe score``'s flags), checked before any work."""

from __future__ import annotations

from dataclasses import dataclass

from onnxpipe.errors import OnnxpipeError
from onnxpipe.score.records import MAX_RECORD_CHARS

TASKS = ("perplexity", "loglik", "generate")
ENGINES = ("local", "ray")
BAD_RECORD_MODES = ("skip", "fail")
HEADS = ("auto", "host", "device")  # where the log-softmax over the vocabulary runs (WindowScorer.open)


@dataclass
class ScoreConfig:
    task: str = "perplexity"
    batch_tokens: int = 4096
    max_padding: float = 0.2
    max_context: int | None = None  # default: the model's max_position_embeddings
    stride: int | None = None  # default: context // 2
    chunk_records: int = 512
    on_bad_record: str = "skip"
    provider: str = "auto"
    threads: int | None = None  # onnxruntime intra-op threads (None: onnxruntime's default)
    resume: bool = False
    force: bool = False
    progress: bool = True
    engine: str = "local"
    num_workers: int | None = None
    ray_address: str | None = None
    max_new_tokens: int = 64  # --task generate (greedy)
    head: str = "auto"  # where the log-softmax over the vocabulary runs: auto (device on a GPU), host, device
    max_record_chars: int = MAX_RECORD_CHARS  # a record with more characters of text (or token ids) is a bad record

    def check(self) -> None:
        if self.task not in TASKS:
            raise OnnxpipeError(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        if self.engine not in ENGINES:
            raise OnnxpipeError(f"unknown engine {self.engine!r}; choose one of {', '.join(ENGINES)}")
        if self.on_bad_record not in BAD_RECORD_MODES:
            raise OnnxpipeError(f"--on-bad-record must be one of {', '.join(BAD_RECORD_MODES)}")
        if self.batch_tokens < 1 or self.chunk_records < 1:
            raise OnnxpipeError("--batch-tokens and --chunk-records must be positive")
        if self.max_record_chars < 1:
            raise OnnxpipeError(f"--max-record-chars must be positive, got {self.max_record_chars}")
        if not 0.0 <= self.max_padding < 1.0:
            raise OnnxpipeError(f"--max-padding must be in [0, 1), got {self.max_padding}")
        if self.task == "generate" and self.engine != "local":
            raise OnnxpipeError("--task generate runs on the local engine only (--engine local)")
        if self.resume and self.force:
            raise OnnxpipeError("--resume and --force contradict each other; pass one")
        if self.head not in HEADS:
            raise OnnxpipeError(f"unknown logits head {self.head!r}; choose one of {', '.join(HEADS)}")
