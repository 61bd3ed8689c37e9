"""Atomic, resumable checkpoints: write aside, then move the `latest` pointer (DESIGN invariant 5).

Layout: OUTPUT/checkpoints/step-0000020/{trainer_state.json, recipe.yaml, rng-rank0.pt, <strategy files>} and
OUTPUT/checkpoints/latest, a one-line file naming the newest complete folder. Folders and pointer are
published by sft/publish.py (written aside, moved into place; a re-saved step keeps its old folder until the
new one is in place). `trainer_state.json` is written last and lists every file with its size, so a folder
that lost or cut a file later is known as damaged (`damage`). Rotation (`checkpoint.keep`) removes only
older folders once the pointer names the new one. A failed write (disk full) removes its partial folder and
leaves the previous checkpoint as it was.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sft import publish
from sft.dist import DistEnv, all_reduce_sum, barrier
from sft.errors import SftError

POINTER = "latest"
STATE_FILE = "trainer_state.json"
RECIPE_FILE = "recipe.yaml"
DIVERGED_PREFIX = "diverged-"


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_of(folder: Path) -> int:
    return int(folder.name.removeprefix("step-"))


def step_folders(output_dir: str | Path) -> list[Path]:
    """Every `step-N` folder, newest first (complete or not)."""
    root = checkpoints_dir(output_dir)
    found = [p for p in root.glob("step-*") if p.is_dir() and p.name.removeprefix("step-").isdigit()]
    return sorted(found, key=step_of, reverse=True)


def damage(folder: Path) -> str | None:
    """Why `folder` is not a complete checkpoint (None when it is)."""
    state_file = folder / STATE_FILE
    if not folder.is_dir():
        return "it does not exist"
    if not state_file.is_file():
        return f"it has no {STATE_FILE} (the save did not finish)"
    try:
        state = json.loads(state_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return f"its {STATE_FILE} is not valid JSON"
    for name, size in state.get("files", {}).items():  # checkpoints written before this list: not checked
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size:,} of its {size:,} bytes"
    return None


def read_pointer(output_dir: str | Path) -> tuple[Path | None, str | None]:
    """(the folder `latest` names, None) when it names a complete checkpoint, else (None, what is wrong)."""
    pointer = checkpoints_dir(output_dir) / POINTER
    if not pointer.is_file():
        return None, f"{pointer} is missing"
    name = pointer.read_text().strip()
    if not name:
        return None, f"{pointer} is empty"
    folder = publish.current(pointer.parent / name)  # also the old version a crash mid-move left aside
    why = "it does not exist" if folder is None else damage(folder)
    if folder is None or why is not None:
        return None, f"{pointer} names {name}, but {why}"
    return folder, None


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The folder `latest` names, when it is a complete checkpoint."""
    return read_pointer(output_dir)[0]


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
    recipe_yaml: str = "",
) -> Path:
    """Every rank calls this; `write_state(folder)` writes the strategy's model/optimizer files."""
    root = checkpoints_dir(output_dir)
    final = root / f"step-{step:07d}"
    partial = publish.aside_path(final)
    error: BaseException | None = None
    if dist.is_main:
        try:
            publish.aside(final)
        except OSError as e:
            error = e
    barrier()
    if error is None and partial.is_dir():
        try:
            write_state(partial)
            torch.save(rng_state(), partial / f"rng-rank{dist.rank}.pt")
        except Exception as e:  # noqa: BLE001 (any rank's failure is agreed on below, then raised)
            error = e
    failed = _any_rank(error, dist)  # also the barrier before rank 0 seals the folder
    if not failed:
        if dist.is_main:
            try:
                _seal(partial, trainer_state, recipe_yaml)
                publish.move_into_place(partial, final)
                publish.write_text(root / POINTER, final.name + "\n")  # the commit point
            except OSError as e:
                error = e
        failed = _any_rank(error, dist)
    if failed:
        full = error is not None and publish.is_disk_full(error, root)  # asked before the partial is removed
        if dist.is_main:
            publish.discard(partial)  # (a failed pointer write removes its own aside file)
        barrier()
        _raise_save_error(error, output_dir, step, full)
    if dist.is_main:
        _prune(root, keep)
    barrier()
    return final


def _any_rank(error: BaseException | None, dist: DistEnv) -> bool:
    """Whether any rank failed (every rank calls this, so every rank learns it)."""
    return bool(all_reduce_sum(torch.tensor([float(error is not None)]), dist.device)[0] > 0)


def _seal(partial: Path, trainer_state: dict[str, Any], recipe_yaml: str) -> None:
    """Write the recipe and, last, the trainer state with the size of every file (what makes it complete)."""
    if recipe_yaml:
        (partial / RECIPE_FILE).write_text(recipe_yaml)
    files = {str(p.relative_to(partial)): p.stat().st_size for p in sorted(partial.rglob("*")) if p.is_file()}
    (partial / STATE_FILE).write_text(json.dumps({**trainer_state, "files": files}, indent=2) + "\n")


def _raise_save_error(error: BaseException | None, output_dir: str | Path, step: int, full: bool) -> None:
    previous = latest_checkpoint(output_dir)
    kept = (
        f"the previous checkpoint {previous.name} is intact" if previous else "there is no earlier checkpoint"
    )
    if error is None:  # another rank failed; it reports its own error
        raise SftError(f"checkpoint step-{step:07d} failed on another rank; {kept}")
    if full:
        raise SftError(
            f"disk full while writing checkpoint step-{step:07d} in {checkpoints_dir(output_dir)}; the partial "
            f"folder was removed and {kept}; free space, then resume=true"
        ) from None
    raise error


def _prune(root: Path, keep: int) -> None:
    for old in step_folders(root.parent)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in [*root.glob(".step-*.partial"), *root.glob(".step-*.old")]:  # left by a crash
        shutil.rmtree(stale, ignore_errors=True)


def set_aside_diverged(output_dir: str | Path, first_bad_step: int) -> tuple[Path | None, list[str]]:
    """Move checkpoints from `first_bad_step` on out of the way (renamed, not deleted) and point `latest`
    at the newest one before them. Returns (that checkpoint or None, the folders moved)."""
    root = checkpoints_dir(output_dir)
    moved = []
    for folder in step_folders(output_dir):
        if step_of(folder) >= first_bad_step:
            target = root / (DIVERGED_PREFIX + folder.name)
            shutil.rmtree(target, ignore_errors=True)  # a diverged copy of an earlier attempt at this step
            folder.rename(target)
            moved.append(target.name)
    good = next((f for f in step_folders(output_dir) if damage(f) is None), None)
    if moved:
        if good is not None:
            publish.write_text(root / POINTER, good.name + "\n")
        else:
            (root / POINTER).unlink(missing_ok=True)
    return good, moved


def load_trainer_state(folder: Path, dist: DistEnv) -> dict[str, Any]:
    """Read the loop's state and restore this rank's RNG streams."""
    state: dict[str, Any] = json.loads((folder / STATE_FILE).read_text())
    rng_file = folder / f"rng-rank{dist.rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    return state
