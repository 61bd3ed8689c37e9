"""Atomic, resumable checkpoints: write aside, then move the `latest` pointer (DESIGN invariant 5).

Layout: OUTPUT/checkpoints/step-0000020/{trainer_state.json, rng-rank0.pt, <strategy files>} and
OUTPUT/checkpoints/latest, a one-line file naming the newest complete folder. A crash mid-save leaves a
`.partial` folder that is ignored and later removed; `latest` always names a complete checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sft.dist import DistEnv, barrier

POINTER = "latest"


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    pointer = checkpoints_dir(output_dir) / POINTER
    if not pointer.is_file():
        return None
    folder = pointer.parent / pointer.read_text().strip()
    return folder if (folder / "trainer_state.json").is_file() else None


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    dist: DistEnv,
    write_state: Callable[[Path], None],
    trainer_state: dict[str, Any],
    keep: int,
) -> Path:
    """Every rank calls this; `write_state(folder)` writes the strategy's model/optimizer files."""
    root = checkpoints_dir(output_dir)
    final = root / f"step-{step:07d}"
    partial = root / f".step-{step:07d}.partial"
    if dist.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
    barrier()
    write_state(partial)
    torch.save(rng_state(), partial / f"rng-rank{dist.rank}.pt")
    barrier()
    if dist.is_main:
        (partial / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        tmp_pointer = root / (POINTER + ".tmp")
        tmp_pointer.write_text(final.name + "\n")
        os.replace(tmp_pointer, root / POINTER)  # the commit point
        _prune(root, keep)
    barrier()
    return final


def _prune(root: Path, keep: int) -> None:
    done = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".step-*.partial"):
        shutil.rmtree(stale, ignore_errors=True)


def load_trainer_state(folder: Path, dist: DistEnv) -> dict[str, Any]:
    """Read the loop's state and restore this rank's RNG streams."""
    state = json.loads((folder / "trainer_state.json").read_text())
    rng_file = folder / f"rng-rank{dist.rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    return state
