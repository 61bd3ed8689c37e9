"""What the training loop sees of the data: micro-batches for a step, eval batches, statistics, position.

The loop asks only `micro_batches(step)` and `eval_batches()`; how rows are read, formatted, tokenized,
packed and ordered stays behind this seam.

Packing (`data.packing`) has two modes. `rows` (the default) packs the epoch's samples into rows as full as
they go and a step takes `train.micro_batch_size` rows per micro-batch (RowSampler; streamed data is packed a
window at a time the same way). `batch` changes the layout of a step, never its content:
`train.micro_batch_size` counts samples, so a step trains the samples an unpacked run would; each rank packs
its micro_batch_size x grad_accum samples of the step into rows of at most `max_seq_len` tokens and deals the
rows into grad_accum micro-batches. With the token-weighted loss and samples that cannot see each other, a
batch-packed run follows the unpacked run's loss trajectory.
"""

from __future__ import annotations

from typing import Any

import torch

from sft.config import Recipe
from sft.data.collate import Item, as_item, flat_collate, pack_collate, pad_collate
from sft.data.mixture import Mixture, seeded_permutation
from sft.data.pack import best_fit, pack, slots
from sft.data.prepare import load_sources
from sft.data.sampler import RowSampler, StepSampler
from sft.data.stats import DataStats
from sft.data.store import ConcatStore
from sft.data.streaming import StreamReader
from sft.errors import SftError

PADDING_ESTIMATE_STEPS = 200  # steps of the first epoch looked at for the padding fraction in describe()


class DataPipeline:
    def __init__(self, recipe: Recipe, tokenizer: Any, rank: int = 0, world_size: int = 1) -> None:
        data, t = recipe.data, recipe.train
        self.recipe = recipe
        self.rank, self.world_size = rank, world_size
        self.pad_id: int = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        self.packing = data.packing
        self.rows_mode = data.packing and data.packing_mode == "rows"
        # flash attention takes packed samples as one flat row (its variable-length kernel); sdpa and eager
        # take rows, masked block-diagonally from the position ids.
        self.flat = recipe.model.attn_implementation == "flash_attention_2"
        self.cache_hits: list[bool] = []
        self.stream: StreamReader | None = None
        self.sampler: StepSampler | RowSampler | None = None
        self.next_step = 0
        # streaming rows mode: the current window's packed rows, how many were served, windows read so far,
        # and the stream's position where the current window began (what a checkpoint records)
        self._window_rows: list[list[Item]] = []
        self._served = 0
        self._windows = 0
        self._window_start: dict[str, Any] | None = None
        if data.streaming:
            if t.max_steps is None:
                raise SftError("data.streaming=true needs train.max_steps: a stream has no known length")
            self.stream = StreamReader(data.train, tokenizer, data, recipe.seed, rank, world_size)
            self.train_stats = self.stream.stats
        else:
            stores, self.train_stats, hits = load_sources(data.train, tokenizer, data)
            self.cache_hits += hits
            self.train = ConcatStore(stores)
            weights = [s.weight for s in data.train]
            self.mixture = Mixture(
                [len(s) for s in stores],
                None if weights[0] is None else [float(w or 0) for w in weights],
                recipe.seed,
                data.shuffle,
                data.epoch_size,
            )
            if self.rows_mode:
                self.sampler = RowSampler(
                    self.mixture,
                    self.train.lengths,
                    data.max_seq_len,
                    data.packing_window,
                    t.micro_batch_size,
                    t.grad_accum,
                    world_size,
                    rank,
                )
                have = f"{self.sampler.rows_in_epoch(0)} packed rows of {data.max_seq_len} tokens"
            else:
                self.sampler = StepSampler(
                    self.mixture.epoch_size,
                    t.micro_batch_size,
                    t.grad_accum,
                    world_size,
                    rank,
                    mixture=self.mixture,
                )
                have = f"{self.mixture.epoch_size} training samples"
            if self.sampler.steps_per_epoch == 0:
                raise SftError(
                    f"data: {have} do not fill one global batch of {self.sampler.global_batch} "
                    "(micro_batch_size x grad_accum x processes); lower train.micro_batch_size or "
                    "train.grad_accum"
                )
        self.eval_stats: DataStats | None = None
        self.eval_samples = ConcatStore([])
        if data.eval:
            eval_stores, self.eval_stats, hits = load_sources(data.eval, tokenizer, data)
            self.cache_hits += hits
            self.eval_samples = ConcatStore(eval_stores)

    @property
    def steps_per_epoch(self) -> int:
        if self.sampler is None:  # a stream: its length is unknown, train.max_steps decides
            return int(self.recipe.train.max_steps or 0)
        return self.sampler.steps_per_epoch

    def total_steps(self, epochs: int) -> int:
        """Steps in `epochs` epochs (with rows packing, epochs differ by a step or so)."""
        if self.sampler is None:
            return int(self.recipe.train.max_steps or 0)
        return self.sampler.total_steps(epochs)

    @property
    def units_per_step(self) -> str:
        t = self.recipe.train
        n = t.micro_batch_size * t.grad_accum * self.world_size
        return f"{n} packed rows" if self.rows_mode else f"{n} samples"

    # ---- batches

    def micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches for optimizer step `step` (0-based), on the CPU."""
        t = self.recipe.train
        if self.rows_mode:
            if self.stream is not None:
                parts: list[list[list[Item]]] = self._stream_step(step)
            else:
                assert isinstance(self.sampler, RowSampler)
                parts = [
                    [[self.train.ids_labels(i) for i in row] for row in mb]
                    for mb in self.sampler.micro_batches(step)
                ]
            return [self._collate_rows(rows) for rows in parts]
        if self.stream is not None:
            groups: list[list[Item]] = self._stream_step(step)
        else:
            assert isinstance(self.sampler, StepSampler)
            groups = [[self.train.ids_labels(i) for i in mb] for mb in self.sampler.micro_batches(step)]
        if not self.packing:
            return [pad_collate(g, self.pad_id) for g in groups]
        return self._packed([item for g in groups for item in g], t.grad_accum)

    def eval_batches(self) -> list[dict[str, torch.Tensor]]:
        """This rank's share of the eval set: disjoint slices of equal size, because under sharded
        strategies every forward is a collective and ranks with different batch counts would hang.
        The last `len % world_size` samples (fewer than the number of ranks) are left out."""
        usable = len(self.eval_samples) - len(self.eval_samples) % self.world_size
        mine = list(range(self.rank, usable, self.world_size))
        size = self.recipe.eval.batch_size
        chunks = [mine[i : i + size] for i in range(0, len(mine), size)][: self.recipe.eval.max_batches]
        out = []
        for chunk in chunks:
            items = [self.eval_samples.ids_labels(i) for i in chunk]
            out += self._packed(items, 1) if self.packing else [pad_collate(items, self.pad_id)]
        return out

    def _packed(self, items: list[Item], groups: int) -> list[dict[str, torch.Tensor]]:
        parts = pack([len(ids) for ids, _ in items], self.recipe.data.max_seq_len, groups)
        return [self._collate_rows([[items[i] for i in row] for row in part]) for part in parts]

    def _collate_rows(self, rows: list[list[Item]]) -> dict[str, torch.Tensor]:
        if self.flat:
            return flat_collate([item for row in rows for item in row])
        return pack_collate(rows, self.pad_id)

    def _stream_step(self, step: int) -> list[list[Any]]:
        """This rank's micro-batches of streamed samples (or of packed rows, in rows mode) for `step`."""
        assert self.stream is not None
        t = self.recipe.train
        if step < self.next_step:
            raise SftError(f"data: a stream cannot go back to step {step} (it is at step {self.next_step})")
        take = self._take_rows if self.rows_mode else self._take_samples
        while self.next_step < step:  # no saved position: read past the steps already trained
            take(t.micro_batch_size * t.grad_accum)
            self.next_step += 1
        units = take(t.micro_batch_size * t.grad_accum)
        self.next_step += 1
        m = t.micro_batch_size
        return [units[a * m : (a + 1) * m] for a in range(t.grad_accum)]

    def _take_samples(self, n: int) -> list[Item]:
        assert self.stream is not None
        return [as_item(s) for s in self.stream.take(n)]

    def _take_rows(self, n: int) -> list[list[Item]]:
        out: list[list[Item]] = []
        while len(out) < n:
            if self._served == len(self._window_rows):
                self._read_window()
            out.append(self._window_rows[self._served])
            self._served += 1
        return out

    def _read_window(self) -> None:
        """Read the next `packing_window` samples of this rank's stream and pack them into shuffled rows."""
        assert self.stream is not None
        data = self.recipe.data
        self._window_start = self.stream.state_dict()
        items = self._take_samples(data.packing_window)
        rows = best_fit([len(ids) for ids, _ in items], data.max_seq_len)
        perm = seeded_permutation(
            len(rows), (self.recipe.seed * 1_000_003 + self.rank) * 7919 + self._windows
        )
        self._window_rows = [[items[i] for i in rows[r]] for r in perm]
        self._served = 0
        self._windows += 1

    # ---- position (streaming only: in-memory data resumes from the step alone)

    def state_dict(self) -> dict[str, Any] | None:
        """The stream position of every rank (a collective when streaming on several ranks), or None."""
        if self.stream is None:
            return None
        mine: dict[str, Any] = {"step": self.next_step, **self.stream.state_dict()}
        if self._window_start is not None:  # rows mode: reread the current window, skip the rows served
            mine.update(self._window_start, window={"number": self._windows - 1, "served": self._served})
        ranks = [mine]
        if self.world_size > 1:
            import torch.distributed as tdist

            ranks = [{} for _ in range(self.world_size)]
            tdist.all_gather_object(ranks, mine)
        return {"world_size": self.world_size, "ranks": ranks}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if self.stream is None or state is None:
            return
        if state["world_size"] != self.world_size:
            raise SftError(
                f"data: the checkpoint's stream position is for {state['world_size']} processes, this run has "
                f"{self.world_size}; resume streaming data with the same number of processes"
            )
        mine = state["ranks"][self.rank]
        self.stream.load_state_dict(mine)
        self.next_step = mine["step"]
        window = mine.get("window")
        if self.rows_mode and window is not None:
            self._windows = window["number"]
            self._read_window()
            self._served = window["served"]

    # ---- statistics

    def padding_fraction(self, steps: int = PADDING_ESTIMATE_STEPS) -> float:
        """Share of padding tokens in this rank's batches over the first steps (without building tensors)."""
        if self.sampler is None:
            return float("nan")
        lengths = self.train.lengths
        real = total = 0
        for step in range(min(steps, self.sampler.steps_per_epoch)):
            if isinstance(self.sampler, RowSampler):
                for mb in self.sampler.micro_batches(step):
                    tokens = sum(int(lengths[i]) for row in mb for i in row)
                    real += tokens
                    total += tokens if self.flat else slots([mb], lengths)
                continue
            groups = [[int(lengths[i]) for i in mb] for mb in self.sampler.micro_batches(step)]
            real += sum(map(sum, groups))
            total += batch_slots(groups, self.recipe.data.max_seq_len, self.packing, self.flat)
        return 1 - real / max(total, 1)

    def describe(self) -> str:
        if self.sampler is None:  # a stream: nothing is read yet, so there are no statistics to give
            sources = ", ".join(s.path for s in self.recipe.data.train)
            lines = [
                f"train data: streamed from {sources}, each rank its own rows in file order; "
                f"{self.units_per_step} per step; {len(self.eval_samples)} eval samples"
            ]
        else:
            lines = [f"train data: {self.train_stats.summary()}"]
        if self.sampler is not None:
            s = self.sampler
            unit = "rows" if self.rows_mode else "samples"
            if isinstance(s, RowSampler):
                lines[0] += f"; {s.rows_in_epoch(0)} packed rows of <= {self.recipe.data.max_seq_len} tokens"
            lines[0] += (
                f"; {len(self.eval_samples)} eval samples; {s.global_batch} {unit} per step, "
                f"{s.steps_per_epoch} steps per epoch, {s.dropped_per_epoch} {unit} left out per epoch"
            )
            layout = "packed rows" if self.packing else "padded rows"
            lines[0] += f"; {layout}, {self.padding_fraction():.1%} padding"
            if len(self.mixture.counts) > 1:
                shares = ", ".join(
                    f"{spec.path} {n}"
                    for spec, n in zip(self.recipe.data.train, self.mixture.counts, strict=True)
                )
                lines.append(f"  samples per epoch: {shares}")
            lines += self.train_stats.report().splitlines()[1:]
        if self.cache_hits:
            lines.append(
                f"  tokenized data cache: {sum(self.cache_hits)} of {len(self.cache_hits)} sources found"
            )
        return "\n".join(lines)


def batch_slots(groups: list[list[int]], max_seq_len: int, packing: bool, flat: bool) -> int:
    """Token slots (real + padding) of one step's micro-batches, given the sample lengths of each."""
    if not packing:
        return sum(len(g) * -(-max(g) // 8) * 8 for g in groups)
    lengths = [n for g in groups for n in g]
    if flat:
        return sum(lengths)
    return slots(pack(lengths, max_seq_len, len(groups)), lengths)
