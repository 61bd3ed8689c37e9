"""The tokenized-data cache: a hit on the second run, a miss when the data, the template or a setting changes,
plain .npy arrays (no pickle), entries written aside, and training without it when it cannot be written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sft.config import DataConfig, DataSource
from sft.data.prepare import load_source
from sft.paths import data_cache_dir


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SFT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "data"


def rows_file(tmp_path: Path, n: int = 20) -> Path:
    path = tmp_path / "d.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"answer {i}"}]}
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_hit_on_second_run_and_miss_on_change(cache: Path, tmp_path: Path, tokenizer: Any) -> None:
    spec = DataSource(path=str(rows_file(tmp_path)))
    data = DataConfig(max_seq_len=64)
    store, stats, hit = load_source(spec, tokenizer, data)
    assert not hit and data_cache_dir() == cache and len(list(cache.iterdir())) >= 1
    again, stats2, hit = load_source(spec, tokenizer, data)
    assert hit and stats2 == stats
    assert np.array_equal(again.ids, store.ids) and np.array_equal(again.trained, store.trained)
    assert isinstance(again.ids, np.memmap)  # memory-mapped, not read whole

    # a different template: a miss (and different tokens)
    tok2 = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok2.chat_template = tokenizer.chat_template.replace(
        "You are a helpful AI assistant", "You are a terse assistant"
    )
    other, _, hit = load_source(spec, tok2, data)
    assert not hit and not np.array_equal(other.ids, store.ids)
    assert load_source(spec, tok2, data)[2]  # and that one is cached too
    # a setting the tokens depend on: a miss; one they do not depend on (the weight): a hit
    assert not load_source(spec, tokenizer, DataConfig(max_seq_len=64, train_on="all"))[2]
    assert load_source(spec.model_copy(update={"weight": 2.0}), tokenizer, data)[2]
    # the data's content: a miss
    with Path(spec.path).open("a") as f:
        f.write(
            json.dumps(
                {"messages": [{"role": "user", "content": "new"}, {"role": "assistant", "content": "row"}]}
            )
            + "\n"
        )
    store3, stats3, hit = load_source(spec, tokenizer, data)
    assert not hit and stats3.rows == 21


def test_entries_are_plain_arrays_and_complete(cache: Path, tmp_path: Path, tokenizer: Any) -> None:
    load_source(DataSource(path=str(rows_file(tmp_path))), tokenizer, DataConfig(max_seq_len=64))
    (entry,) = [p for p in cache.iterdir() if p.is_dir()]
    assert sorted(p.name for p in entry.iterdir()) == ["ids.npy", "offsets.npy", "stats.json", "trained.npy"]
    for name in ("ids", "offsets", "trained"):
        np.load(entry / f"{name}.npy", allow_pickle=False)
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no partial entry left aside


def test_unwritable_cache_trains_without_it(
    tmp_path: Path, tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache folder would go")  # fails for every user, root included
    monkeypatch.setenv("SFT_CACHE", str(blocked))
    store, _, hit = load_source(
        DataSource(path=str(rows_file(tmp_path))), tokenizer, DataConfig(max_seq_len=64)
    )
    assert not hit and len(store) == 20


def _load_in_child(path: str, tokenizer: Any, out: Any) -> None:
    _, _, hit = load_source(DataSource(path=path), tokenizer, DataConfig(max_seq_len=64))
    out.put(hit)


def test_one_process_prepares_the_others_wait_and_load(cache: Path, tmp_path: Path, tokenizer: Any) -> None:
    import multiprocessing as mp

    ctx = mp.get_context("fork")  # the children share this process's imports: fast
    out = ctx.Queue()
    path = str(rows_file(tmp_path, n=200))
    procs = [ctx.Process(target=_load_in_child, args=(path, tokenizer, out)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert sorted(out.get(timeout=5) for _ in procs) == [False, True, True]  # built once, loaded twice
