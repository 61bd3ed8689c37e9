"""The data pipeline: sources -> format -> tokens + loss mask -> length policy -> (sampler, collate)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sft.config import DataConfig, DataSource
from sft.data.chat import IGNORE_INDEX, Sample, check_messages, tokenize_chat
from sft.data.sources import read_jsonl, resolve_path
from sft.errors import SftError


@dataclass
class DataStats:
    rows: int = 0
    samples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    per_source: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        share = self.trained_tokens / max(self.tokens, 1)
        return (
            f"{self.rows} rows -> {self.samples} samples, {self.tokens} tokens "
            f"({share:.0%} trained); truncated {self.truncated}, dropped as too long {self.dropped_too_long}"
        )


def check_sources(data: DataConfig) -> None:
    """Fail fast on missing files, before any model is loaded or output written."""
    for src in [*data.train, *data.eval]:
        resolve_path(src.path)


def load_samples(
    sources: list[DataSource], tokenizer: Any, data: DataConfig
) -> tuple[list[Sample], DataStats]:
    stats = DataStats()
    samples: list[Sample] = []
    for src in sources:
        path = resolve_path(src.path)
        before = len(samples)
        for lineno, row in read_jsonl(path):
            where = f"{path}:{lineno}"
            stats.rows += 1
            sample = tokenize_chat(tokenizer, check_messages(row, where), where)
            if len(sample.input_ids) > data.max_seq_len:
                if data.on_overflow == "drop":
                    stats.dropped_too_long += 1
                    continue
                sample = Sample(sample.input_ids[: data.max_seq_len], sample.labels[: data.max_seq_len])
                stats.truncated += 1
                if all(t == IGNORE_INDEX for t in sample.labels):
                    stats.dropped_too_long += 1  # truncation cut away every answer token
                    continue
            samples.append(sample)
            stats.tokens += len(sample.input_ids)
            stats.trained_tokens += sum(t != IGNORE_INDEX for t in sample.labels)
        stats.per_source[src.path] = len(samples) - before
        if len(samples) == before:
            raise SftError(f"data: {src.path} gave no usable samples (empty, or every row too long)")
    stats.samples = len(samples)
    return samples, stats
