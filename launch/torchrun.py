"""Command lines for one process (`--backend local`) and for torchrun on one or several boxes without Slurm."""

from __future__ import annotations

import os

from launch.spec import JobSpec, check_common, local_gpu_count
from sft.errors import SftError

# torchrun as `python -m torch.distributed.run`: the same program as the `torchrun` script, but surely from
# the same environment as the Python that runs the ranks.
TORCHRUN = ["-m", "torch.distributed.run"]


def local_command(spec: JobSpec) -> list[str]:
    """One process, no torchrun: `python -m sft.cli train ...`."""
    check_common(spec)
    if spec.nodes != 1 or spec.procs_per_node != 1:
        raise SftError(
            f"launch.nodes={spec.nodes}, launch.procs_per_node={spec.procs_per_node}: --backend local runs one "
            "process; use --backend torchrun (one box or several) or slurm/submitit"
        )
    return [spec.python, *spec.entry]


def torchrun_command(spec: JobSpec, *, endpoint: str | None = None, rdzv_id: str | None = None) -> list[str]:
    """torchrun for this box: `--standalone` for one box, a c10d rendezvous at `endpoint` for several.

    Every box runs the same command: with the c10d rendezvous, node ranks are assigned as boxes join.
    """
    check_common(spec)
    if endpoint is None and spec.rdzv_endpoint is not None:
        endpoint = spec.rdzv_endpoint
        host, _, port = endpoint.rpartition(":")
        if not host or not port.isdigit() or any(c.isspace() for c in endpoint):
            raise SftError(f"launch.rdzv_endpoint {endpoint!r}: expected HOST:PORT, e.g. node001:29500")
    head = [spec.python, *TORCHRUN]
    if spec.nodes == 1 and endpoint is None:
        return [*head, "--standalone", "--nnodes=1", f"--nproc_per_node={spec.procs_per_node}", *spec.entry]
    if endpoint is None:
        raise SftError(
            f"launch.nodes={spec.nodes} with --backend torchrun needs launch.rdzv_endpoint=HOST:PORT "
            "(the first box, reachable from the others); or use --backend slurm"
        )
    return [
        *head,
        f"--nnodes={spec.nodes}",
        f"--nproc_per_node={spec.procs_per_node}",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint={endpoint}",
        f"--rdzv_id={rdzv_id or spec.rdzv_id}",
        "--max_restarts=0",
        *spec.entry,
    ]


def check_local_capacity(spec: JobSpec) -> None:
    """More processes than this box has GPUs (or CPUs, on a box without GPUs) is a mistake, not a plan."""
    gpus = local_gpu_count()
    if gpus:
        if spec.procs_per_node > gpus:
            raise SftError(
                f"launch.procs_per_node={spec.procs_per_node} but this machine has {gpus} GPU(s); "
                "one process per GPU: lower launch.procs_per_node"
            )
        return
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if spec.procs_per_node > cpus:
        raise SftError(
            f"launch.procs_per_node={spec.procs_per_node} but this machine has no GPU and {cpus} CPU core(s); "
            "lower launch.procs_per_node"
        )
