"""Packing: no token lost or duplicated, samples never see each other (packed logits == per-sample logits on
the tiny model and, marked slow, on the real built-in model, for sdpa and eager, rows and the flat layout),
padding changes nothing, and a packed run has the unpacked run's losses."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sft.config import DataConfig, DataSource
from sft.data import load_samples
from sft.data.chat import IGNORE_INDEX, trained_tokens
from sft.data.collate import Item, flat_collate, pack_collate, pad_collate, real_tokens
from sft.data.indexed import IndexedSamples, PackedRows
from sft.data.pack import fill_rows, pack, slots
from sft.loss import loss_sum
from sft.train import train
from tests.conftest import tiny_recipe


def items(tokenizer: Any, n: int, max_len: int = 96, path: str = "builtin:jargon/eval") -> list[Item]:
    samples, _ = load_samples([DataSource(path=path)], tokenizer, DataConfig(max_seq_len=max_len))
    return [(np.array(s.input_ids), np.array(s.labels)) for s in samples[:n]]


def test_pack_keeps_every_sample_once_within_capacity() -> None:
    rng = random.Random(0)
    for trial in range(200):
        cap = rng.choice([16, 64, 512])
        lengths = [rng.randint(2, cap) for _ in range(rng.randint(1, 40))]
        groups = rng.randint(1, min(4, len(lengths)))
        parts = pack(lengths, cap, groups)
        assert len(parts) == groups and all(parts), trial
        flat = [i for part in parts for row in part for i in row]
        assert sorted(flat) == list(range(len(lengths)))  # the multiset of samples in == out
        assert all(sum(lengths[i] for i in row) <= cap for part in parts for row in part)
        assert parts == pack(lengths, cap, groups)  # deterministic
        # never more token slots than padding every sample to the longest would take
        assert slots(parts, lengths, 1) <= len(lengths) * max(lengths)


def test_rows_are_balanced() -> None:
    rows = fill_rows([300, 200, 200, 100, 100, 100], 512, 2)
    assert sorted(sum([300, 200, 200, 100, 100, 100][i] for i in r) for r in rows) == [500, 500]
    with pytest.raises(ValueError, match="does not fit"):
        pack([600], 512)


def test_collate_layouts(tokenizer: Any) -> None:
    its = items(tokenizer, 5)
    batch = pack_collate([its[:2], its[2:3]], tokenizer.pad_token_id)
    n0, n1 = len(its[0][0]), len(its[1][0])
    assert "attention_mask" not in batch
    pos = batch["position_ids"]
    assert pos[0, :n0].tolist() == list(range(n0)) and pos[0, n0 : n0 + n1].tolist() == list(range(n1))
    # labels: each sample's own (its first token already IGNORE_INDEX), padding IGNORE_INDEX at position 0
    assert batch["labels"][0, n0].item() == IGNORE_INDEX
    n2 = len(its[2][0])
    assert (batch["labels"][1, n2:] == IGNORE_INDEX).all() and (pos[1, n2:] == 0).all()
    real = sum(len(ids) for ids, _ in its[:3])
    assert real_tokens(batch) == real and batch["input_ids"].shape[1] % 8 == 0
    assert trained_tokens(batch["labels"]) == sum(int((lab[1:] != IGNORE_INDEX).sum()) for _, lab in its[:3])
    flat = flat_collate(its[:3])
    assert flat["input_ids"].shape == (1, real) and real_tokens(flat) == real
    padded = pad_collate(its[:3], tokenizer.pad_token_id)
    assert real_tokens(padded) == real and trained_tokens(padded["labels"]) == trained_tokens(batch["labels"])


def per_sample_logits(model: Any, its: list[Item]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(input_ids=torch.as_tensor(ids)[None], use_cache=False).logits[0] for ids, _ in its]


def packed_logits(model: Any, batch: dict[str, torch.Tensor], rows: list[list[Item]]) -> list[torch.Tensor]:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits
    out = []
    for r, row in enumerate(rows):
        at = 0
        for ids, _ in row:
            out.append(logits[r, at : at + len(ids)])
            at += len(ids)
    return out


def check_isolation(model: Any, its: list[Item], pad_id: int) -> float:
    """Max |packed - per-sample| logit over rows (with padding) and the flat one-row layout."""
    rows = [its[0:2], its[2:4], its[4:5]]  # rows of different lengths: two end in padding
    ref = per_sample_logits(model, its[:5])
    worst = 0.0
    for batch, layout in [(pack_collate(rows, pad_id), rows), (flat_collate(its[:5]), [its[:5]])]:
        got = packed_logits(model, batch, layout)
        worst = max(worst, max(float((a - b).abs().max()) for a, b in zip(got, ref, strict=True)))
    return worst


def load_model(path: Path, attn: str) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn)
    return model.eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_samples_do_not_see_each_other_tiny(tiny_model_dir: Path, tokenizer: Any, attn: str) -> None:
    model = load_model(tiny_model_dir, attn)
    its = items(tokenizer, 5, max_len=64)
    assert check_isolation(model, its, tokenizer.pad_token_id) <= 1e-4
    # and the check can fail: the same rows with positions that do not restart mix the samples
    rows = [its[0:3]]
    batch = pack_collate(rows, tokenizer.pad_token_id)
    batch["position_ids"] = torch.arange(batch["input_ids"].shape[1])[None]
    leaked = packed_logits(model, batch, rows)[1]
    assert float((leaked - per_sample_logits(model, its[1:2])[0]).abs().max()) > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_samples_do_not_see_each_other_builtin_model(
    builtin_dir: Path, tokenizer: Any, attn: str
) -> None:
    model = load_model(builtin_dir, attn)
    its = items(tokenizer, 5, max_len=64)
    assert check_isolation(model, its, tokenizer.pad_token_id) <= 1e-4


def test_packed_loss_equals_unpacked_loss(tiny_model_dir: Path, tokenizer: Any) -> None:
    model = load_model(tiny_model_dir, "sdpa")
    its = [x for x in items(tokenizer, 100, max_len=512) if len(x[0]) < 120][:8]  # short ones: a fast test
    padded = [pad_collate(its[:4], tokenizer.pad_token_id), pad_collate(its[4:], tokenizer.pad_token_id)]
    packed = [pack_collate([[its[i] for i in row] for row in part], tokenizer.pad_token_id)
              for part in pack([len(ids) for ids, _ in its], 256, 2)]  # fmt: skip
    with torch.no_grad():
        a = sum(float(loss_sum(model, b, "fp32")) for b in padded)
        b = sum(float(loss_sum(model, b, "fp32")) for b in packed)
    assert sum(trained_tokens(b["labels"]) for b in padded) == sum(
        trained_tokens(b["labels"]) for b in packed
    )
    assert abs(a - b) <= 1e-5 * abs(a)
    assert sum(b["input_ids"].numel() for b in packed) < sum(b["input_ids"].numel() for b in padded)


def test_packed_run_follows_the_unpacked_run(tiny_model_dir: Path, tmp_path: Path) -> None:
    def losses(run: Path) -> dict[int, float]:
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}

    runs = {}
    for name, kw in {
        "padded": {},
        "packed_accum": {
            "data__packing": "true",
            "data__packing_mode": "batch",
            "train__micro_batch_size": 2,
            "train__grad_accum": 2,
        },
    }.items():
        out = tmp_path / name
        train(tiny_recipe(tiny_model_dir, out, method="full", data__max_seq_len=128, data__eval="[]", **kw))
        runs[name] = losses(out)
    for name, got in runs.items():
        assert got.keys() == runs["padded"].keys() == {1, 2, 3}  # packed with another split of the batch too
        for step, loss in got.items():
            assert abs(loss - runs["padded"][step]) <= 1e-5 * loss, (name, step)


@pytest.mark.parametrize("mode", ["rows", "batch"])
def test_no_token_lost_or_duplicated_by_the_pipeline(
    tiny_model_dir: Path, tokenizer: Any, tmp_path: Path, mode: str
) -> None:
    from sft.data.pipeline import DataPipeline

    recipe = tiny_recipe(
        tiny_model_dir,
        tmp_path,
        data__packing="true",
        data__packing_mode=mode,
        data__max_seq_len=128,
        train__grad_accum=3,
    )
    data = DataPipeline(recipe, tokenizer)
    steps = data.steps
    assert isinstance(steps, (IndexedSamples, PackedRows))
    for step in (0, 1, steps.steps_per_epoch + 2):
        wanted: Counter[tuple[int, ...]] = Counter()
        for i in steps.sampler.samples(step):
            ids, _ = steps.corpus.item(i)
            wanted[tuple(ids.tolist())] += 1
        got: Counter[tuple[int, ...]] = Counter()
        batches = data.micro_batches(step)
        assert len(batches) == 3
        for b in batches:
            if mode == "rows":
                assert (
                    b["input_ids"].shape[0] == recipe.train.micro_batch_size
                )  # micro_batch_size counts rows
            for row, pos in zip(b["input_ids"], b["position_ids"], strict=True):
                starts = [i for i in range(len(pos)) if pos[i] == 0 and i + 1 < len(pos) and pos[i + 1] == 1]
                ends = [*starts[1:], len(pos)]
                for s, e in zip(starts, ends, strict=True):
                    n = int(pos[s:e].max()) + 1  # the sample's length; the rest of the span is padding
                    got[tuple(row[s : s + n].tolist())] += 1
        assert got == wanted


def test_rows_mode_packs_every_sample_of_an_epoch_once_into_nearly_full_rows(
    tiny_model_dir: Path, tokenizer: Any, tmp_path: Path
) -> None:
    """Rows mode on the built-in chat data at 512 tokens: each epoch's rows hold its samples exactly once,
    each row within max_seq_len, padding under 2%; the 2 ranks' rows are disjoint and cover the epoch but for
    the rows left over; epochs differ, and the total step count follows their row counts."""
    from sft.data.pipeline import DataPipeline

    def pipe(rank: int) -> DataPipeline:
        recipe = tiny_recipe(
            tiny_model_dir,
            tmp_path,
            data__packing="true",
            data__max_seq_len=512,
            data__packing_window=1000,
            train__micro_batch_size=4,
            train__grad_accum=2,
        )
        return DataPipeline(recipe, tokenizer, rank, 2)

    ranks = [pipe(0).steps, pipe(1).steps]
    assert isinstance(ranks[0], PackedRows) and isinstance(ranks[1], PackedRows)
    s = ranks[0].sampler
    lengths = ranks[0].corpus.store.lengths
    for epoch in (0, 1):
        rows = s.epoch_rows(epoch)
        assert sorted(i for row in rows for i in row) == sorted(s.epoch_order(epoch))
        assert all(sum(int(lengths[i]) for i in row) <= 512 for row in rows)
        fill = sum(int(lengths[i]) for row in rows for i in row) / (512 * len(rows))
        assert fill > 0.98, fill
    assert s.epoch_rows(0) != s.epoch_rows(1)
    assert ranks[0].padding_fraction() < 0.02
    assert ranks[0].total_steps(2) == s.steps_in_epoch(0) + s.steps_in_epoch(1)
    seen: list[int] = []
    for rank in ranks:
        for step in range(rank.steps_per_epoch):
            seen += rank.sampler.samples(step)
    assert len(seen) == len(set(seen))  # disjoint across steps and ranks
    assert len(seen) == len(s.epoch_order(0)) - sum(len(r) for r in s.epoch_rows(0)[-s.dropped_per_epoch :])
    second = ranks[0].sampler.micro_batches(s.steps_in_epoch(0))
    assert second[0][0] == s.epoch_rows(1)[0]  # the first step of epoch 1 starts its rows
