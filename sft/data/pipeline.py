"""What the training loop sees of the data, built once from the recipe: the training steps and eval batches.

`DataPipeline` reads and tokenizes the sources (or opens the stream), chooses the collate layout
(collate.py) and the one `StepSource` class for the recipe's data mode (steps.py), and builds the eval
batches. The loop asks only `micro_batches(step)`, `eval_batches()` and, for a checkpoint, `state_dict()`.

Packing (`data.packing`) has two modes. `rows` (the default) packs the epoch's samples into rows as full as
they go and a step takes `train.micro_batch_size` rows per micro-batch (PackedRows; a stream is packed a
window at a time the same way: StreamedRows). `batch` changes the layout of a step, never its content:
`train.micro_batch_size` counts samples, so a step trains the samples an unpacked run would; each rank packs
its micro_batch_size x grad_accum samples of the step into rows of at most `max_seq_len` tokens and deals the
rows into grad_accum micro-batches. With the token-weighted loss and samples that cannot see each other, a
batch-packed run follows the unpacked run's loss trajectory.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from sft.config import Recipe
from sft.data.collate import Batch, layouts
from sft.data.indexed import Corpus, IndexedSamples, PackedRows
from sft.data.mixture import Mixture
from sft.data.prepare import load_sources
from sft.data.stats import DataStats
from sft.data.steps import StepSource
from sft.data.store import ConcatStore
from sft.data.streamed import StreamedRows, StreamedSamples
from sft.data.streaming import StreamReader


class DataPipeline:
    def __init__(
        self, recipe: Recipe, tokenizer: Any, rank: int = 0, world_size: int = 1, flat: bool | None = None
    ) -> None:
        """`flat`: whether the model runs flash attention (what model.attn_implementation=auto resolved to,
        sft.model.attention), given by the caller that knows the device; None reads the recipe."""
        data, train = recipe.data, recipe.train
        self.recipe = recipe
        self.rank, self.world_size = rank, world_size
        pad_id: int = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if flat is None:
            flat = recipe.model.attn_implementation.startswith("flash")
        rows, self.layout = layouts(recipe, pad_id, flat)
        by_rows = data.packing and data.packing_mode == "rows"
        paths = [s.path for s in data.train]
        self.cache_hits: list[bool] = []

        self.steps: StepSource
        self.train_stats: DataStats
        if data.streaming:
            open_reader = partial(StreamReader, data.train, tokenizer, data, recipe.seed, rank, world_size)
            stream: StreamedRows | StreamedSamples = (
                StreamedRows(
                    open_reader,
                    train,
                    rows,
                    data.max_seq_len,
                    data.packing_window,
                    recipe.seed,
                    paths,
                    world_size,
                    rank,
                )
                if by_rows
                else StreamedSamples(open_reader, train, self.layout, paths, world_size, rank)
            )
            self.steps, self.train_stats = stream, stream.reader.stats  # the stats grow as the stream is read
        else:
            stores, self.train_stats, hits = load_sources(data.train, tokenizer, data)
            self.cache_hits += hits
            weights = [s.weight for s in data.train]
            mixture = Mixture(
                [len(s) for s in stores],
                None if weights[0] is None else [float(w or 0) for w in weights],
                recipe.seed,
                data.shuffle,
                data.epoch_size,
            )
            corpus = Corpus(ConcatStore(stores), self.train_stats, mixture, paths)
            if by_rows:
                self.steps = PackedRows(
                    corpus, train, rows, data.max_seq_len, data.packing_window, world_size, rank
                )
            else:
                self.steps = IndexedSamples(corpus, train, self.layout, world_size, rank)

        self.eval_stats: DataStats | None = None
        self.eval_samples = ConcatStore([])
        if data.eval:
            eval_stores, self.eval_stats, hits = load_sources(data.eval, tokenizer, data)
            self.cache_hits += hits
            self.eval_samples = ConcatStore(eval_stores)

    # ---- what the loop calls

    def micro_batches(self, step: int) -> list[Batch]:
        """This rank's micro-batches for optimizer step `step` (0-based), on the CPU."""
        return self.steps.micro_batches(step)

    def total_steps(self, epochs: int) -> int:
        return self.steps.total_steps(epochs)

    def state_dict(self) -> dict[str, Any] | None:
        """The stream position of every rank (a collective when streaming on several ranks), or None."""
        return self.steps.state_dict()

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        self.steps.load_state_dict(state)

    def eval_batches(self) -> list[Batch]:
        """This rank's share of the eval set: disjoint slices of equal size, because under sharded
        strategies every forward is a collective and ranks with different batch counts would hang.
        The last `len % world_size` samples (fewer than the number of ranks) are left out."""
        usable = len(self.eval_samples) - len(self.eval_samples) % self.world_size
        mine = list(range(self.rank, usable, self.world_size))
        size = self.recipe.eval.batch_size
        chunks = [mine[i : i + size] for i in range(0, len(mine), size)][: self.recipe.eval.max_batches]
        out = []
        for chunk in chunks:
            out += self.layout.batches([[self.eval_samples.ids_labels(i) for i in chunk]])
        return out

    def describe(self) -> str:
        lines = [self.steps.describe(len(self.eval_samples))]
        if self.cache_hits:
            lines.append(
                f"  tokenized data cache: {sum(self.cache_hits)} of {len(self.cache_hits)} sources found"
            )
        return "\n".join(lines)
