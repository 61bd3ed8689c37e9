"""The run folder: sft replaces only what it made, keeps the launcher's job logs, and lets a run from before
the marker existed be resumed (but not overwritten)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sft.config import Recipe, validate_recipe
from sft.errors import SftError
from sft.run_folder import MARKER, check_output_dir, claim, prepare_run_folder


def recipe(out: Path, **top: object) -> Recipe:
    return validate_recipe({"output_dir": str(out), **top})


def test_overwrite_replaces_the_run_but_keeps_the_job_logs(tmp_path: Path) -> None:
    out = tmp_path / "run"
    claim(out)
    for name in ("recipe.yaml", "metrics.jsonl", "checkpoints/step-0000001/x", "slurm/job-7.out"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("old")
    r = recipe(out, overwrite=True)
    check_output_dir(r)
    prepare_run_folder(r, fresh=True)
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert left == [MARKER, "recipe.yaml", "slurm", "slurm/job-7.out"]
    assert (out / "recipe.yaml").read_text() != "old" and (out / "slurm/job-7.out").read_text() == "old"


def test_a_run_without_the_marker_can_be_resumed_not_overwritten(tmp_path: Path) -> None:
    out = tmp_path / "old-run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "recipe.yaml").write_text("x: 1\n")
    check_output_dir(recipe(out, resume=True))
    with pytest.raises(SftError, match="without run markers; add resume=true"):
        check_output_dir(recipe(out, overwrite=True))
    prepare_run_folder(recipe(out, overwrite=True), fresh=True)
    assert (out / "checkpoints").is_dir()  # not ours: nothing removed even if asked


def test_an_empty_folder_is_adopted(tmp_path: Path) -> None:
    out = tmp_path / "empty"
    out.mkdir()
    check_output_dir(recipe(out))
    prepare_run_folder(recipe(out), fresh=True)
    assert (out / MARKER).is_file()
