"""submitit: the same job spec through `submitit.AutoExecutor`, one task per node, each running torchrun.

Preemption and time limits: submitit asks Slurm for USR2 some seconds before the time limit, sent to every
process of the job. torchrun and the ranks ignore USR2 (set before torchrun starts); the task process passes
USR1 (the trainer's signal) to its node's ranks, which save and exit; then, on the first node, submitit calls
`checkpoint()` and requeues the job. The requeued job runs the same command with `resume=auto`, so it
continues from the latest checkpoint. TERM (preemption) reaches the ranks directly, and Slurm requeues.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path
from types import FrameType
from typing import Any

import submitit
from submitit.helpers import Checkpointable, DelayedSubmission

from launch.slurm import check_cluster, extra_parameters, require_slurm
from launch.spec import JobSpec, check_slurm, rdzv_port, time_minutes
from launch.torchrun import torchrun_command
from sft.errors import SftError
from sft.run_folder import claim

STOP_WAIT_SECONDS = 300  # how long a node that is not the first waits for the requeue to end it


def _children(pid: int) -> list[int]:
    """Direct children of `pid` (torchrun's ranks), from /proc."""
    kids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The fields after the command name (which may hold blanks and parentheses): state, ppid, ...
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 1 and fields[1] == str(pid):
            kids.append(int(entry.name))
    return kids


def _ignore_job_signals() -> None:
    # Runs in the child before torchrun starts: the signals that are not torchrun's business. The ranks
    # inherit this, and the trainer then installs its own USR1 handler.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


class TorchrunNode(Checkpointable):
    """What each task (one per node) of a submitit job runs: torchrun for that node's ranks."""

    def __init__(self, spec: JobSpec) -> None:
        self.spec = spec
        self._proc: subprocess.Popen[bytes] | None = None
        self._stop_signal: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"spec": self.spec}  # the running process does not travel to the requeued job

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["spec"])  # type: ignore[misc]

    def __call__(self) -> dict[str, Any]:
        env = submitit.JobEnvironment()
        job_id = int(os.environ["SLURM_JOB_ID"])
        endpoint = f"{env.hostnames[0]}:{rdzv_port(job_id)}"
        cmd = torchrun_command(self.spec, endpoint=endpoint, rdzv_id=str(job_id))
        print(
            f"sft: node {env.node}/{env.num_nodes} restart {os.environ.get('SLURM_RESTART_COUNT', '0')}: "
            f"{' '.join(cmd)}",
            flush=True,
        )
        self._proc = subprocess.Popen(
            cmd, cwd=self.spec.workdir, env={**os.environ, **self.spec.env}, preexec_fn=_ignore_job_signals
        )
        # submitit installed its handler for its signal before calling us. On the signal, pass USR1 to the
        # ranks at once; submitit's part (checkpoint() and requeue, on the first node) waits until torchrun
        # has exited, outside the signal handler.
        usr_sig = env._usr_sig()
        submitit_handler = signal.getsignal(usr_sig)

        def on_signal(signum: int, frame: FrameType | None) -> None:
            self._stop_signal = signum
            self._signal_ranks()

        signal.signal(usr_sig, on_signal)
        rc = self._proc.wait()
        if rc != 0 and self._stop_signal is not None:
            if callable(submitit_handler):
                submitit_handler(self._stop_signal, None)  # the first node requeues and exits here
            # Other nodes: the requeue ends this task; if it does not come, fail rather than hang.
            time.sleep(STOP_WAIT_SECONDS)
            raise RuntimeError(
                f"torchrun on {env.hostname} stopped on a signal, but the job was not requeued"
            )
        if rc != 0:
            raise RuntimeError(f"torchrun on {env.hostname} exited with code {rc}; see this task's log")
        return {"node": env.node, "hostname": env.hostname, "returncode": rc}

    def _signal_ranks(self) -> None:
        if self._proc is None:
            return
        for pid in _children(self._proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGUSR1)

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission:
        """Called by submitit on the first node once the ranks have saved and stopped: requeue the same job
        (a fresh one: the finished process does not travel)."""
        return DelayedSubmission(TorchrunNode(self.spec))


def executor_parameters(spec: JobSpec) -> dict[str, Any]:
    """The spec as `AutoExecutor.update_parameters(...)` keywords (checked; nothing is created)."""
    check_slurm(spec)
    if spec.time is None:
        raise SftError(
            "--backend submitit needs launch.time (submitit always sets a time limit), e.g. 04:00:00"
        )
    extra: dict[str, Any] = extra_parameters(spec)
    extra["requeue" if spec.requeue else "no_requeue"] = True
    params: dict[str, Any] = {
        "name": spec.name,
        "nodes": spec.nodes,
        "tasks_per_node": 1,
        "timeout_min": time_minutes(spec.time),
        "slurm_signal_delay_s": spec.signal_seconds,
        "slurm_setup": list(spec.setup),
        "slurm_additional_parameters": extra,
    }
    if spec.cpus_per_task:
        params["cpus_per_task"] = spec.cpus_per_task
        # Since Slurm 22.05 srun does not take --cpus-per-task from the job: pass it on.
        params["slurm_srun_args"] = [f"--cpus-per-task={spec.cpus_per_task}"]
    if spec.gpus_per_node:
        params["gpus_per_node"] = spec.gpus_per_node
    for key in ("partition", "account", "qos", "mem"):
        if getattr(spec, key):
            params[f"slurm_{key}"] = getattr(spec, key)
    return params


def make_executor(spec: JobSpec) -> submitit.AutoExecutor:
    params = executor_parameters(spec)
    # max_num_timeout: a long training run goes through many time limits, each one a requeue.
    executor = submitit.AutoExecutor(
        folder=spec.output_dir / "submitit",
        cluster="slurm",
        slurm_max_num_timeout=1000,
        slurm_python=spec.python,
    )
    executor.update_parameters(**params)
    return executor


def submit_submitit(spec: JobSpec) -> submitit.Job:
    """Check against the cluster, then submit one task per node."""
    executor_parameters(spec)  # validate before asking the cluster anything
    require_slurm()
    check_cluster(spec)
    claim(spec.output_dir)  # the run folder is sft's from here: the trainer may write into it
    return make_executor(spec).submit(TorchrunNode(spec))
