"""Crash safety of sft/publish.py, the one write-aside-then-move helper every writer uses.

A publish is killed (SIGKILL, so no clean-up code runs) at each of its file-system steps, then again during
the next publish; after every kill a complete version must be reachable through `current()`, the old one is
never gone before the new one is in place, and a later publish ends with exactly the new version and no
leftovers.
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sft import publish
from sft.errors import SftError

FILES = ("weights", "config")
# Steps of a publish over an existing target: remove a stale partial, write (killed half-way), rename the old
# version aside, rename the new one in, delete the old one; plus one when an earlier crash left an old copy.
STEPS = 5


def publish_version(target: Path, version: str, kill_at: int | None) -> bool:
    """Publish `version` into `target` in a forked child killed at its `kill_at`-th step (None: no kill);
    return whether it was killed."""
    pid = os.fork()
    if pid == 0:  # the child: count the steps, die on the chosen one
        calls = 0

        def step(fn: Callable[..., Any]) -> Callable[..., Any]:
            def run(*args: Any, **kwargs: Any) -> Any:
                nonlocal calls
                calls += 1
                if calls == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                return fn(*args, **kwargs)

            return run

        try:
            publish.os.replace = step(os.replace)  # type: ignore[attr-defined]
            publish.shutil.rmtree = step(shutil.rmtree)  # type: ignore[attr-defined]
            with publish.publishing(target) as folder:
                (folder / FILES[0]).write_text(version)
                step(lambda: None)()  # killed half-way through writing
                (folder / FILES[1]).write_text(version)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) or os.waitstatus_to_exitcode(status) == 0
    return os.WIFSIGNALED(status)


def version_of(folder: Path | None) -> str | None:
    """The version a complete folder holds; fails on a mixed or half-written one."""
    if folder is None:
        return None
    contents = {name: (folder / name).read_text() for name in FILES if (folder / name).is_file()}
    assert len(contents) == len(FILES) and len(set(contents.values())) == 1, (folder, contents)
    return next(iter(contents.values()))


@pytest.mark.parametrize("first_kill", range(1, STEPS + 1))
def test_a_kill_at_any_step_keeps_a_complete_version(tmp_path: Path, first_kill: int) -> None:
    first = tmp_path / "first"
    publish_version(first / "out", "v1", kill_at=None)
    assert version_of(first / "out") == "v1"

    assert publish_version(first / "out", "v2", kill_at=first_kill)
    seen = version_of(publish.current(first / "out"))
    assert seen == ("v1" if first_kill <= 4 else "v2")  # the new version is visible once renamed in
    if first_kill <= 3:  # nothing moved yet: the old version is still in place
        assert version_of(first / "out") == "v1"

    # The next publish is killed too, at each step: still a complete version, never an older one.
    for second_kill in range(1, STEPS + 2):
        second = tmp_path / f"second{second_kill}"
        shutil.copytree(first, second)
        publish_version(second / "out", "v3", kill_at=second_kill)
        assert version_of(publish.current(second / "out")) in (seen, "v3")

        publish_version(second / "out", "v4", kill_at=None)
        assert version_of(second / "out") == "v4"
        assert sorted(p.name for p in second.iterdir()) == ["out"]  # no partial or old copy left


def test_a_first_publish_killed_leaves_nothing_visible(tmp_path: Path) -> None:
    target = tmp_path / "out"
    for kill in range(1, 4):  # remove a stale partial, write, rename in
        assert publish_version(target, "v1", kill_at=kill)
        assert publish.current(target) is None
    publish_version(target, "v2", kill_at=None)
    assert version_of(target) == "v2" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_error_while_writing_leaves_the_old_version_and_no_partial(tmp_path: Path) -> None:
    target = tmp_path / "out"
    publish_version(target, "v1", kill_at=None)
    with pytest.raises(RuntimeError), publish.publishing(target) as folder:
        (folder / FILES[0]).write_text("v2")
        raise RuntimeError("disk full")
    assert version_of(target) == "v1" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_write_text_replaces_a_file_whole(tmp_path: Path) -> None:
    pointer = tmp_path / "latest"
    publish.write_text(pointer, "step-1\n")
    publish.write_text(pointer, "step-2\n")
    assert pointer.read_text() == "step-2\n" and sorted(p.name for p in tmp_path.iterdir()) == ["latest"]


def test_a_failed_small_write_keeps_the_old_file_and_leaves_no_partial(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pointer = tmp_path / "latest"
    publish.write_text(pointer, "step-1\n")

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(publish.os, "fsync", disk_full)
    with pytest.raises(OSError):
        publish.write_bytes(pointer, b"step-2\n")
    assert pointer.read_text() == "step-1\n" and sorted(p.name for p in tmp_path.iterdir()) == ["latest"]


def test_the_checkpoint_pointer_leads_to_the_old_folder_a_kill_left_aside(tmp_path: Path) -> None:
    from sft.checkpoint import checkpoints_dir, latest_checkpoint

    root = checkpoints_dir(tmp_path)
    old = publish.aside_path(root / "step-0000004", publish.OLD)  # killed between the two renames
    old.mkdir(parents=True)
    (old / "trainer_state.json").write_text("{}")
    publish.write_text(root / "latest", "step-0000004\n")
    assert latest_checkpoint(tmp_path) == old


def test_a_failed_export_keeps_the_previous_final_and_leaves_no_partial(tmp_path: Path) -> None:
    import torch

    from sft.dist import DistEnv
    from sft.export import export_run

    class DiskFull:
        def export(self, folder: Path, model: Any, tokenizer: Any) -> None:
            (folder / "model.safetensors").write_text("half")
            raise OSError(28, "No space left on device")

    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "model.safetensors").write_text("previous")
    with pytest.raises(SftError, match="disk full while exporting the model"):
        export_run(tmp_path, DiskFull(), None, None, DistEnv(0, 0, 1, torch.device("cpu")))  # type: ignore[arg-type]
    assert (tmp_path / "final" / "model.safetensors").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
