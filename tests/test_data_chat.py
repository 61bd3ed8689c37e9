"""Chat rows -> tokens and loss mask on the built-in model's real ChatML template; bad rows name file:line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sft.config import DataConfig, DataSource
from sft.data import load_samples
from sft.data.chat import IGNORE_INDEX, check_messages, tokenize_chat
from sft.data.collate import pad_collate
from sft.data.sources import read_jsonl, resolve_path
from sft.errors import SftError


def trained_text(tokenizer: Any, input_ids: list[int], labels: list[int]) -> str:
    return tokenizer.decode([t for t, lab in zip(input_ids, labels, strict=True) if lab != IGNORE_INDEX])


def test_mask_is_exactly_the_answers_and_their_end_of_turn(tokenizer: Any) -> None:
    path = resolve_path("builtin:jargon/train")
    _, row = next(read_jsonl(path))
    messages = check_messages(row, "row")
    s = tokenize_chat(tokenizer, messages, "row")
    answer = messages[-1]["content"]
    assert trained_text(tokenizer, s.input_ids, s.labels) == answer + "<|im_end|>"
    # and the untrained part is everything else: system prompt, user turn, assistant header
    untrained = tokenizer.decode(
        [t for t, lab in zip(s.input_ids, s.labels, strict=True) if lab == IGNORE_INDEX]
    )
    assert messages[0]["content"] in untrained and "<|im_start|>assistant\n" in untrained
    assert answer not in untrained


def test_multi_turn_trains_every_assistant_turn(tokenizer: Any) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a prime."},
        {"role": "assistant", "content": "Seven."},
        {"role": "user", "content": "Another one?"},
        {"role": "assistant", "content": "Eleven, and then thirteen."},
    ]
    s = tokenize_chat(tokenizer, messages, "row")
    assert (
        trained_text(tokenizer, s.input_ids, s.labels)
        == "Seven.<|im_end|>Eleven, and then thirteen.<|im_end|>"
    )
    assert len(s.input_ids) == len(s.labels)


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
    ],
)
def test_bad_rows_name_file_and_line(tmp_path: Path, tokenizer: Any, line: str, message: str) -> None:
    good = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    path = tmp_path / "data.jsonl"
    path.write_text(f"{good}\n\n{line}\n")
    with pytest.raises(SftError) as err:
        load_samples([DataSource(path=str(path))], tokenizer, DataConfig())
    assert f"{path}:3:" in str(err.value) and message in str(err.value)


def test_non_utf8_and_missing_file(tmp_path: Path, tokenizer: Any) -> None:
    path = tmp_path / "bin.jsonl"
    path.write_bytes(b'{"messages": "\xff\xfe"}\n')
    with pytest.raises(SftError, match=r"bin.jsonl:1: not valid UTF-8"):
        load_samples([DataSource(path=str(path))], tokenizer, DataConfig())
    with pytest.raises(SftError, match="file not found: .*nope.jsonl"):
        load_samples([DataSource(path=str(tmp_path / "nope.jsonl"))], tokenizer, DataConfig())


def test_length_policy_is_counted(tokenizer: Any) -> None:
    src = [DataSource(path="builtin:jargon/eval")]
    full, stats = load_samples(src, tokenizer, DataConfig(max_seq_len=4096))
    assert stats.truncated == 0 and stats.samples == stats.rows == 100
    cut, stats = load_samples(src, tokenizer, DataConfig(max_seq_len=96))
    assert stats.truncated > 0 and all(len(s.input_ids) <= 96 for s in cut)
    assert stats.samples + stats.dropped_too_long == stats.rows
    kept, stats = load_samples(src, tokenizer, DataConfig(max_seq_len=96, on_overflow="drop"))
    assert stats.dropped_too_long > 0 and len(kept) == stats.rows - stats.dropped_too_long
    assert all(len(s.input_ids) <= 96 for s in kept)
    assert len(full) == 100


def test_pad_collate(tokenizer: Any) -> None:
    samples, _ = load_samples([DataSource(path="builtin:jargon/eval")], tokenizer, DataConfig())
    batch = pad_collate(samples[:3], tokenizer.pad_token_id)
    lengths = [len(s.input_ids) for s in samples[:3]]
    assert batch["input_ids"].shape == (3, -(-max(lengths) // 8) * 8)
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
