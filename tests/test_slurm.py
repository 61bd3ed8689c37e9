"""The launcher on a real Slurm cluster: two emulated nodes on this machine (slurm/local_cluster.sh).

Each job is rendered and submitted by the launcher exactly as `sft launch` does, with a test payload
(tests/slurm_payload.py) in place of the trainer: a gloo all_reduce across the nodes through the
srun -> torchrun -> c10d rendezvous path, and the trainer's side of the preemption contract (exit 99).
The three main jobs are submitted together at the start, so that they run side by side.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from launch import add_launch_arguments, run_launch
from launch.slurm import log_path, partitions, submit_sbatch
from launch.spec import JobSpec
from launch.submitit_job import submit_submitit
from sft.errors import SftError

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "slurm" / "local_cluster.sh"
PAYLOAD = REPO / "tests" / "slurm_payload.py"
WAIT = 240  # seconds for one job on a busy 2-core machine
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


@pytest.fixture(scope="session")
def cluster() -> Iterator[None]:
    """Start the local cluster (idempotent; installs Slurm on a fresh machine); stop it only if we started it."""
    was_up = subprocess.run([CLUSTER, "status"], capture_output=True).returncode == 0
    subprocess.run([CLUSTER, "start"], check=True, timeout=600)
    yield
    if not was_up:
        subprocess.run([CLUSTER, "stop"], check=False, timeout=120)


def payload_spec(out: Path, mode: str, **kw: Any) -> JobSpec:
    kw = {"name": f"t-{mode}", "nodes": 2, "procs_per_node": 1, **kw}
    return JobSpec(entry=[str(PAYLOAD), str(out / "res"), mode], output_dir=out, workdir=REPO, **kw)


def job_info(job_id: str) -> dict[str, str]:
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, check=True
    )
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout))


def wait_ended(job_id: str, timeout: float = WAIT) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        info = job_info(job_id)
        if info["JobState"] in ENDED:
            return info
        assert time.monotonic() < deadline, f"job {job_id} still {info['JobState']} after {timeout} s"
        time.sleep(1)


def wait_for(path: Path, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(0.2)


def records(out: Path, run: int) -> list[dict[str, Any]]:
    files = sorted((out / "res").glob(f"run{run}-rank*.json"))
    return [json.loads(f.read_text()) for f in files]


@dataclass
class Jobs:
    allreduce: str
    allreduce_out: Path
    marker: Path
    probe: str
    signal: str
    signal_out: Path
    submitit: Any
    submitit_out: Path


@pytest.fixture(scope="session")
def jobs(cluster: None, tmp_path_factory: pytest.TempPathFactory) -> Jobs:
    root = tmp_path_factory.mktemp("slurm")
    marker = root / "PWNED"
    probe = f"it's $(touch {marker}) `touch {marker}`; touch {marker}\nsecond line"
    a_out, s_out, m_out = root / "allreduce", root / "signal", root / "submitit"
    allreduce, _ = submit_sbatch(payload_spec(a_out, "allreduce", env={"SFT_TEST_PROBE": probe}))
    signal_job, _ = submit_sbatch(payload_spec(s_out, "wait"))
    sub = submit_submitit(payload_spec(m_out, "wait", name="t-submitit", time="10"))
    # Stop both waiting jobs as soon as their ranks are up, so that the requeues overlap.
    # The batch shell's signal: what Slurm sends N seconds before the time limit (--signal=B:USR1@N).
    wait_for(s_out / "res" / "ready")
    subprocess.run(["scancel", "--signal=USR1", "--batch", signal_job], check=True)
    # submitit's time-limit signal, USR2, to every process of the job.
    wait_for(m_out / "res" / "ready")
    subprocess.run(["scancel", "--signal=USR2", sub.job_id], check=True)
    return Jobs(allreduce, a_out, marker, probe, signal_job, s_out, sub, m_out)


def test_cluster_has_two_nodes_and_a_preempting_partition(cluster: None) -> None:
    out = subprocess.run(["sinfo", "-h", "-N", "-p", "debug", "-o", "%N %T"], capture_output=True, text=True)
    nodes = dict(line.split() for line in out.stdout.splitlines())
    assert sorted(nodes) == ["node1", "node2"]
    assert all(state in ("idle", "mixed", "allocated") for state in nodes.values()), nodes
    parts = partitions()
    assert parts["debug"].default and parts["debug"].nodes == 2 and parts["debug"].cpus == 4
    assert "urgent" in parts


def test_two_node_allreduce_through_srun_and_torchrun(jobs: Jobs) -> None:
    info = wait_ended(jobs.allreduce)
    log = log_path(payload_spec(jobs.allreduce_out, "allreduce"), jobs.allreduce)
    assert info["JobState"] == "COMPLETED", log.read_text()
    ranks = records(jobs.allreduce_out, 0)
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["world"] == 2 and r["sum"] == 3.0 and r["local_rank"] == 0 for r in ranks)
    assert sorted(r["node"] for r in ranks) == ["node1", "node2"]  # one rank on each node
    # A recipe value full of shell syntax reached the ranks as written, and none of it ran.
    assert all(r["env_probe"] == jobs.probe for r in ranks)
    assert not jobs.marker.exists()
    assert f"rendezvous node1:{10000 + int(jobs.allreduce) % 20000}" in log.read_text()


def test_usr1_checkpoints_requeues_and_resumes(jobs: Jobs) -> None:
    # The fixture sent USR1 to the batch shell once the ranks were up.
    info = wait_ended(jobs.signal)
    log = log_path(payload_spec(jobs.signal_out, "wait"), jobs.signal).read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log
    first, second = records(jobs.signal_out, 0), records(jobs.signal_out, 1)
    assert [r["signals"] for r in first] == [["SIGUSR1"], ["SIGUSR1"]]  # every rank, exactly once
    assert [(r["restart"], r["sum"]) for r in second] == [(1, 3.0), (1, 3.0)]  # rendezvous again, same port
    assert f"requeueing job {jobs.signal}" in log and "restart 1" in log


def test_submitit_same_job_requeued_then_results(jobs: Jobs) -> None:
    # The fixture sent USR2 (submitit's signal) once the ranks were up.
    results = jobs.submitit.results()  # one per task (node)
    assert sorted(r["node"] for r in results) == [0, 1] and all(r["returncode"] == 0 for r in results)
    assert [r["signals"] for r in records(jobs.submitit_out, 0)] == [["SIGUSR1"], ["SIGUSR1"]]
    assert [(r["restart"], r["sum"]) for r in records(jobs.submitit_out, 1)] == [(1, 3.0), (1, 3.0)]
    assert job_info(jobs.submitit.job_id)["Restarts"] == "1"


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"partition": "nosuch"},
            "launch.partition 'nosuch' is not a partition of this cluster; partitions: debug, urgent",
        ),
        ({"nodes": 3}, "launch.nodes=3 but partition 'debug' has 2 node(s)"),
        ({"gpus_per_node": 1}, "launch.gpus_per_node=1 but partition 'debug' has no GPUs"),
        ({"cpus_per_task": 64}, "launch.cpus_per_task=64"),
        ({"procs_per_node": 8}, "launch.procs_per_node=8 but the nodes of partition 'debug' have 4 CPUs"),
        ({"mem": "64G"}, "launch.mem=64G but the nodes of partition 'debug' have 4000M"),
    ],
)
def test_bad_requests_fail_before_submission(
    cluster: None, tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    spec = payload_spec(tmp_path, "allreduce", name="t-refused", **change)
    for submit in (submit_sbatch, submit_submitit):
        if submit is submit_submitit:
            spec.time = "10"
        with pytest.raises(SftError, match=re.escape(message)):
            submit(spec)
    queued = subprocess.run(["squeue", "-h", "-n", "t-refused"], capture_output=True, text=True).stdout
    assert queued == ""
    assert not (tmp_path / "slurm").exists() and not (tmp_path / "submitit").exists()


def test_sft_launch_submits_and_says_how_to_follow(
    cluster: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"output_dir: {tmp_path / 'run'}\nlaunch: {{nodes: 2, job_name: t-follow}}\n")
    parser = argparse.ArgumentParser()
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    add_launch_arguments(parser)
    # Held: submitted but never started (the trainer is not what this test is about).
    args = parser.parse_args([str(recipe), "launch.sbatch_extra=['--hold']", "--backend", "slurm"])
    assert run_launch(args) == 0
    out = capsys.readouterr().out
    job_id = re.search(r"submitted Slurm job (\d+)", out)
    assert job_id, out
    try:
        log = tmp_path / "run" / "slurm" / f"t-follow-{job_id.group(1)}.out"
        assert f"tail -f {log}" in out and f"squeue -j {job_id.group(1)}" in out
        info = job_info(job_id.group(1))
        assert info["JobState"] == "PENDING" and info["NumNodes"].startswith("2") and info["Requeue"] == "1"
        script = (tmp_path / "run" / "slurm" / "t-follow.sbatch").read_text()
        trainer = [
            "-m",
            "sft.cli",
            "train",
            str(recipe.resolve()),
            "launch.sbatch_extra=['--hold']",
            "resume=auto",
        ]
        assert shlex.join(trainer) + " &" in script
    finally:
        subprocess.run(["scancel", job_id.group(1)], check=False)


def test_preemption_by_a_higher_partition_requeues_and_resumes(jobs: Jobs, tmp_path: Path) -> None:
    # Alone on the cluster: the urgent job would preempt any job of the default partition.
    for job in (jobs.allreduce, jobs.signal, jobs.submitit.job_id):
        if job_info(job)["JobState"] not in ENDED:
            subprocess.run(["scancel", job], check=False)
            wait_ended(job, 60)
    job, _ = submit_sbatch(payload_spec(tmp_path, "wait", name="t-preempted"))
    wait_for(tmp_path / "res" / "ready")
    urgent = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "-p",
            "urgent",
            "-N",
            "2",
            "--exclusive",
            "-o",
            "/dev/null",
            "--wrap",
            "sleep 2",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    info = wait_ended(job)
    log = log_path(payload_spec(tmp_path, "wait", name="t-preempted"), job).read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log
    assert "DUE TO PREEMPTION" in log
    assert job_info(urgent)["JobState"] == "COMPLETED"
    assert all("SIGTERM" in r["signals"] for r in records(tmp_path, 0))  # every rank saw TERM and saved
    assert [(r["restart"], r["sum"]) for r in records(tmp_path, 1)] == [(1, 3.0), (1, 3.0)]
