"""The real trainer on the local 2-node Slurm cluster (slurm/local_cluster.sh), against torchrun on this box.

Jobs are rendered and submitted by the launcher as `sft launch RECIPE --backend slurm` does (2 nodes x 1
process, CPU, gloo, fp32, full fine-tuning of the tiny model): FSDP2 and ZeRO-3 runs whose per-step losses must equal the same
recipe under `torchrun --standalone --nproc_per_node 2`, and an FSDP2 run that gets the time-limit signal
(`scancel --signal=USR1 --batch`) mid-training, checkpoints, is requeued, resumes and must end with the
uninterrupted run's losses. Everything is submitted at once and the torchrun references run meanwhile.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from launch.slurm import log_path, submit_sbatch
from launch.spec import JobSpec, job_spec
from sft.config import load_recipe
from tests.conftest import tiny_recipe
from tests.test_slurm import cluster, wait_ended  # noqa: F401  (the session fixture that starts the cluster)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
RUNNER = REPO / "tests" / "distributed" / "run_jobs.py"
RTOL = 1e-5
SHORT = 4  # steps of the parity jobs
LONG = 60  # steps of the preempted job: ~0.2 s each, so ~10 s for the signal to land mid-run
WAIT = 420  # seconds for a job on a busy 2-core machine

JOBS = {
    "fsdp2": (SHORT, ["strategy.name=fsdp2"]),
    "zero3": (SHORT, ["strategy.name=deepspeed", "strategy.deepspeed.zero_stage=3"]),
    "preempted": (LONG, ["strategy.name=fsdp2"]),
}


@dataclass
class Run:
    root: Path
    recipe: Path
    specs: dict[str, JobSpec] = field(default_factory=dict)
    job_ids: dict[str, str] = field(default_factory=dict)
    infos: dict[str, dict[str, str]] = field(default_factory=dict)
    reference: dict[str, dict[int, float]] = field(default_factory=dict)
    reference_output: str = ""
    signalled_at: int = 0
    seconds: dict[str, float] = field(default_factory=dict)

    def out(self, name: str, where: str) -> Path:
        return self.root / where / name

    def overrides(self, name: str, where: str) -> list[str]:
        steps, extra = JOBS[name]
        return [f"output_dir={self.out(name, where)}", f"train.max_steps={steps}", *extra]

    def log(self, name: str) -> str:
        path = log_path(self.specs[name], self.job_ids[name])
        return path.read_text() if path.exists() else "(no log)"


def losses(out: Path) -> dict[int, list[float]]:
    """Every train/loss row of metrics.jsonl, by step (a resumed run may log a step again)."""
    rows: dict[int, list[float]] = {}
    path = out / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        row = json.loads(line)
        if "train/loss" in row:
            rows.setdefault(int(row["step"]), []).append(float(row["train/loss"]))
    return rows


def assert_same_losses(got: dict[int, list[float]], want: dict[int, float], steps: int) -> float:
    """Each step 1..steps logged, every value of a step within RTOL of the reference; the max rel diff."""
    assert sorted(got) == list(range(1, steps + 1)), sorted(got)
    assert sorted(want) == list(range(1, steps + 1)), sorted(want)
    worst = 0.0
    for step, values in got.items():
        for v in values:
            rel = abs(v - want[step]) / abs(want[step])
            assert rel <= RTOL, f"step {step}: {v} vs reference {want[step]} (rel {rel:.2e})"
            worst = max(worst, rel)
    return worst


def wait_for_step(out: Path, step: int, job_id: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not any(s >= step for s in losses(out)):
        state = subprocess.run(
            ["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True
        ).stdout.strip()
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"job {job_id} is {state or 'gone'}"
        assert time.monotonic() < deadline, f"{out} reached no step {step} within {timeout} s"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def run(cluster: None, tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Run]:  # noqa: F811
    root = tmp_path_factory.mktemp("slurm-train")
    rows = (REPO / "sft" / "builtin_data" / "jargon" / "train.jsonl").read_text().splitlines()
    (root / "train.jsonl").write_text("\n".join(rows[:64]) + "\n")
    recipe = tiny_recipe(
        tiny_model_dir,
        root / "unused",
        method="full",
        data__train=str(root / "train.jsonl"),
        data__eval="[]",
        train__micro_batch_size=2,
        train__grad_accum=1,
        eval__prompts="[]",
        launch__nodes=2,
        launch__procs_per_node=1,
        launch__env="{OMP_NUM_THREADS: '1', HF_HUB_OFFLINE: '1', TOKENIZERS_PARALLELISM: 'false'}",
    )
    r = Run(root, root / "recipe.yaml")
    r.recipe.write_text(recipe.to_yaml())
    # DeepSpeed's C++ ops compile once into the project cache (see test_strategies_dist.py).
    built = subprocess.run([sys.executable, "-m", "sft.strategies.deepspeed"], cwd=REPO, capture_output=True)
    assert built.returncode == 0, built.stderr[-3000:]

    # 1. Submit every Slurm job, as `sft launch RECIPE OVERRIDES --backend slurm` does.
    started = time.monotonic()
    for name in JOBS:
        overrides = [*r.overrides(name, "slurm"), f"launch.job_name=t-train-{name}"]
        spec = job_spec(load_recipe(r.recipe, overrides), r.recipe, overrides)
        spec.workdir = REPO
        r.specs[name] = spec
        r.job_ids[name], _ = submit_sbatch(spec)
    try:
        # 2. Meanwhile, the references: the same recipes under torchrun on this box, one process group.
        jobs = [
            {"name": name, "recipe": str(r.recipe), "overrides": r.overrides(name, "torchrun")}
            for name in JOBS
        ]
        (root / "jobs.json").write_text(json.dumps(jobs))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        reference = subprocess.Popen(
            [*cmd, str(RUNNER), str(root / "jobs.json"), str(root / "results.json")],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

        # 3. The time-limit signal to the batch shell of the long job once it has trained two steps.
        out = r.out("preempted", "slurm")
        wait_for_step(out, 2, r.job_ids["preempted"])
        subprocess.run(["scancel", "--signal=USR1", "--batch", r.job_ids["preempted"]], check=True)
        r.signalled_at = max(losses(out))

        r.reference_output, _ = reference.communicate(timeout=WAIT)
        r.seconds["torchrun references"] = round(time.monotonic() - started, 1)
        assert reference.returncode == 0, r.reference_output[-4000:]
        for name in JOBS:
            got = losses(r.out(name, "torchrun"))
            assert all(len(v) == 1 for v in got.values()), got
            r.reference[name] = {step: v[0] for step, v in got.items()}
        for name, job_id in r.job_ids.items():
            r.infos[name] = wait_ended(job_id, WAIT)
            r.seconds[name] = round(time.monotonic() - started, 1)
        yield r
    finally:
        for job_id in r.job_ids.values():
            subprocess.run(["scancel", job_id], check=False, capture_output=True)
        print(f"\nslurm training timings (s since submission): {r.seconds}")


@pytest.mark.parametrize("name", ["fsdp2", "zero3"])
def test_sbatch_training_matches_torchrun(run: Run, name: str) -> None:
    info = run.infos[name]
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", run.log(name)
    worst = assert_same_losses(losses(run.out(name, "slurm")), run.reference[name], SHORT)
    print(f"{name}: max rel loss diff sbatch vs torchrun {worst:.2e}")
    log = run.log(name)
    assert "nodes node[1-2]" in log and "srun exited 0" in log, log
    assert (run.out(name, "slurm") / "final").is_dir()


def test_usr1_mid_training_checkpoints_requeues_and_resumes_to_the_same_losses(run: Run) -> None:
    info, log = run.infos["preempted"], run.log("preempted")
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log
    assert f"requeueing job {run.job_ids['preempted']}" in log and "restart 1" in log, log
    assert "SIGUSR1 received: checkpoint at step" in log, log
    resumed = [line for line in log.splitlines() if "[sft] resumed from" in line]
    assert len(resumed) == 1, log
    at = int(resumed[0].rsplit(" ", 1)[1])
    assert 2 <= run.signalled_at <= at < LONG, (run.signalled_at, at)  # stopped mid-run, not redone
    got = losses(run.out("preempted", "slurm"))
    worst = assert_same_losses(got, run.reference["preempted"], LONG)
    print(f"preempted: stopped and resumed at step {at}; max rel loss diff vs uninterrupted {worst:.2e}")
    assert (run.out("preempted", "slurm") / "final").is_dir()
