"""Each format on real rows (the built-in Jargon and Shakespeare data, rewritten into every layout), each file
type and the `datasets` paths (saved folder; hub via a stand-in loader), column mapping and system prompts."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from sft.config import DataConfig, DataSource
from sft.data import load_samples
from sft.data.chat import IGNORE_INDEX, Sample, tokenize_chat
from sft.data.sources import open_source
from sft.errors import SftError


def jargon(n: int = 6) -> list[dict[str, Any]]:
    src = open_source(DataSource(path="builtin:jargon/eval"))
    return [r.data for _, r in zip(range(n), src.rows(), strict=False) if r.data is not None]


def shakespeare(n: int = 3) -> list[dict[str, Any]]:
    src = open_source(DataSource(path="builtin:shakespeare/eval"))
    return [r.data for _, r in zip(range(n), src.rows(), strict=False) if r.data is not None]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def trained(tok: Any, s: Sample) -> str:
    return tok.decode([t for t, lab in zip(s.input_ids, s.labels, strict=True) if lab != IGNORE_INDEX])


def load(tok: Any, path: Path | str, **kw: Any) -> list[Sample]:
    data_kw = {k: kw.pop(k) for k in list(kw) if k in DataConfig.model_fields}
    samples, _ = load_samples(
        [DataSource(path=str(path), **kw)], tok, DataConfig(max_seq_len=4096, **data_kw)
    )
    return samples


def test_chat_layouts_give_the_same_tokens_as_messages(tmp_path: Path, tokenizer: Any) -> None:
    rows = jargon()
    reference = load(tokenizer, write_jsonl(tmp_path / "m.jsonl", rows))
    sharegpt = [
        {
            "conversations": [
                {"from": {"user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]}
                for m in r["messages"]
            ]
        }
        for r in rows
    ]
    mapped = [
        {"dialog": [{"speaker": m["role"], "utterance": m["content"]} for m in r["messages"]]} for r in rows
    ]
    for fmt, data, columns in [
        ("sharegpt", sharegpt, {}),
        ("messages", mapped, {"messages": "dialog", "role": "speaker", "content": "utterance"}),
    ]:
        path = write_jsonl(tmp_path / f"{fmt}.jsonl", data)
        for format_ in ("auto", fmt):
            got = load(tokenizer, path, format=format_, columns=columns)
            assert [s.input_ids for s in got] == [s.input_ids for s in reference], (fmt, format_)
            assert [s.labels for s in got] == [s.labels for s in reference]
    assert trained(tokenizer, reference[0]) == rows[0]["messages"][-1]["content"] + "<|im_end|>"


def test_alpaca_and_system_prompts(tmp_path: Path, tokenizer: Any) -> None:
    rows = jargon(3)
    alpaca = [
        {
            "instruction": r["messages"][0]["content"],
            "input": "Answer briefly." if i else "",
            "output": r["messages"][1]["content"],
        }
        for i, r in enumerate(rows)
    ]
    got = load(tokenizer, write_jsonl(tmp_path / "a.jsonl", alpaca), system_prompt="Be precise.")
    for row, s in zip(alpaca, got, strict=True):
        user = row["instruction"] + ("\n\n" + row["input"] if row["input"] else "")
        msgs = [
            {"role": "system", "content": "Be precise."},
            {"role": "user", "content": user},
            {"role": "assistant", "content": row["output"]},
        ]
        assert s == tokenize_chat(tokenizer, msgs)
    # a per-row system column wins over the source's system prompt; a system turn in the row is kept
    alpaca[0]["system"] = "Row system."
    got = load(tokenizer, write_jsonl(tmp_path / "a2.jsonl", alpaca), system_prompt="Be precise.")
    assert "Row system." in tokenizer.decode(got[0].input_ids) and "Be precise." not in tokenizer.decode(
        got[0].input_ids
    )


def test_prompt_completion_plain_and_conversational(tmp_path: Path, tokenizer: Any) -> None:
    rows = [
        {"prompt": "def add(a, b):\n", "completion": "    return a + b\n"},
        {"prompt": "", "completion": "x = 1\n"},
    ]
    got = load(tokenizer, write_jsonl(tmp_path / "pc.jsonl", rows))
    eos = tokenizer.eos_token
    assert trained(tokenizer, got[0]) == "    return a + b\n" + eos
    assert tokenizer.decode(got[0].input_ids) == "def add(a, b):\n    return a + b\n" + eos
    assert got[1].labels[1:] == got[1].input_ids[1:]  # no prompt: all but the first token is trained
    everything = load(tokenizer, tmp_path / "pc.jsonl", train_on="all")
    assert everything[0].labels[1:] == everything[0].input_ids[1:]
    conv = [
        {
            "prompt": [{"role": "user", "content": "Say hi."}],
            "completion": [{"role": "assistant", "content": "Hi."}],
        }
    ]
    got = load(tokenizer, write_jsonl(tmp_path / "pcc.jsonl", conv))
    assert trained(tokenizer, got[0]) == "Hi.<|im_end|>"


def test_raw_text_trains_every_token_and_splits_with_overlap(tmp_path: Path, tokenizer: Any) -> None:
    rows = shakespeare()
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    whole = load(tokenizer, path)
    for row, s in zip(rows, whole, strict=True):
        assert s.labels[0] == IGNORE_INDEX and s.labels[1:] == s.input_ids[1:]
        assert tokenizer.decode(s.input_ids) == row["text"] + tokenizer.eos_token
    assert load(tokenizer, path, add_eos=False)[0].input_ids == whole[0].input_ids[:-1]
    samples, stats = load_samples(
        [DataSource(path=str(path))],
        tokenizer,
        DataConfig(max_seq_len=256, on_overflow="split", split_overlap=32),
    )
    assert stats.total.split_rows == len(rows) and stats.total.split_chunks == len(samples) > len(rows)
    assert all(len(s.input_ids) <= 256 for s in samples)
    # every token of every row is trained exactly once across its chunks (besides each row's first)
    trained_count = sum(sum(lab != IGNORE_INDEX for lab in s.labels) for s in samples)
    assert trained_count == sum(len(s.input_ids) - 1 for s in whole)
    # without overlap each continuation chunk starts cold: its first token is not trained (nothing precedes
    # it in the chunk, and when packed, what precedes it is another sample)
    cold, _ = load_samples(
        [DataSource(path=str(path))], tokenizer, DataConfig(max_seq_len=256, on_overflow="split")
    )
    assert all(s.labels[0] == IGNORE_INDEX for s in cold)
    assert sum(sum(lab != IGNORE_INDEX for lab in s.labels) for s in cold) == trained_count - (
        len(cold) - len(rows)
    )
    # chunk k+1 starts with the last 32 tokens of chunk k, untrained (context only)
    first = samples[0]
    second = samples[1]
    assert second.input_ids[:32] == first.input_ids[-32:] and all(
        lab == IGNORE_INDEX for lab in second.labels[:32]
    )


def test_file_types_and_globs_read_the_same_rows(tmp_path: Path, tokenizer: Any) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {"instruction": r["messages"][0]["content"], "output": r["messages"][1]["content"]} for r in jargon(5)
    ]
    reference = load(tokenizer, write_jsonl(tmp_path / "ref.jsonl", rows))
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet")
    with (tmp_path / "rows.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["instruction", "output"])
        w.writeheader()
        w.writerows(rows)
    parts = tmp_path / "parts"
    parts.mkdir()
    write_jsonl(parts / "a.jsonl", rows[:2])
    write_jsonl(parts / "b.jsonl", rows[2:])
    for path in ("rows.json", "rows.parquet", "rows.csv", "parts/*.jsonl"):
        assert load(tokenizer, tmp_path / path) == reference, path
    # the glob numbers rows across files, and names the file and line of each
    src = open_source(DataSource(path=str(parts / "*.jsonl")))
    assert [(r.number, Path(r.where).name) for r in src.rows()] == [
        (0, "a.jsonl:1"), (1, "a.jsonl:2"), (2, "b.jsonl:1"), (3, "b.jsonl:2"), (4, "b.jsonl:3")
    ]  # fmt: skip
    assert [r.number for r in src.rows(start=1, every=2, offset=1)] == [1, 3]


def test_saved_datasets_folder_and_hub_path(
    tmp_path: Path, tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datasets

    rows = jargon(4)
    reference = load(tokenizer, write_jsonl(tmp_path / "ref.jsonl", rows))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    assert load(tokenizer, tmp_path / "saved") == reference
    datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dd"))
    assert load(tokenizer, tmp_path / "dd", split="validation") == reference
    with pytest.raises(SftError, match="has splits validation"):
        load(tokenizer, tmp_path / "dd")

    calls = []

    def fake_load_dataset(name: str, subset: Any = None, **kw: Any) -> Any:  # no network in tests
        calls.append((name, subset, kw))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    got = load(tokenizer, "hub:someone/jargon", subset="en", split="test", revision="v1")
    assert got == reference
    assert calls[0] == ("someone/jargon", "en", {"split": "test", "revision": "v1", "streaming": False})


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.csv", b"prompt,completion\nq,a\nq\xff,a\n", r"bad.csv:3: not valid UTF-8"),
        (
            "short.csv",
            b"prompt,completion\nq,a\nonly-one-field\n",
            r"short.csv:3: has a different number of fields",
        ),
        (
            "x.jsonl",
            b'{"question": "q", "answer": "a"}\n',
            r"x.jsonl:1: cannot tell the data format.*set format:",
        ),
        ("m.jsonl", b'{"prompt": "q"}\n', r"m.jsonl:1: cannot tell the data format"),
        ("t.jsonl", b'{"text": ""}\n', r"t.jsonl:1: 'text' is empty"),
    ],
)
def test_bad_files(tmp_path: Path, tokenizer: Any, name: str, content: bytes, message: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(SftError, match=message):
        load(tokenizer, path)


def test_bad_sources_fail_before_reading(tmp_path: Path) -> None:
    (tmp_path / "data.txt").write_text("hello")
    with pytest.raises(SftError, match="unknown file type '.txt'"):
        open_source(DataSource(path=str(tmp_path / "data.txt")))
    (tmp_path / "plain").mkdir()
    with pytest.raises(SftError, match="not one written by datasets"):
        open_source(DataSource(path=str(tmp_path / "plain")))
    with pytest.raises(SftError, match="file not found"):
        open_source(DataSource(path=str(tmp_path / "none-*.jsonl")))
    with pytest.raises(Exception, match="unknown field 'question'"):
        DataSource(path="x.jsonl", columns={"question": "q"})
