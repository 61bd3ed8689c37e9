"""Streaming sources: disjoint shards per rank in file order, a weighted interleave fixed by the seed, and a
saved read position that resumes with the very next batch (also mid-row, and through the training loop)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from sft.config import DataConfig, DataSource
from sft.data.pipeline import DataPipeline
from sft.data.streaming import StreamReader
from sft.errors import SftError
from sft.signals import Preempted
from sft.train import train
from tests.conftest import StopAfter, tiny_recipe


def numbered(tmp_path: Path, name: str, n: int) -> Path:
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps({"text": f"{name} row {i}"}) + "\n" for i in range(n)))
    return path


def texts(tokenizer: Any, samples: list[Any]) -> list[str]:
    return [tokenizer.decode(s.input_ids, skip_special_tokens=True) for s in samples]


def test_shards_are_disjoint_covering_and_in_file_order(tmp_path: Path, tokenizer: Any) -> None:
    path = numbered(tmp_path, "a", 10)
    specs = [DataSource(path=str(path))]
    per_rank = [
        texts(tokenizer, StreamReader(specs, tokenizer, DataConfig(), 0, r, 3).take(4)) for r in range(3)
    ]
    assert per_rank[0] == ["a row 0", "a row 3", "a row 6", "a row 9"]
    assert per_rank[1][:3] == ["a row 1", "a row 4", "a row 7"] and per_rank[1][3] == "a row 1"  # next pass
    first_pass = {t for rank in per_rank for t in rank[:3]} | {per_rank[0][3]}
    assert first_pass == {f"a row {i}" for i in range(10)}


def test_weighted_interleave_is_fixed_by_the_seed(tmp_path: Path, tokenizer: Any) -> None:
    specs = [
        DataSource(path=str(numbered(tmp_path, "a", 50)), weight=3),
        DataSource(path=str(numbered(tmp_path, "b", 5)), weight=1),
    ]
    got = texts(tokenizer, StreamReader(specs, tokenizer, DataConfig(), 7, 0, 1).take(400))
    assert got == texts(tokenizer, StreamReader(specs, tokenizer, DataConfig(), 7, 0, 1).take(400))
    assert got != texts(tokenizer, StreamReader(specs, tokenizer, DataConfig(), 8, 0, 1).take(400))
    share = Counter(t[0] for t in got)
    assert 0.68 < share["a"] / 400 < 0.82  # 3:1
    assert [t for t in got if t[0] == "b"][:6] == [*(f"b row {i}" for i in range(5)), "b row 0"]  # cycles


def stream_recipe(tiny_model_dir: Path, out: Path, **kw: Any) -> Any:
    base = {
        "data__train": "[{path: 'builtin:shakespeare/train'}]",
        "data__eval": "[]",
        "data__streaming": "true",
        "data__on_overflow": "split",
        "data__split_overlap": 8,
        "data__max_seq_len": 64,
        "train__max_steps": 6,
    }
    return tiny_recipe(tiny_model_dir, out, **{**base, **kw})


@pytest.mark.parametrize("packing", ["false", "batch", "rows"])
def test_resume_from_the_saved_position_mid_row(
    tiny_model_dir: Path, tmp_path: Path, tokenizer: Any, packing: str
) -> None:
    kw = {} if packing == "false" else {"data__packing": "true", "data__packing_mode": packing}
    # rows: windows of 10 samples, so 3 steps end inside the second window
    recipe = stream_recipe(tiny_model_dir, tmp_path, data__packing_window=10, **kw)
    whole = DataPipeline(recipe, tokenizer)
    batches = [whole.micro_batches(k) for k in range(6)]
    first = DataPipeline(recipe, tokenizer)
    for k in range(3):
        first.micro_batches(k)
    state = json.loads(json.dumps(first.state_dict()))  # it goes through the JSON trainer state
    assert (
        state["ranks"][0]["sources"][0]["used"] > 0
    )  # a Shakespeare row gives many chunks: stopped inside one
    if packing == "rows":  # the position is the current window's start, plus the rows of it served
        assert state["ranks"][0]["window"]["number"] == 1 and state["ranks"][0]["window"]["served"] > 0
    resumed = DataPipeline(recipe, tokenizer)
    resumed.load_state_dict(state)
    for k in range(3, 6):
        for a, b in zip(resumed.micro_batches(k), batches[k], strict=True):
            assert all(torch.equal(a[key], b[key]) for key in a)
    # without a saved position, reading forward to the step gives the same batches (slower)
    forward = DataPipeline(recipe, tokenizer)
    assert all(
        torch.equal(a["input_ids"], b["input_ids"])
        for a, b in zip(forward.micro_batches(4), batches[4], strict=True)
    )
    with pytest.raises(SftError, match="cannot go back"):
        forward.micro_batches(1)
    with pytest.raises(SftError, match="same number of processes"):
        resumed.load_state_dict({**state, "world_size": 2})


def test_streaming_needs_max_steps(tiny_model_dir: Path, tmp_path: Path, tokenizer: Any) -> None:
    with pytest.raises(SftError, match="needs train.max_steps"):
        DataPipeline(stream_recipe(tiny_model_dir, tmp_path, train__max_steps="null"), tokenizer)


def test_streaming_run_preempted_and_resumed_is_bit_exact(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def losses(run: Path) -> dict[int, float]:
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}

    kw = {"method": "full", "data__packing": "true", "train__max_steps": 4}
    whole = tmp_path / "whole"
    train(stream_recipe(tiny_model_dir, whole, **kw))
    cut = tmp_path / "cut"
    monkeypatch.setattr("sft.train.StopFlag", lambda: StopAfter(2))
    with pytest.raises(Preempted):
        train(stream_recipe(tiny_model_dir, cut, **kw))
    state = json.loads((cut / "checkpoints" / "step-0000002" / "trainer_state.json").read_text())
    assert state["data"]["ranks"][0]["step"] == 2
    monkeypatch.undo()
    train(stream_recipe(tiny_model_dir, cut, resume="true", **kw))
    assert losses(whole) == losses(cut) and list(losses(cut)) == [1, 2, 3, 4]
