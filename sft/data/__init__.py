"""The data pipeline: sources -> format -> tokens + loss mask -> length policy -> cache -> order -> pack -> collate.

One file per stage: sources.py (reading rows), formats.py (row -> conversation / text), chat.py (tokens and
loss mask), lengths.py (truncate / drop / split), prepare.py (a source -> samples, counted), cache.py,
store.py, mixture.py and sampler.py (which samples each step), pack.py and collate.py (batch tensors and the
layout), streaming.py (reading a stream), steps.py (the protocol of the training steps) with one class per
data mode in indexed.py and streamed.py, pipeline.py (builds what the loop sees) and preview.py.
"""

from __future__ import annotations

from typing import Any

from sft.config import DataConfig, DataSource
from sft.data.chat import Sample
from sft.data.prepare import check_sources, read_source
from sft.data.sources import open_source
from sft.data.stats import DataStats, SourceStats

__all__ = ["DataStats", "Sample", "SourceStats", "check_sources", "load_samples"]


def load_samples(
    sources: list[DataSource], tokenizer: Any, data: DataConfig
) -> tuple[list[Sample], DataStats]:
    """Every sample of the sources as Python lists, without the cache (for tests and small tools)."""
    samples: list[Sample] = []
    stats = DataStats()
    for spec in sources:
        store, st = read_source(open_source(spec), tokenizer, data)
        samples += [store.sample(i) for i in range(len(store))]
        stats.sources.append(st)
    return samples, stats
