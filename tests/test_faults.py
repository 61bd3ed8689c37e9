"""Faults during a run: SIGKILL at every moment of a save, signals, disk full, divergence, a killed rank,
broken or damaged checkpoints, reruns. No fault loses a complete checkpoint or restarts silently.

Most runs are forked from this process (its imports and the tiny model are loaded once; a real SIGKILL ends
the child); the killed rank needs torchrun.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from sft import publish
from sft.checkpoint import damage, latest_checkpoint, step_folders
from sft.cli import main
from sft.config import load_recipe
from sft.errors import SftError
from sft.resume import find_checkpoint, plan_resume
from sft.signals import REPEAT_S, StopFlag, restores_signal_handlers
from sft.train import train
from tests.conftest import tiny_recipe

KILLED = -signal.SIGKILL
FOUR_STEPS = {"train__max_steps": 4, "checkpoint__every": 1, "checkpoint__keep": 3}
EVERY_STEP = {"checkpoint__every": 1, "checkpoint__keep": 2, "optim__warmup_steps": 1}


def forked(fn: Callable[[], Any]) -> int:
    """Run `fn` in a forked child; its exit code (an int it returns, else 0; negative: the signal that
    ended it)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            torch.set_num_threads(
                1
            )  # the same arithmetic in every child (and no thread pool across the fork)
            result = fn()
            code = result if isinstance(result, int) else 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def die_on_call(owner: Any, name: str, n: int) -> None:
    """SIGKILL this process at the `n`-th call of `owner.name` (no clean-up code runs, as with kill -9)."""
    real = getattr(owner, name)
    calls = 0

    def dying(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    setattr(owner, name, dying)


def losses(run: Path) -> dict[int, float]:
    """The last logged loss of each step (a resumed run logs the steps after its checkpoint again)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def sft_line(err: str) -> str:
    """The one line sft itself printed on stderr (after loading, libraries print progress bars there too)."""
    lines = [line for line in err.splitlines() if line.startswith("sft: ")]
    assert len(lines) == 1, err
    return lines[0]


def tree(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


# ---------------------------------------------------------------- kill -9


def test_kill_9_anywhere_never_loses_a_complete_checkpoint(tiny_model_dir: Path, tmp_path: Path) -> None:
    kw = {**EVERY_STEP, "train__max_steps": 6}
    whole = tmp_path / "whole"
    assert forked(lambda: train(tiny_recipe(tiny_model_dir, whole, **kw))) == 0

    import sft.checkpoint
    import sft.train

    # A proxy of the publish module seen by the checkpoint code only (the data cache publishes too).
    ckpt_publish = SimpleNamespace(**{k: getattr(publish, k) for k in dir(publish) if not k.startswith("__")})
    kills: list[tuple[Any, str, int, str]] = [
        (sft.train, "loss_sum", 3, "mid-training (the third step's forward)"),
        (sft.checkpoint, "rng_state", 2, "mid-save: weights and optimizer written, the rest not"),
        (ckpt_publish, "move_into_place", 1, "mid-save: the folder complete, not yet moved into place"),
        (ckpt_publish, "write_text", 1, "mid-save: the folder in place, the pointer not yet moved"),
        (sft.checkpoint, "_prune", 1, "after the commit, while old checkpoints are removed"),
    ]
    out = tmp_path / "run"
    resumed_from = 0
    for i, (owner, name, n, moment) in enumerate(kills):

        def attempt(
            owner: Any = owner, name: str = name, n: int = n, resume: str = "true" if i else "false"
        ) -> None:
            sft.checkpoint.publish = ckpt_publish  # type: ignore[assignment]
            die_on_call(owner, name, n)
            train(tiny_recipe(tiny_model_dir, out, resume=resume, **kw))

        assert forked(attempt) == KILLED, moment
        folder, notes = find_checkpoint(out)
        assert folder is not None and damage(folder) is None, (moment, notes)
        assert int(folder.name.removeprefix("step-")) >= resumed_from, moment  # never back, never from 0
        resumed_from = int(folder.name.removeprefix("step-"))
        assert plan_resume(tiny_recipe(tiny_model_dir, out, resume="true", **kw)).folder == folder
    assert resumed_from >= 3
    # The last attempt changes only what is evaluated (exact-safe): it goes through and finishes.
    assert (
        forked(lambda: train(tiny_recipe(tiny_model_dir, out, resume="true", eval__max_batches=2, **kw))) == 0
    )
    assert losses(out) == losses(whole) and list(losses(out)) == list(range(1, 7))  # bit-exact, no step lost
    assert not list((out / "checkpoints").glob(".*"))  # partial and old folders cleaned up


# ---------------------------------------------------------------- broken and damaged checkpoints


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    train(tiny_recipe(tiny_model_dir, out, **FOUR_STEPS))
    return out


def copy_run(run: Path, to: Path) -> Path:
    subprocess.run(["cp", "-a", str(run), str(to)], check=True)
    return to


def test_broken_pointer_falls_back_to_the_newest_complete_checkpoint(
    finished_run: Path, tmp_path: Path, tiny_model_dir: Path
) -> None:
    def broken(name: str, change: Callable[[Path], None]) -> tuple[Path | None, list[str]]:
        run = copy_run(finished_run, tmp_path / name)
        change(run / "checkpoints")
        return find_checkpoint(run)

    folder, notes = broken("missing", lambda c: (c / "latest").unlink())
    assert folder is not None and folder.name == "step-0000004" and "latest is missing" in notes[0]
    folder, notes = broken("empty", lambda c: (c / "latest").write_text(""))
    assert folder is not None and folder.name == "step-0000004" and "latest is empty" in notes[0]
    folder, notes = broken("deleted", lambda c: (c / "latest").write_text("step-0000009\n"))
    assert folder is not None and folder.name == "step-0000004" and "names step-0000009" in notes[0]
    # A file of the newest checkpoint cut short: its size differs from the size recorded when it was saved.
    cut = "trainable.safetensors"
    folder, notes = broken("truncated", lambda c: (c / "step-0000004" / cut).write_bytes(b"x"))
    assert folder is not None and folder.name == "step-0000003"
    assert (
        f"{cut} has 1 of its" in notes[0]
        and "resuming from the newest complete checkpoint, step-0000003" in notes[0]
    )
    # A crash between the two renames of a re-save leaves the complete old version aside: still found.
    folder, notes = broken("mid-move", lambda c: (c / "step-0000004").rename(c / ".step-0000004.old"))
    assert folder is not None and folder.name == ".step-0000004.old" and not notes

    # resume=true from the truncated case continues from step 3 and says why, through the CLI's output.
    run = tmp_path / "truncated"
    results = train(tiny_recipe(tiny_model_dir, run, resume="true", **FOUR_STEPS))
    assert results["steps"] == 4 and latest_checkpoint(run) == run / "checkpoints" / "step-0000004"
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps.count(4) >= 2 and steps.count(1) == 1  # step 4 trained again, step 1 not: no restart


def test_corrupt_checkpoint_names_itself_and_the_older_one(
    finished_run: Path, tmp_path: Path, tiny_model_dir: Path
) -> None:
    run = copy_run(finished_run, tmp_path / "corrupt")
    (run / "final").rename(run / "final-before")  # not finished: the resume must load the checkpoint
    weights = run / "checkpoints" / "step-0000004" / "trainable.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:16] = b"\xff" * 8  # the header is garbage, the size is unchanged: only loading can tell
    weights.write_bytes(bytes(data))
    before = tree(run)
    with pytest.raises(SftError) as e:
        train(tiny_recipe(tiny_model_dir, run, resume="true", **FOUR_STEPS))
    msg = str(e.value)
    assert (
        "checkpoint" in msg and "step-0000004 cannot be loaded" in msg and "step-0000003 can continue" in msg
    )
    assert "\n" not in msg and tree(run) == before  # one line, nothing written


def test_rerun_of_a_finished_run_changes_nothing(
    finished_run: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    run = copy_run(finished_run, tmp_path / "again")
    before = tree(run)
    for resume in ("true", "auto"):
        results = train(tiny_recipe(tiny_model_dir, run, resume=resume, **FOUR_STEPS))
        assert results == json.loads((run / "results.json").read_text()) and results["steps"] == 4
    assert tree(run) == before  # nothing deleted, rewritten or re-saved


def test_allowed_recipe_change_takes_effect_and_is_recorded(
    finished_run: Path, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sft.data.sources

    hashed: list[str] = []  # the resume check, run.json and the data cache share one hashing per source
    real_hash = sft.data.sources.RowSource._fingerprint
    monkeypatch.setattr(sft.data.sources, "_FINGERPRINTS", {})
    monkeypatch.setattr(
        sft.data.sources.RowSource, "_fingerprint", lambda src: (hashed.append(src.name), real_hash(src))[1]
    )
    run = copy_run(finished_run, tmp_path / "longer")
    kw = {"train__max_steps": 6, "checkpoint__every": 1, "checkpoint__keep": 3, "resume": "true"}
    with pytest.raises(SftError, match=r"train.max_steps 4 -> 6; restore them, or set resume_changes=allow"):
        train(tiny_recipe(tiny_model_dir, run, **kw))
    train(tiny_recipe(tiny_model_dir, run, resume_changes="allow", optim__lr=0.01, **kw))
    assert sorted(hashed) == ["builtin:jargon/eval", "builtin:jargon/train"]  # each read once in all
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    lr5 = next(r["train/lr"] for r in rows if r["step"] == 5 and "train/lr" in r)
    assert lr5 == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi * 4 / 6)))  # the new schedule, at step 4
    state = json.loads((run / "checkpoints" / "step-0000006" / "trainer_state.json").read_text())
    changed = [{"at_step": 4, "changes": {"optim.lr": [0.001, 0.01], "train.max_steps": [4, 6]}}]
    assert state["recipe_changes"] == changed
    assert json.loads((run / "run.json").read_text())["recipe_changes"] == changed  # the manifest too


# ---------------------------------------------------------------- signals


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGUSR1])
def test_signal_checkpoints_then_exits(
    tiny_model_dir: Path, tmp_path: Path, sig: signal.Signals, capfd: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(tiny_recipe(tiny_model_dir, out, train__max_steps=100000).to_yaml())
    pid = os.fork()
    if pid == 0:
        torch.set_num_threads(1)
        os._exit(main(["train", str(recipe)]))
    deadline = time.time() + 120
    while not ((out / "metrics.jsonl").exists() and losses(out)) and time.time() < deadline:
        time.sleep(0.1)
    os.kill(pid, sig)
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    assert code == 99, capfd.readouterr()
    ckpt = latest_checkpoint(out)
    assert ckpt is not None and json.loads((ckpt / "trainer_state.json").read_text())["step"] == max(
        losses(out)
    )
    assert f"{sig.name} received: checkpoint at step" in capfd.readouterr().out


def test_second_sigint_stops_at_once() -> None:
    @restores_signal_handlers
    def ctrl_c_twice_then_again() -> None:
        flag = StopFlag()
        flag.install()
        os.kill(os.getpid(), signal.SIGINT)  # the first asks for a stop at the end of the step
        os.kill(os.getpid(), signal.SIGINT)  # the same Ctrl-C again (torchrun forwards it to every rank)
        assert flag.requested and flag.signal_name == "SIGINT"
        time.sleep(REPEAT_S)
        os.kill(os.getpid(), signal.SIGINT)  # the second stops now (the CLI exits with code 130)
        time.sleep(1)

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        ctrl_c_twice_then_again()
    assert signal.getsignal(signal.SIGINT) is before  # given back, although the run raised


# ---------------------------------------------------------------- disk full


def in_small_disk(folder: Path, megabytes: int, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run `fn` in a child whose `folder` is a fresh tmpfs of `megabytes` (a private mount namespace: the
    mount is gone when the child ends); returns what `fn` reported."""
    report = folder.parent / f"{folder.name}.report.json"

    def child() -> int:
        if ctypes.CDLL(None, use_errno=True).unshare(0x00020000) != 0:  # CLONE_NEWNS
            return 77
        subprocess.run(["mount", "--make-rprivate", "/"], check=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(folder)], check=True)
        report.write_text(json.dumps(fn()))
        return 0

    folder.mkdir()
    code = forked(child)
    if code == 77:
        pytest.skip("needs a private mount namespace (root or CAP_SYS_ADMIN) for a small disk")
    assert code == 0
    return dict(json.loads(report.read_text()))


def fill_disk(folder: Path) -> None:
    with (folder / "filler").open("wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
        except OSError:
            pass


@pytest.mark.parametrize("when", ["checkpoint", "export"])
def test_disk_full_keeps_the_previous_checkpoint(
    tiny_model_dir: Path, tmp_path: Path, when: str, capfd: pytest.CaptureFixture[str]
) -> None:
    small = tmp_path / "small"
    out = small / "run"
    recipe = tmp_path / "r.yaml"
    # full fine-tuning: a checkpoint is ~39 MB, so the second of them does not fit in 64 MB
    method = {"checkpoint": {"method": "full"}, "export": {}}[when]
    recipe.write_text(
        tiny_recipe(tiny_model_dir, out, train__max_steps=3, checkpoint__every=1, **method).to_yaml()
    )

    def run() -> dict[str, Any]:
        if when == "export":  # something else fills the disk just before the export
            import sft.train

            real = sft.train.export_run
            sft.train.export_run = lambda *a: (fill_disk(small), real(*a))[1]  # type: ignore[assignment]
        code = main(["train", str(recipe)])
        latest = latest_checkpoint(out)
        return {
            "code": code,
            "latest": latest.name if latest else None,
            "damage": damage(latest) if latest else "none",
            "left": sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.name.startswith(".")),
            "final": (out / "final").exists(),
        }

    seen = in_small_disk(small, 64, run)
    err = sft_line(capfd.readouterr().err)
    assert seen["code"] == 2, err
    if when == "checkpoint":
        assert "disk full while writing checkpoint step-0000002" in err and "step-0000001 is intact" in err
        assert seen["latest"] == "step-0000001"
    else:
        assert "disk full while exporting the model" in err and "checkpoint is intact" in err
        assert seen["latest"] == "step-0000003"
    assert seen["damage"] is None and not seen["final"]
    assert seen["left"] == [".sft-run"]  # no partial folder or file left behind


# ---------------------------------------------------------------- divergence


def test_nan_loss_stops_with_exit_3_keeping_the_good_checkpoint(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import sft.train

    real, calls = sft.train.loss_sum, [0]

    def nan_at_step_4(*args: Any) -> torch.Tensor:
        calls[0] += 1
        loss = real(*args)
        return loss * float("nan") if calls[0] == 4 else loss

    monkeypatch.setattr(sft.train, "loss_sum", nan_at_step_4)
    out = tmp_path / "run"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        tiny_recipe(
            tiny_model_dir, out, train__max_steps=6, checkpoint__every=1, checkpoint__keep=3
        ).to_yaml()
    )
    handler = signal.getsignal(signal.SIGINT)
    assert main(["train", str(recipe)]) == 3
    assert signal.getsignal(signal.SIGINT) is handler  # Ctrl-C works again after a run that raised
    err = sft_line(capsys.readouterr().err)
    assert "training diverged at step 4: loss nan" in err
    # Step 3's weights gave the NaN loss of step 4: that checkpoint is set aside, step 2 is the good one.
    assert latest_checkpoint(out) == out / "checkpoints" / "step-0000002"
    assert "last good checkpoint: " + str(out / "checkpoints" / "step-0000002") in err
    assert (out / "checkpoints" / "diverged-step-0000003").is_dir() and not (out / "final").exists()
    assert plan_resume(load_recipe(recipe, ["resume=true"])).folder == out / "checkpoints" / "step-0000002"


def test_collapse_stops_with_exit_3(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # LoRA at lr 1e6 without clipping: the weights of step 3 send the model to the uniform distribution (loss
    # ln(vocabulary), zero gradient: nothing trains it back). Warmup keeps the first steps good.
    out = tmp_path / "run"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        tiny_recipe(
            tiny_model_dir,
            out,
            optim__lr=1e6,
            optim__max_grad_norm="null",
            optim__warmup_steps=3,
            train__max_steps=8,
            checkpoint__every=1,
        ).to_yaml()
    )
    assert main(["train", str(recipe)]) == 3
    err = sft_line(capsys.readouterr().err)
    assert "training collapsed at step 4: loss 10.80" in err and "= ln(vocabulary size 49152)" in err
    assert latest_checkpoint(out) == out / "checkpoints" / "step-0000002"
    assert [p.name for p in step_folders(out)] == ["step-0000002"]  # keep=2: step 1 was rotated out
    assert (out / "checkpoints" / "diverged-step-0000003").is_dir()


# ---------------------------------------------------------------- a killed rank


@pytest.mark.dist
def test_a_killed_rank_is_named(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        tiny_recipe(tiny_model_dir, out, train__max_steps=100000, strategy__name="fsdp2").to_yaml()
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "-m",
        "sft.cli",
        "train",
        str(recipe),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 180
        while not ((out / "metrics.jsonl").exists() and losses(out)) and time.time() < deadline:
            time.sleep(0.2)
        rank1 = [p for p in children(proc.pid) if environ_of(p).get("RANK") == "1"]
        assert len(rank1) == 1
        killed_at = time.time()
        os.kill(rank1[0], signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode != 0 and time.time() - killed_at < 30
    line = next((x for x in stderr.splitlines() if x.startswith("[sft] rank 1 of 2 stopped first")), None)
    assert line is not None, stderr[-4000:]
    assert "killed by a signal" in line
    assert stderr.index(line) < stderr.index("Root Cause")  # before torchrun's summary


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


def environ_of(pid: int) -> dict[str, str]:
    fields = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(f.decode(errors="replace").partition("=")[::2] for f in fields if b"=" in f)
