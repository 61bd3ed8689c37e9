"""Chat rows -> tokens and loss mask on the built-in model's ChatML template and on the Llama 3 / Qwen 2.5
template fixtures (masks decoded back to text); bad rows name file:line; the length policy is counted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sft.config import DataConfig, DataSource
from sft.data import load_samples
from sft.data.chat import IGNORE_INDEX, tokenize_chat
from sft.data.formats import RowFormat
from sft.data.sources import open_source
from sft.errors import SftError
from tests.conftest import swap_template

MULTI_TURN = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a prime."},
    {"role": "assistant", "content": "Seven."},
    {"role": "user", "content": "Another one?"},
    {"role": "assistant", "content": "Eleven, and then thirteen."},
]


def trained_text(tokenizer: Any, input_ids: list[int], labels: list[int]) -> str:
    return tokenizer.decode([t for t, lab in zip(input_ids, labels, strict=True) if lab != IGNORE_INDEX])


@pytest.fixture(scope="module", params=["chatml", "llama3", "qwen2_5"])
def any_template(request: pytest.FixtureRequest, tokenizer: Any) -> tuple[Any, str]:
    """(tokenizer, end-of-turn marker) for each template: the built-in ChatML one and two fixtures (all the
    fixture families: tests/test_data_templates.py)."""
    if request.param == "chatml":
        return tokenizer, "<|im_end|>"
    tok = swap_template(tokenizer, request.param)
    return tok, tok.eos_token


def first_jargon_row() -> list[dict[str, str]]:
    src = open_source(DataSource(path="builtin:jargon/train"))
    row = next(src.rows())
    assert row.data is not None
    ex = RowFormat("messages", {}, None).example(row.data)
    assert ex.messages is not None
    return ex.messages


def test_mask_is_exactly_the_answers_and_their_end_of_turn(any_template: tuple[Any, str]) -> None:
    tok, eot = any_template
    messages = first_jargon_row()
    s = tokenize_chat(tok, messages)
    answer = messages[-1]["content"]
    assert trained_text(tok, s.input_ids, s.labels) == answer.strip() + eot
    # and the untrained part is everything else: system prompt, user turn, assistant header
    untrained = tok.decode([t for t, lab in zip(s.input_ids, s.labels, strict=True) if lab == IGNORE_INDEX])
    assert messages[0]["content"] in untrained and "assistant" in untrained
    assert answer not in untrained
    assert s.labels[0] == IGNORE_INDEX and len(s.input_ids) == len(s.labels)


def test_train_on_every_assistant_turn_the_last_or_all(any_template: tuple[Any, str]) -> None:
    tok, eot = any_template
    s = tokenize_chat(tok, MULTI_TURN, "assistant")
    assert trained_text(tok, s.input_ids, s.labels) == f"Seven.{eot}Eleven, and then thirteen.{eot}"
    s = tokenize_chat(tok, MULTI_TURN, "last_assistant")
    assert trained_text(tok, s.input_ids, s.labels) == f"Eleven, and then thirteen.{eot}"
    s = tokenize_chat(tok, MULTI_TURN, "all")
    assert s.labels[1:] == s.input_ids[1:]  # every token but the first (nothing predicts it)
    rendered = tok.apply_chat_template(MULTI_TURN, tokenize=False)
    assert tok.decode(s.input_ids) == rendered


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"messages": [{"role": "user", "content": "hi"}', "malformed JSON"),
        ('["a list"]', "must be a JSON object"),
        ('{"text": "no messages"}', "no 'messages' field"),
        ('{"messages": []}', "non-empty list"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
        ('{"messages": [{"role": "robot", "content": "hi"}]}', "unknown role 'robot'"),
        ('{"messages": [{"role": "user"}]}', "needs 'role' and 'content'"),
        ('{"messages": [{"role": "assistant", "content": "hi"}]}', "starts with an assistant turn"),
        ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]}', "empty"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path: Path, tokenizer: Any, line: str, message: str) -> None:
    good = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    path = tmp_path / "data.jsonl"
    path.write_text(f"{good}\n\n{line}\n{good}\n")
    with pytest.raises(SftError) as err:
        load_samples([DataSource(path=str(path))], tokenizer, DataConfig())
    assert f"{path}:3:" in str(err.value) and message in str(err.value)
    assert "on_bad_row=skip" in str(err.value)  # the error says how to go on
    # skipping counts the row and quotes it; the good rows stay
    samples, stats = load_samples([DataSource(path=str(path))], tokenizer, DataConfig(on_bad_row="skip"))
    assert len(samples) == 2 and stats.total.skipped == 1 and stats.total.rows == 3
    assert f"{path}:3:" in stats.report() and message in stats.report()


def test_non_utf8_and_missing_file(tmp_path: Path, tokenizer: Any) -> None:
    path = tmp_path / "bin.jsonl"
    path.write_bytes(b'{"messages": "\xff\xfe"}\n')
    with pytest.raises(SftError, match=r"bin.jsonl:1: not valid UTF-8"):
        load_samples([DataSource(path=str(path))], tokenizer, DataConfig())
    with pytest.raises(SftError, match="file not found: .*nope.jsonl"):
        load_samples([DataSource(path=str(tmp_path / "nope.jsonl"))], tokenizer, DataConfig())
    with pytest.raises(SftError, match="gave no usable samples"):  # every row skipped: still not silent
        load_samples([DataSource(path=str(path))], tokenizer, DataConfig(on_bad_row="skip"))


def test_length_policy_is_counted(tokenizer: Any) -> None:
    src = [DataSource(path="builtin:jargon/eval")]
    full, stats = load_samples(src, tokenizer, DataConfig(max_seq_len=4096))
    assert stats.total.truncated == 0 and stats.total.samples == stats.total.rows == 100 and len(full) == 100
    cut, stats = load_samples(src, tokenizer, DataConfig(max_seq_len=96))
    assert stats.total.truncated > 0 and all(len(s.input_ids) <= 96 for s in cut) and len(cut) == 100
    # rows whose prompt alone fills 44 tokens have nothing left to train: skipped and counted, and when more
    # than data.max_untrained_share of a source's rows, an error before anything trains
    with pytest.raises(SftError, match=r"jargon/eval: (\d+) of 100 rows .* give no trained token, more than"):
        load_samples(src, tokenizer, DataConfig(max_seq_len=44, on_bad_row="skip"))
    # allowed, the rows are skipped and counted; but then no sample keeps its <|im_end|>: never learns to stop
    with pytest.raises(SftError, match="none of its .* samples trains its end-of-turn marker '<|im_end|>'"):
        load_samples(src, tokenizer, DataConfig(max_seq_len=44, on_bad_row="skip", max_untrained_share=1))
    cut, stats = load_samples(src, tokenizer, DataConfig(max_seq_len=64, on_bad_row="skip"))
    assert stats.total.truncated > 0 and 0 < stats.total.stop_trained < stats.total.stop_expected == 100
    kept, stats = load_samples(src, tokenizer, DataConfig(max_seq_len=96, on_overflow="drop"))
    assert stats.total.dropped_too_long > 0 and len(kept) == stats.total.rows - stats.total.dropped_too_long
    assert all(len(s.input_ids) <= 96 for s in kept)
    assert "dropped as too long" in stats.summary()


def test_a_row_longer_than_any_policy_allows_is_a_bad_row(tmp_path: Path, tokenizer: Any) -> None:
    long_prompt = {
        "messages": [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "ok"}]
    }
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps(long_prompt) + "\n")
    with pytest.raises(SftError, match=rf"{path.name}:1: the row is \d+ tokens and none of its first 64"):
        load_samples([DataSource(path=str(path))], tokenizer, DataConfig(max_seq_len=64))
    # split keeps the answer in the last chunk, without the question: allowed, and counted
    samples, stats = load_samples(
        [DataSource(path=str(path))], tokenizer, DataConfig(max_seq_len=64, on_overflow="split")
    )
    assert len(samples) == 1 and stats.total.split_rows == 1 and stats.total.empty_chunks > 0


def test_a_tokenizer_without_chat_template_fails_only_for_chat_rows(tokenizer: Any) -> None:
    import copy

    from sft.data.chat import tokenize_plain

    base = copy.deepcopy(tokenizer)
    base.chat_template = None  # a base (not instruct) model's tokenizer
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    with pytest.raises(SftError, match="no chat template, so chat rows cannot be rendered"):
        tokenize_chat(base, messages)
    # raw text needs no template: every token after the first is trained
    s = tokenize_plain(base, "Now is the winter of our discontent", None, "all", add_eos=True)
    assert s.input_ids[-1] == base.eos_token_id and s.labels[1:] == s.input_ids[1:]
