"""The training steps as the loop sees them: one small protocol, one class per data mode.

    IndexedSamples   samples held in memory, micro_batch_size per micro-batch, padded or each step's
                     samples packed among themselves (packing_mode: batch)               indexed.py
    PackedRows       samples held in memory, each epoch packed into full rows; micro_batch_size counts
                     rows (packing_mode: rows)                                           indexed.py
    StreamedSamples  samples read as a stream (data.streaming), padded or step-packed    streamed.py
    StreamedRows     a stream packed into full rows a window at a time                   streamed.py

`DataPipeline` (pipeline.py) picks the class and the collate layout (collate.py) once, from the recipe. The
samples of step k are a pure function of (seed, k) for data in memory; a stream keeps a read position that
a checkpoint saves (`state_dict`).
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from sft.data.collate import Batch

# (source, token ids, labels) of one sample, for `sft data preview`
Shown = tuple[str, np.ndarray, np.ndarray]
PADDING_ESTIMATE_STEPS = 200  # steps of the first epoch looked at for the padding fraction


class StepSource(Protocol):
    @property
    def steps_per_epoch(self) -> int:
        """Steps of one epoch (the first, with rows packing; a stream's: train.max_steps)."""
        ...

    def total_steps(self, epochs: int) -> int: ...

    def micro_batches(self, step: int) -> list[Batch]:
        """This rank's micro-batches for optimizer step `step` (0-based), on the CPU."""
        ...

    def first_samples(self, n: int) -> list[Shown]:
        """The first `n` samples this rank trains on, without moving a stream's position."""
        ...

    def padding_fraction(self, steps: int = PADDING_ESTIMATE_STEPS) -> float:
        """Share of padding tokens in this rank's batches over the first steps (nan for a stream)."""
        ...

    def describe(self, eval_samples: int) -> str:
        """What is trained and how it is laid out (the lines `sft train` and preview print)."""
        ...

    def state_dict(self) -> dict[str, Any] | None:
        """The read position to save with a checkpoint (None: the step alone resumes the data)."""
        ...

    def load_state_dict(self, state: dict[str, Any] | None) -> None: ...
