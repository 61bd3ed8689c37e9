"""Rows -> samples: format, tokenize with the loss mask, apply the length policy, count everything.

`RowTokenizer` handles one row at a time (shared by in-memory and streaming reading); `load_source` reads a
whole source into a `TokenStore` through the cache. A bad row stops the run naming file and row, or with
`on_bad_row: skip` is counted and quoted in the statistics.
"""

from __future__ import annotations

from typing import Any

from sft.config import DataConfig, DataSource
from sft.data.cache import cache_key, cached, tokenizer_fingerprint
from sft.data.chat import Sample, render_chat, tokenize_plain, tokenize_rendered, trained_tokens
from sft.data.formats import BadRow, NothingTrained, RowFormat
from sft.data.lengths import fit_length
from sft.data.sources import Row, RowSource, open_source
from sft.data.stats import DataStats, SourceStats
from sft.data.store import StoreBuilder, TokenStore
from sft.data.template import TemplateProfile, template_profile
from sft.errors import SftError


class RowTokenizer:
    def __init__(self, spec: DataSource, tokenizer: Any, data: DataConfig) -> None:
        self.tokenizer = tokenizer
        self.data = data
        self.train_on = spec.train_on or data.train_on
        self.format = RowFormat(spec.format, spec.columns, spec.system_prompt, data.system_role == "merge")
        self.stats = SourceStats(name=spec.path, format=spec.format)
        self.profile: TemplateProfile | None = (
            None  # what the chat template does, probed at the first chat row
        )
        self.stop_ids: set[int] = set()  # tokens that end an answer: training one teaches the model to stop
        self.quirks: list[str] = []  # of the row being tokenized

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
            if isinstance(e, NothingTrained):
                st.untrained += 1
                st.first_untrained = st.first_untrained or f"{row.where}: {e}"
            return []
        st.format = self.format.format
        st.truncated += event == "truncated"
        st.dropped_too_long += event == "dropped"
        if event == "split":
            st.split_rows += 1
            st.split_chunks += len(kept)
            st.empty_chunks += empty
        for quirk in self.quirks:
            st.quirks[quirk] = st.quirks.get(quirk, 0) + 1
        for s in kept:
            st.samples += 1
            st.tokens += len(s.input_ids)
            st.trained_tokens += trained_tokens(s.labels)
            if self.stop_ids:
                st.stop_expected += 1
                st.stop_trained += any(t in self.stop_ids for t in s.labels[1:])
        return kept

    def _tokenize(self, row: dict[str, Any]) -> Sample:
        ex = self.format.example(row)
        self.quirks, self.stop_ids = [], set()
        try:
            if ex.messages is not None:
                if self.profile is None:
                    self.profile = template_profile(self.tokenizer)
                chat = render_chat(self.tokenizer, ex.messages, self.data.reasoning, self.profile)
                # no stop token at all: an id no label has, so the source check says so
                self.quirks, self.stop_ids = self.profile.quirks + chat.quirks, self.profile.stop_ids or {-1}
                return tokenize_rendered(self.tokenizer, chat, self.train_on)
            if ex.text is not None:
                return tokenize_plain(self.tokenizer, ex.text, None, "all", self.data.add_eos)
            eos = self.tokenizer.eos_token_id
            self.stop_ids = set() if eos is None else {eos}
            return tokenize_plain(
                self.tokenizer, ex.prompt or "", ex.completion, self.train_on, self.data.add_eos
            )
        except (BadRow, SftError):
            raise
        except Exception as e:  # a template's raise_exception, a tokenizer refusing input: name the row
            raise BadRow(
                f"the tokenizer or chat template failed on this row: {type(e).__name__}: {e}"
            ) from None

    def check(self) -> None:
        """After the whole source: fail before training when its rows would teach nothing, or never to stop."""
        st, name = self.stats, self.stats.name
        if st.untrained > self.data.max_untrained_share * st.rows:
            raise SftError(
                f"data: {name}: {st.untrained} of {st.rows} rows ({st.untrained / max(st.rows, 1):.0%}) give no "
                f"trained token, more than data.max_untrained_share={self.data.max_untrained_share} (first: "
                f"{st.first_untrained}); raise data.max_seq_len, use data.on_overflow=split, or fix the rows"
            )
        if st.stop_expected and not st.stop_trained:
            if self.profile is not None:
                marker = self.profile.eot_last
                what = (
                    f"its end-of-turn marker {marker.strip()!r}"
                    if marker
                    else "an end-of-turn token (the chat template puts no special token after an answer)"
                )
                fix = (
                    "raise data.max_seq_len or use data.on_overflow=split"
                    if marker
                    else "use a chat template that ends answers"
                )
            else:
                what, fix = "the eos token", "set data.add_eos=true, or raise data.max_seq_len"
            raise SftError(
                f"data: {name}: none of its {st.stop_expected} samples trains {what}, so the model would never "
                f"learn to stop; {fix}"
            )


def settings_of(spec: DataSource, data: DataConfig) -> dict[str, Any]:
    """The settings the tokens of a source depend on (part of its cache key)."""
    return {
        "source": spec.model_dump(exclude={"weight"}),
        "train_on": spec.train_on or data.train_on,
        **data.model_dump(
            include={
                "max_seq_len", "on_overflow", "split_overlap", "on_bad_row", "add_eos", "reasoning", "system_role",
                "max_untrained_share",
            }
        ),
    }  # fmt: skip


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
    rt.check()
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
