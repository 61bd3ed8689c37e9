"""Write aside, then move into place: the one way sft publishes a folder or a small file.

Every writer whose output must appear complete or not at all uses this module: the checkpoint folders and
their `latest` pointer, the run's final export, the merge output, the data cache entries, the converted
built-in model, the run manifest (run.json) and the plots. A folder TARGET is written into its hidden sibling
`.TARGET.partial` and then moved into place with renames; a file is written to `.TARGET.PID.partial` and
renamed over the old one.

Moving a folder into place when TARGET already exists (a re-saved checkpoint, an overwritten merge):

    1. rename TARGET           -> .TARGET.old      (the old version is kept, not deleted)
    2. rename .TARGET.partial  -> TARGET           (the new version is in place)
    3. delete .TARGET.old

What a crash (a killed process) leaves at each point:

- while writing .TARGET.partial: TARGET is the old version (or absent if there was none); the partial folder is
  ignored by readers and removed by the next `aside()` for the same target.
- between 1 and 2: TARGET is absent, `.TARGET.old` holds the complete old version and `.TARGET.partial` the
  complete new one. `current(TARGET)` returns the old version, so a reader (the checkpoint pointer) still
  finds a complete folder; the next publish of TARGET keeps `.TARGET.old` until its new version is in place.
- between 2 and 3 (or during 3): TARGET is the complete new version; the leftover `.TARGET.old` is removed by
  the next publish of TARGET (or by its owner's clean-up).

So at no point is the old version deleted before the new one is in place, and at every point a complete
version is reachable through `current()`. Renames are atomic within one file system (the aside folders are
siblings of their target, so they are on the same one). Folder contents are not fsynced (a checkpoint is
large): what a power failure keeps is the file system's business; `write_bytes` does sync its small file.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PARTIAL = ".partial"
OLD = ".old"
FULL_DISK_BYTES = 1 << 20  # less room than this left after a failed write: the disk filled up


def aside_path(target: Path, suffix: str = PARTIAL) -> Path:
    """The hidden sibling a new version of `target` is written into (`.NAME.partial`)."""
    return target.parent / f".{target.name}{suffix}"


def aside(target: str | Path) -> Path:
    """Create an empty `.NAME.partial` folder next to `target` (a leftover one is removed) and return it."""
    target = Path(target)
    partial = aside_path(target)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    return partial


def move_into_place(partial: Path, target: str | Path) -> None:
    """Replace `target` (if any) by the complete folder `partial`; see the module docstring for crash points."""
    target = Path(target)
    old = aside_path(target, OLD)
    if target.exists():
        if old.exists():
            shutil.rmtree(old)  # left by a crash after an earlier publish completed: TARGET is newer
        os.replace(target, old)
    # else: either no old version, or a crash between the renames left it in `old`, which stays until now.
    os.replace(partial, target)
    shutil.rmtree(old, ignore_errors=True)


def discard(partial: Path) -> None:
    """Remove a partial folder after a failed write (the target is untouched)."""
    shutil.rmtree(partial, ignore_errors=True)


@contextmanager
def publishing(target: str | Path) -> Iterator[Path]:
    """`with publishing(TARGET) as folder:` write into `folder`; on leaving, it becomes TARGET.

    An exception while writing removes the partial folder and leaves TARGET as it was. (Writers whose ranks
    share one folder call `aside`, `move_into_place` and `discard` themselves, around their barriers.)"""
    partial = aside(target)
    try:
        yield partial
    except BaseException:
        discard(partial)
        raise
    move_into_place(partial, target)


def is_disk_full(e: BaseException, folder: Path | None = None) -> bool:
    """Disk full or over quota, however the writer reports it (OSError, safetensors' or torch's own errors,
    some of which say only that a write fell short): by the error, or by `folder`'s disk having no room left
    (ask before removing what the failed write left)."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return True
    if any(s in str(e) for s in ("No space left", "StorageFull", "Disk quota", "File too large")):
        return True
    try:
        return folder is not None and shutil.disk_usage(folder).free < FULL_DISK_BYTES
    except OSError:
        return False


def current(target: str | Path) -> Path | None:
    """The complete version of `target`: itself, or the old version a crash between the renames left aside."""
    target = Path(target)
    if target.exists():
        return target
    old = aside_path(target, OLD)
    return old if old.exists() else None


def write_bytes(target: str | Path, data: bytes) -> None:
    """Replace a small file atomically: readers see the old content or the new one, never a part.

    The aside file's name carries the process id, because two processes may write the same file at once
    (`sft report` draws the plots of a run that is drawing them too); an error removes it, a kill leaves it."""
    target = Path(target)
    partial = aside_path(target, f".{os.getpid()}{PARTIAL}")
    try:
        with partial.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the file is small; make its content durable before it becomes visible
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def write_text(target: str | Path, text: str) -> None:
    """`write_bytes` of UTF-8 text (the checkpoint pointer, run.json)."""
    write_bytes(target, text.encode())
