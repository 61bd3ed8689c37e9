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


def preview(recipe: Recipe, n: int = 3, color: bool | None = None) -> str:
    from sft.data.collate import as_item, real_tokens
    from sft.data.pipeline import DataPipeline
    from sft.model.load import load_tokenizer

    color = sys.stdout.isatty() if color is None else color
    tokenizer = load_tokenizer(recipe.model)
    data = DataPipeline(recipe, tokenizer)
    lines = []
    if data.sampler is not None:
        order = data.sampler.samples(0)[:n]  # the first step's samples (in their rows when packing by rows)
        shown = [(recipe.data.train[data.train.locate(i)[0]].path, *data.train.ids_labels(i)) for i in order]
    else:  # a stream: a reader of its own, so the pipeline still starts at the first sample
        from sft.data.streaming import StreamReader

        reader = StreamReader(recipe.data.train, tokenizer, recipe.data, recipe.seed, 0, 1)
        shown = [("stream", *as_item(s)) for s in reader.take(n)]
    for k, (source, ids, labels) in enumerate(shown):
        trained = labels != IGNORE_INDEX
        lines.append(
            f"---- sample {k + 1} of {source}: {len(ids)} tokens, {int(trained[1:].sum())} trained "
            + "-" * 20
        )
        lines.append(highlight(tokenizer, ids, trained, color))
    lines.append("---- first step " + "-" * 40)
    for a, batch in enumerate(data.micro_batches(0)):
        rows, width = batch["input_ids"].shape
        lines.append(
            f"micro-batch {a + 1}: {rows} rows x {width} tokens, {real_tokens(batch)} real, "
            f"{int((batch['labels'][:, 1:] != IGNORE_INDEX).sum())} trained"
        )
    lines.append("---- statistics " + "-" * 40)
    lines.append(data.describe())
    if data.eval_stats is not None:
        lines.append(f"eval data: {data.eval_stats.report()}")
    return "\n".join(lines)
