"""Rows -> samples: format, tokenize with the loss mask, apply the length policy, count everything.

`RowTokenizer` handles one row at a time (shared by in-memory and streaming reading); `load_source` reads a
whole source into a `TokenStore` through the cache. A bad row stops the run naming file and row, or with
`on_bad_row: skip` is counted and quoted in the statistics.
"""

from __future__ import annotations

from typing import Any

from sft.config import DataConfig, DataSource
from sft.data.cache import cache_key, cached, tokenizer_fingerprint
from sft.data.chat import Sample, tokenize_chat, tokenize_plain
from sft.data.formats import BadRow, RowFormat
from sft.data.lengths import fit_length
from sft.data.sources import Row, RowSource, open_source
from sft.data.stats import DataStats, SourceStats
from sft.data.store import StoreBuilder, TokenStore
from sft.errors import SftError


class RowTokenizer:
    def __init__(self, spec: DataSource, tokenizer: Any, data: DataConfig) -> None:
        self.tokenizer = tokenizer
        self.data = data
        self.train_on = spec.train_on or data.train_on
        self.format = RowFormat(spec.format, spec.columns, spec.system_prompt)
        self.stats = SourceStats(name=spec.path, format=spec.format)

    def samples(self, row: Row) -> list[Sample]:
        """The samples a row gives (none when it is dropped or skipped); every outcome is counted."""
        st = self.stats
        st.rows += 1
        try:
            if row.error is not None:
                raise BadRow(row.error)
            assert row.data is not None
            sample = self._tokenize(row.data)
            kept, event, empty = fit_length(
                sample, self.data.max_seq_len, self.data.on_overflow, self.data.split_overlap
            )
        except BadRow as e:
            if self.data.on_bad_row == "error":
                raise SftError(
                    f"{row.where}: {e} (data.on_bad_row=skip skips such rows and counts them)"
                ) from None
            st.skip(row.where, str(e))
            return []
        st.format = self.format.format
        st.truncated += event == "truncated"
        st.dropped_too_long += event == "dropped"
        if event == "split":
            st.split_rows += 1
            st.split_chunks += len(kept)
            st.empty_chunks += empty
        for s in kept:
            st.samples += 1
            st.tokens += len(s.input_ids)
            st.trained_tokens += sum(t != -100 for t in s.labels[1:])
        return kept

    def _tokenize(self, row: dict[str, Any]) -> Sample:
        ex = self.format.example(row)
        try:
            if ex.messages is not None:
                return tokenize_chat(self.tokenizer, ex.messages, self.train_on)
            if ex.text is not None:
                return tokenize_plain(self.tokenizer, ex.text, None, "all", self.data.add_eos)
            return tokenize_plain(
                self.tokenizer, ex.prompt or "", ex.completion, self.train_on, self.data.add_eos
            )
        except BadRow:
            raise
        except Exception as e:  # a template's raise_exception, a tokenizer refusing input: name the row
            raise BadRow(
                f"the tokenizer or chat template failed on this row: {type(e).__name__}: {e}"
            ) from None


def settings_of(spec: DataSource, data: DataConfig) -> dict[str, Any]:
    """The settings the tokens of a source depend on (part of its cache key)."""
    return {
        "source": spec.model_dump(exclude={"weight"}),
        "train_on": spec.train_on or data.train_on,
        **data.model_dump(include={"max_seq_len", "on_overflow", "split_overlap", "on_bad_row", "add_eos"}),
    }


def read_source(src: RowSource, tokenizer: Any, data: DataConfig) -> tuple[TokenStore, SourceStats]:
    rt = RowTokenizer(src.spec, tokenizer, data)
    builder = StoreBuilder()
    for row in src.rows():
        for s in rt.samples(row):
            builder.add(s)
    if rt.stats.samples == 0:
        raise SftError(
            f"data: {src.name} gave no usable samples ({rt.stats.summary()}); check the file and data.max_seq_len"
        )
    return builder.build(), rt.stats


def load_source(spec: DataSource, tokenizer: Any, data: DataConfig) -> tuple[TokenStore, SourceStats, bool]:
    """A whole source, tokenized: (store, stats, cache hit)."""
    src = open_source(spec)
    if not data.cache:
        return (*read_source(src, tokenizer, data), False)
    key = cache_key(src.fingerprint(), tokenizer_fingerprint(tokenizer), settings_of(spec, data))
    return cached(key, lambda: read_source(src, tokenizer, data))


def load_sources(
    specs: list[DataSource], tokenizer: Any, data: DataConfig
) -> tuple[list[TokenStore], DataStats, list[bool]]:
    stores, stats, hits = [], DataStats(), []
    for spec in specs:
        store, st, hit = load_source(spec, tokenizer, data)
        stores.append(store)
        stats.sources.append(st)
        hits.append(hit)
    return stores, stats, hits


def check_sources(data: DataConfig) -> None:
    """Fail fast on missing files, before any model is loaded or output written."""
    for spec in [*data.train, *data.eval]:
        open_source(spec)
