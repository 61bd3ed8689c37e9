"""The batches of a fixed seed, pinned: every data mode gives exactly the tensors it gave when this test was
written (a SHA-256 over each step's micro-batches, the eval batches, the step counts and a stream's saved
position on one rank). A refactoring of the data pipeline must keep them bit for bit; a deliberate change of order or
layout updates the digests here, saying why, in the same commit."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from sft.data.pipeline import DataPipeline
from tests.conftest import tiny_recipe

MIXTURE = "[{path: 'builtin:jargon/train', weight: 3}, {path: 'builtin:jargon/eval', weight: 1}]"
STREAM = {
    "data__train": "[{path: 'builtin:shakespeare/train'}]",
    "data__streaming": "true",
    "data__on_overflow": "split",
    "data__split_overlap": 8,
    "train__max_steps": 6,
}
MODES: dict[str, dict[str, Any]] = {
    "padded": {},
    "batch_packed": {"data__packing": "true", "data__packing_mode": "batch"},
    "rows_packed": {"data__packing": "true", "data__packing_window": 64},
    "rows_flat": {
        "data__packing": "true",
        "data__packing_window": 64,
        "model__attn_implementation": "flash_attention_2",
        "train__device": "auto",
    },
    "batch_flat": {
        "data__packing": "true",
        "data__packing_mode": "batch",
        "model__attn_implementation": "flash_attention_2",
        "train__device": "auto",
    },
    "mixture_padded": {"data__train": MIXTURE, "data__epoch_size": 200},
    "mixture_rows": {"data__train": MIXTURE, "data__epoch_size": 200, "data__packing": "true"},
    "unshuffled": {"data__shuffle": "false"},
    "stream_padded": STREAM,
    "stream_batch": {**STREAM, "data__packing": "true", "data__packing_mode": "batch"},
    "stream_rows": {**STREAM, "data__packing": "true", "data__packing_window": 10},
    "stream_mixture": {
        **STREAM,
        "data__train": "[{path: 'builtin:shakespeare/train', weight: 1}, {path: 'builtin:jargon/train', weight: 2}]",
    },
}
# mode -> digests of (rank 0 of 1, rank 0 of 2, rank 1 of 2)
DIGESTS: dict[str, tuple[str, str, str]] = {
    "padded": ("9029a473f8cde7e7", "39586c16c53d1ae5", "b90a75677cebce39"),
    "batch_packed": ("dd8c816cb2a0caf2", "cf649d5beb7f5587", "301c6f4b69eea362"),
    "rows_packed": ("4474c6f9d7c04c56", "f0c44cbc29397d00", "8c129c2dc4081962"),
    "rows_flat": ("2c7aadc23d537a57", "1a5d7b4b06a49055", "6423b6cfd6227264"),
    "batch_flat": ("31cb45427fd1caa7", "812cbb35d450d732", "40cc3bad52351ff4"),
    "mixture_padded": ("dcfd05ab61205d37", "cfeecbdc4d90ee71", "798808fe713c5f6a"),
    "mixture_rows": ("f89ab5f98a725c2d", "d81e42431698f85d", "3de0b8f6d305ad36"),
    "unshuffled": ("e0b1de4e129e177b", "8a1b454487761035", "6ff0c59e0e526315"),
    "stream_padded": ("a6bb1e7f5b5c347f", "15f40922842ba733", "07783f985fe8e882"),
    "stream_batch": ("28a2755da797e7b9", "24fb216834db503e", "e81078f196eda0bd"),
    "stream_rows": ("a9e5bf74af4760d6", "b171654691caab95", "424cfd22ad542c4e"),
    "stream_mixture": ("44ca109c390b62c8", "6a3549dad77fea99", "7303a5d8a087fd3e"),
}


def tensors_digest(h: Any, batches: list[dict[str, torch.Tensor]]) -> None:
    for batch in batches:
        for key in sorted(batch):
            t = batch[key]
            h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.contiguous().numpy().tobytes())


def pipeline_digest(data: DataPipeline, streaming: bool) -> str:
    h = hashlib.sha256()
    steps = [0, 1, 2] if streaming else [0, 1, 2, data.steps.steps_per_epoch, data.steps.steps_per_epoch + 1]
    h.update(json.dumps([data.steps.steps_per_epoch, data.total_steps(2)]).encode())
    for step in steps:
        tensors_digest(h, data.micro_batches(step))
    if streaming and data.world_size == 1:  # what a checkpoint records of the stream, after 3 steps
        h.update(json.dumps(data.state_dict(), sort_keys=True).encode())
    else:
        h.update(f"{data.steps.padding_fraction():.12f}".encode())
    tensors_digest(h, data.eval_batches())
    return h.hexdigest()[:16]


@pytest.mark.parametrize("mode", list(MODES))
def test_a_seeds_first_batches_are_pinned(
    tiny_model_dir: Path, tmp_path: Path, tokenizer: Any, mode: str
) -> None:
    recipe = tiny_recipe(tiny_model_dir, tmp_path, train__grad_accum=2, seed=3, **MODES[mode])
    streaming = recipe.data.streaming
    got = tuple(
        pipeline_digest(DataPipeline(recipe, tokenizer, rank, world), streaming)
        for rank, world in ((0, 1), (0, 2), (1, 2))
    )
    assert got == DIGESTS.get(mode), f"now {mode!r}: {got!r}"
