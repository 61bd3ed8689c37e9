"""`sft data preview RECIPE`: the first samples of training with their trained tokens highlighted, the
layout of the first step, and the statistics (rows, tokens, trained share, padding, what was cut and why)."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from sft.config import Recipe
from sft.data.chat import IGNORE_INDEX

GREEN, RESET = "\x1b[32m", "\x1b[0m"


def highlight(tokenizer: Any, ids: np.ndarray, trained: np.ndarray, color: bool) -> str:
    """Decoded text with the trained tokens marked: green on a terminal, else between [[ and ]]."""
    out, start = [], 0
    for end in range(1, len(ids) + 1):
        if end == len(ids) or trained[end] != trained[start]:
            text = tokenizer.decode(ids[start:end].tolist())
            if trained[start]:
                text = f"{GREEN}{text}{RESET}" if color else f"[[{text}]]"
            out.append(text)
            start = end
    return "".join(out)


def preview(recipe: Recipe, tokenizer: Any, n: int = 3, color: bool | None = None) -> str:
    from sft.data.chat import trained_tokens
    from sft.data.collate import real_tokens
    from sft.data.pipeline import DataPipeline

    color = sys.stdout.isatty() if color is None else color
    data = DataPipeline(recipe, tokenizer)
    lines = []
    # the first step's samples (in their rows when packing by rows); a stream's from a reader of their own
    for k, (source, ids, labels) in enumerate(data.steps.first_samples(n)):
        trained = labels != IGNORE_INDEX
        lines.append(
            f"---- sample {k + 1} of {source}: {len(ids)} tokens, {trained_tokens(labels)} trained "
            + "-" * 20
        )
        lines.append(highlight(tokenizer, ids, trained, color))
    lines.append("---- first step " + "-" * 40)
    for a, batch in enumerate(data.micro_batches(0)):
        rows, width = batch["input_ids"].shape
        lines.append(
            f"micro-batch {a + 1}: {rows} rows x {width} tokens, {real_tokens(batch)} real, "
            f"{trained_tokens(batch['labels'])} trained"
        )
    lines.append("---- statistics " + "-" * 40)
    lines.append(data.describe())
    if data.eval_stats is not None:
        lines.append(f"eval data: {data.eval_stats.report()}")
    return "\n".join(lines)
