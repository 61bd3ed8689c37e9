"""What happened to the data: rows read, samples made, tokens trained, and every row cut, split, dropped or
skipped, per source. Saved next to the cached tokens and printed at the start of training and by preview."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

MAX_EXAMPLES = 5  # bad rows quoted by file and row; the rest are counted


@dataclass
class SourceStats:
    name: str = ""
    format: str = ""
    rows: int = 0
    samples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0  # rows cut to max_seq_len
    dropped_too_long: int = 0  # rows dropped by on_overflow=drop
    split_rows: int = 0  # rows split into chunks by on_overflow=split
    split_chunks: int = 0  # samples those rows became
    empty_chunks: int = 0  # chunks left out because they hold no trained token
    skipped: int = 0  # bad rows skipped by on_bad_row=skip
    untrained: int = 0  # of the skipped rows: those that gave no trained token (cut by truncation, say)
    first_untrained: str = ""  # where and why, for the error when there are too many
    skipped_examples: list[str] = field(default_factory=list)
    stop_expected: int = 0  # samples that should teach the model to stop (chat turns, completions)
    stop_trained: int = 0  # of those: samples with a trained end-of-turn / eos token
    quirks: dict[str, int] = field(default_factory=dict)  # what the chat template did -> rows

    def skip(self, where: str, reason: str) -> None:
        self.skipped += 1
        if len(self.skipped_examples) < MAX_EXAMPLES:
            self.skipped_examples.append(f"{where}: {reason}")

    def merge(self, other: SourceStats) -> None:
        for key, value in asdict(other).items():
            if isinstance(value, int):
                setattr(self, key, getattr(self, key) + value)
        room = MAX_EXAMPLES - len(self.skipped_examples)
        self.skipped_examples += other.skipped_examples[: max(room, 0)]
        for quirk, n in other.quirks.items():
            self.quirks[quirk] = self.quirks.get(quirk, 0) + n

    def summary(self) -> str:
        share = self.trained_tokens / max(self.tokens, 1)
        line = f"{self.rows} rows -> {self.samples} samples, {self.tokens} tokens ({share:.0%} trained)"
        events = [
            (self.truncated, "truncated"),
            (self.dropped_too_long, "dropped as too long"),
            (self.split_rows, f"split into {self.split_chunks} samples"),
            (self.empty_chunks, "chunks without a trained token left out"),
            (self.skipped, "bad rows skipped"),
            (self.untrained, "of them without a trained token"),
        ]
        said = [f"{n} {what}" for n, what in events if n]
        return line + ("; " + ", ".join(said) if said else "; nothing cut, dropped or skipped")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SourceStats:
        return cls(**d)


@dataclass
class DataStats:
    """Totals over several sources, with each source's own numbers."""

    sources: list[SourceStats] = field(default_factory=list)

    @property
    def total(self) -> SourceStats:
        out = SourceStats(name="total")
        for s in self.sources:
            out.merge(s)
        return out

    def summary(self) -> str:
        return self.total.summary()

    def template_notes(self) -> list[str]:
        """Per source, what its chat template did that the loss mask handled (sft data preview, train start)."""
        return [
            f"  {s.name}: template: {quirk} ({n} rows)"
            for s in self.sources
            for quirk, n in sorted(s.quirks.items())
        ]

    def report(self) -> str:
        """Multi-line: totals, each source when there are several, and the first skipped rows."""
        lines = [self.summary()]
        if len(self.sources) > 1:
            lines += [f"  {s.name} ({s.format}): {s.summary()}" for s in self.sources]
        for s in self.sources:
            lines += [f"  skipped {x}" for x in s.skipped_examples]
        return "\n".join(lines)
