"""The run's folder (`output_dir`): safe to use, ours to replace, writable, with room (DESIGN invariant 11).

sft replaces or deletes a folder only when sft made it: a `.sft-run` marker is written into every folder the
trainer or the launcher creates (or adopts empty). A folder that is, or contains, the working directory, the
recipe, the data or the model is never used, with or without overwrite=true. All checks here run before
anything is loaded or written; no torch import (invariant 8).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from sft.config import Recipe
from sft.errors import SftError

MARKER = ".sft-run"
RUN_RECORD = "recipe.yaml"  # a folder holds a run once the trainer has written its recipe there
KEPT = (MARKER, "slurm", "submitit")  # what replacing a run leaves: the marker and the launcher's job files
GB = 1e9


def is_ours(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def holds_run(folder: Path) -> bool:
    return (folder / RUN_RECORD).is_file()


def check_output_dir(recipe: Recipe, protected: Iterable[str | Path] = ()) -> None:
    """One line and exit 2 when `output_dir` cannot be used as the recipe asks, before anything is written.

    `protected`: the user's files the folder must not contain (the recipe file, data files, the model)."""
    out_text = recipe.output_dir
    out = Path(out_text).expanduser().resolve()
    where = f"output_dir {out_text}"
    cwd = Path.cwd().resolve()
    if out == cwd or cwd.is_relative_to(out):
        what = "is the working directory" if out == cwd else f"contains the working directory {cwd}"
        raise SftError(
            f"{where} {what}, which holds your files; name a folder of the run's own, e.g. output_dir=runs/my-run"
        )
    _check_writable(out, where)
    for path in protected:
        p = Path(path).expanduser().resolve()
        if p.is_relative_to(out):
            raise SftError(
                f"{where} holds {p}, one of this run's inputs; a run folder must hold only the run's outputs, "
                "so choose another output_dir (e.g. a new folder next to it)"
            )
    if not out.is_dir() or not any(out.iterdir()):
        return  # new or empty: the trainer makes it ours
    if not is_ours(out):
        if holds_run(out):  # a run written before sft marked its folders: it may be continued, not replaced
            if recipe.resume is not False:
                return
            raise SftError(
                f"{where} already holds a run from an sft without run markers; add resume=true to continue it, "
                "or choose another output_dir (overwrite=true replaces only folders marked as sft's own)"
            )
        entries = sorted(p.name for p in out.iterdir())
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise SftError(
            f"{where} already holds files that sft did not write ({shown}); sft writes only into new or empty "
            "folders and its own runs, so choose another output_dir (or empty this one yourself)"
        )
    if holds_run(out) and recipe.resume is False and not recipe.overwrite:
        raise SftError(
            f"{where} already holds a run; add resume=true to continue it, overwrite=true to replace it, "
            "or choose another output_dir"
        )


def _check_writable(out: Path, where: str) -> None:
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        below = "is a file" if existing == out else f"is below {existing}, which is a file"
        raise SftError(f"{where} {below}, not a folder; choose a folder path for output_dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SftError(
            f"{where}: cannot write in {existing} (read-only or no permission); choose a folder you can write to"
        )


def check_room(output_dir: str, needed_bytes: float, what: str) -> None:
    """Fail before loading anything when the output's disk cannot take `what` (about `needed_bytes`)."""
    existing = Path(output_dir).expanduser().resolve()
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if free < needed_bytes:
        raise SftError(
            f"output_dir {output_dir}: {free / GB:.2f} GB free on its disk, but {what} needs about "
            f"{needed_bytes / GB:.2f} GB; free some space or choose an output_dir on a larger disk"
        )


def claim(folder: Path) -> None:
    """Create `folder` (or adopt it empty) as sft's own: the marker says sft may replace it later."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).touch()


def replace_own_run(folder: Path) -> None:
    """Remove an earlier run's outputs from a folder of ours (overwrite=true, or resume=auto with nothing to
    continue). The launcher's job logs and scripts stay: a requeued job is writing its log there."""
    if not (folder.is_dir() and is_ours(folder) and holds_run(folder)):
        return
    for entry in folder.iterdir():
        if entry.name in KEPT:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def prepare_run_folder(recipe: Recipe, fresh: bool) -> None:
    """Rank 0, once the inputs are known to be good: make the folder ours and record the recipe.

    `fresh`: the run starts at step 0, so an earlier run of ours there is replaced (overwrite=true, or
    resume=auto with no checkpoint to continue)."""
    out = Path(recipe.output_dir)
    if fresh:
        replace_own_run(out)
    claim(out)
    (out / RUN_RECORD).write_text(recipe.to_yaml())
