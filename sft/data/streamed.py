"""Steps over a stream (`data.streaming: true`): `StreamedSamples` and `StreamedRows` (see steps.py).

A stream is read forward only: each step takes the next micro_batch_size x grad_accum units (samples, or
packed rows) of this rank's stream, and a checkpoint records where every rank's stream stands. Rows are
packed a window of `packing_window` samples at a time; a checkpoint taken inside a window records the
stream's position at the window's start and how many of its rows were served, so a resume rereads and
repacks that window and goes on with the very next row.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sft.config import TrainConfig
from sft.data.collate import Batch, Item, RowsLayout, SamplesLayout, as_item
from sft.data.mixture import seeded_permutation
from sft.data.pack import best_fit
from sft.data.steps import PADDING_ESTIMATE_STEPS, Shown
from sft.data.streaming import StreamReader
from sft.errors import SftError

OpenReader = Callable[[], StreamReader]  # this rank's reader, at the start of its stream


class StepCursor:
    """The next step a stream will serve: it can skip forward (reading past steps) but not go back."""

    def __init__(self, train: TrainConfig) -> None:
        self.train = train
        self.next_step = 0

    def step_units(self, step: int, take: Callable[[int], list[Any]]) -> list[list[Any]]:
        """This rank's micro-batches of units for `step`, read with `take(n)`."""
        if step < self.next_step:
            raise SftError(f"data: a stream cannot go back to step {step} (it is at step {self.next_step})")
        per_step = self.train.global_batch()  # this rank's share of a step: its stream is its shard
        while self.next_step < step:  # no saved position: read past the steps already trained
            take(per_step)
            self.next_step += 1
        units = take(per_step)
        self.next_step += 1
        return self.train.rank_share(units)


class _Streamed:
    """What both stream modes share: the reader, the step cursor, the step count, preview and description."""

    unit = "samples"

    def __init__(
        self, open_reader: OpenReader, train: TrainConfig, paths: list[str], world_size: int, rank: int
    ) -> None:
        if train.max_steps is None:
            raise SftError("data.streaming=true needs train.max_steps: a stream has no known length")
        self.open_reader, self.train, self.paths = open_reader, train, paths
        self.world_size, self.rank = world_size, rank
        self.reader = open_reader()
        self.cursor = StepCursor(train)

    @property
    def steps_per_epoch(self) -> int:
        return int(self.train.max_steps or 0)  # a stream's length is unknown: train.max_steps decides

    def total_steps(self, epochs: int) -> int:
        return self.steps_per_epoch

    def first_samples(self, n: int) -> list[Shown]:
        reader = self.open_reader()  # a reader of its own, so the steps still start at the first sample
        return [("stream", *as_item(s)) for s in reader.take(n)]

    def padding_fraction(self, steps: int = PADDING_ESTIMATE_STEPS) -> float:
        return float("nan")  # nothing is read before training

    def describe(self, eval_samples: int) -> str:
        return (
            f"train data: streamed from {', '.join(self.paths)}, each rank its own rows in file order; "
            f"{self.train.global_batch(self.world_size)} {self.unit} per step; {eval_samples} eval samples"
        )

    def _take_samples(self, n: int) -> list[Item]:
        return [as_item(s) for s in self.reader.take(n)]

    def state_dict(self) -> dict[str, Any] | None:
        """Every rank's position (a collective when there are several ranks)."""
        mine = self._position()
        ranks = [mine]
        if self.world_size > 1:
            import torch.distributed as tdist

            ranks = [{} for _ in range(self.world_size)]
            tdist.all_gather_object(ranks, mine)
        return {"world_size": self.world_size, "ranks": ranks}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state is None:
            return
        if state["world_size"] != self.world_size:
            raise SftError(
                f"data: the checkpoint's stream position is for {state['world_size']} processes, this run "
                f"has {self.world_size}; resume streaming data with the same number of processes"
            )
        mine: dict[str, Any] = state["ranks"][self.rank]
        self.reader.load_state_dict(mine)
        self.cursor.next_step = mine["step"]
        self._restore(mine)

    def _position(self) -> dict[str, Any]:
        """This rank's position: the next step and where its stream stands."""
        return {"step": self.cursor.next_step, **self.reader.state_dict()}

    def _restore(self, position: dict[str, Any]) -> None:
        pass


class StreamedSamples(_Streamed):
    def __init__(
        self,
        open_reader: OpenReader,
        train: TrainConfig,
        layout: SamplesLayout,
        paths: list[str],
        world_size: int,
        rank: int,
    ) -> None:
        super().__init__(open_reader, train, paths, world_size, rank)
        self.layout = layout

    def micro_batches(self, step: int) -> list[Batch]:
        return self.layout.batches(self.cursor.step_units(step, self._take_samples))


class StreamedRows(_Streamed):
    """The stream packed into rows of at most `capacity` tokens, `window` samples at a time, each window's rows
    shuffled with a seed of (seed, rank, window number)."""

    unit = "packed rows"

    def __init__(
        self,
        open_reader: OpenReader,
        train: TrainConfig,
        rows: RowsLayout,
        capacity: int,
        window: int,
        seed: int,
        paths: list[str],
        world_size: int,
        rank: int,
    ) -> None:
        super().__init__(open_reader, train, paths, world_size, rank)
        self.rows, self.capacity, self.window, self.seed = rows, capacity, window, seed
        self._window_rows: list[list[Item]] = []  # the current window's rows ...
        self._served = 0  # ... how many of them were trained
        self._windows = 0  # windows read so far
        self._window_start: dict[str, Any] | None = None  # the stream's position where the window began

    def micro_batches(self, step: int) -> list[Batch]:
        return [self.rows.collate(mb) for mb in self.cursor.step_units(step, self._take_rows)]

    def _take_rows(self, n: int) -> list[list[Item]]:
        out: list[list[Item]] = []
        while len(out) < n:
            if self._served == len(self._window_rows):
                self._read_window()
            out.append(self._window_rows[self._served])
            self._served += 1
        return out

    def _read_window(self) -> None:
        """Read the next `window` samples of this rank's stream and pack them into shuffled rows."""
        self._window_start = self.reader.state_dict()
        items = self._take_samples(self.window)
        rows = best_fit([len(ids) for ids, _ in items], self.capacity)
        perm = seeded_permutation(len(rows), (self.seed * 1_000_003 + self.rank) * 7919 + self._windows)
        self._window_rows = [[items[i] for i in rows[r]] for r in perm]
        self._served = 0
        self._windows += 1

    def _position(self) -> dict[str, Any]:
        mine = super()._position()
        if self._window_start is not None:  # reread the current window, skip the rows served
            mine.update(self._window_start, window={"number": self._windows - 1, "served": self._served})
        return mine

    def _restore(self, position: dict[str, Any]) -> None:
        window = position.get("window")
        if window is not None:
            self._windows = window["number"]
            self._read_window()
            self._served = window["served"]
