"""Task ``generate`` (``onnxpipe score --task generate``): greedy generation for each record's prompt, through the
runtime's generate API.

A record holds one prompt (``prompt`` or ``text``; or ``prompt_ids`` / ``input_ids``). Text is tokenized the way
``onnxpipe.runtime.generate`` tokenizes it (the tokenizer's own special tokens). Prompts of a chunk are grouped by
length (prompt + ``max_new_tokens`` slots) into batches with the same token budget and padding bound as scoring,
and each batch is one ``LanguageModel.generate`` call, greedy, so a resumed run regenerates the same text. The
row is ``id, generated, generated_ids, tokens (generated), finish_reason``. Local engine only. A prompt the tokenizer
fails on, or whose generation fails (a failed batch is rerun prompt by prompt), is a bad record.
"""

from __future__ import annotations

from typing import Any, Callable

from onnxpipe.runtime.generate import load
from onnxpipe.score.batching import ChunkStats, Progress, plan_batches
from onnxpipe.score.encoding import Item
from onnxpipe.score.job import ScoreJob
from onnxpipe.score.records import BadRecord, Record, first_line


class GenerateWorker:
    """The local engine's generation: records -> prompt Items -> length-bucketed batches (LanguageModel) -> rows."""

    def __init__(self, job: ScoreJob, announce: Callable[[str], None]):
        c = job.config
        self.job = job
        self.lm = load(job.model_dir.path, c.provider, threads=c.threads, announce=announce)
        self.provider = self.lm.provider_choice.summary()
        self.max_positions = int(self.lm.session.max_positions)

    def items(self, records: list[Record]) -> list[Item | str]:
        out: list[Item | str] = []
        for r in records:
            try:
                ids = self.lm.encode(r.prompt) if r.prompt is not None else list(r.prompt_ids or [])
            except Exception as e:  # the tokenizers library's own error types
                out.append(f"the tokenizer failed on it ({first_line(e)})")
                continue
            if not ids:
                out.append("empty prompt (no tokens)")
            elif len(ids) >= self.max_positions:
                out.append(f"prompt has {len(ids)} tokens: no room to generate within the context ({self.max_positions})")
            else:
                out.append(Item(ids, len(ids)))
        return out

    def run(self, records: list[Record], items: list[Item], on_progress: Progress
            ) -> tuple[list[dict[str, Any]], ChunkStats, list[BadRecord]]:
        c = self.job.config
        rows: list[dict[str, Any] | None] = [None] * len(items)
        failed: list[BadRecord] = []
        stats = ChunkStats()
        lengths = [min(len(it.tokens) + c.max_new_tokens, self.max_positions) for it in items]
        batches = plan_batches(lengths, c.batch_tokens, c.max_padding)
        prompts_done = 0
        for batch in batches:
            generated = 0
            for group, results in self._generate(items, batch):
                if isinstance(results, str):
                    failed.append(BadRecord(records[group[0]].where, results))
                    continue
                for i, res in zip(group, results):
                    rows[i] = {"id": records[i].id, "generated": res.text, "generated_ids": list(res.token_ids),
                               "tokens": len(res.token_ids), "finish_reason": res.finish_reason}
                    generated += len(res.token_ids)
            stats.batches += 1
            stats.input_tokens += sum(len(items[i].tokens) for i in batch)
            stats.padded_slots += max(len(items[i].tokens) for i in batch) * len(batch)
            prompts_done += len(batch)
            on_progress(len(batch), generated, prompts_done, len(items))
        return [r for r in rows if r is not None], stats, failed

    def _generate(self, items: list[Item], batch: list[int]) -> list[tuple[list[int], Any]]:
        """(indices, results) for the batch; when it fails, prompt by prompt, a prompt failing alone giving
        ([index], reason)."""
        c = self.job.config
        groups = [batch] if len(batch) > 1 else []
        groups += [[i] for i in batch]
        out: list[tuple[list[int], Any]] = []
        for group in groups:
            try:
                out.append((group, self.lm.generate([items[i].tokens for i in group], max_new_tokens=c.max_new_tokens,
                                                    temperature=0.0)))
            except Exception as e:  # onnxruntime's own error types
                if len(group) == 1:
                    out.append((group, f"generation failed on it ({first_line(e)})"))
                continue
            if group is batch:
                return out
        return out
