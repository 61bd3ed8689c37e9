"""One line that says which rank of a multi-process job failed and why, printed before torchrun's summary.

A rank that raises says so itself. A rank killed by a signal (kill -9, the out-of-memory killer) cannot:
the ranks left behind see only a broken collective, so the first of them on the node looks for its sibling
processes (same job, by their RANK environment variable in /proc) and names the ones that are gone.
No torch import.
"""

from __future__ import annotations

import os
from pathlib import Path


def describe(error: BaseException) -> str:
    """The line for `error` raised on this rank: its own failure, or another rank's death ("" when another
    rank on this node reports it)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    alive = _local_ranks_alive()
    gone = sorted(r for r in _local_ranks() if r != rank and r not in alive)
    first = str(error).splitlines()[0] if str(error) else ""
    if not gone:
        return f"[sft] rank {rank} of {world} failed: {type(error).__name__}: {first}"
    if rank != min(alive | {rank}):
        return ""  # the first rank left on this node speaks for all of them
    names = ", ".join(f"rank {r}" for r in gone)
    return (
        f"[sft] {names} of {world} stopped first (without a line of its own above: killed by a signal, e.g. "
        f"out of memory or kill -9); the others stop too (rank {rank}: {type(error).__name__})"
    )


# The kernel flags a task PF_EXITING first thing in its exit, before it closes its files: a rank killed by a
# signal is seen as gone by the time its peers' collectives break on its closed sockets.
_PF_EXITING = 0x4


def _job_key(environ: dict[str, str]) -> tuple[str, ...] | None:
    run_id = environ.get("TORCHELASTIC_RUN_ID")
    if run_id:
        return (run_id,)
    if "MASTER_PORT" in environ:
        return (environ.get("MASTER_ADDR", ""), environ["MASTER_PORT"])
    return None


def _local_ranks() -> set[int]:
    """The ranks this node should run (torchrun: LOCAL_WORLD_SIZE consecutive ranks from GROUP_RANK's)."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    first = rank - local_rank
    return set(range(first, first + local_world))


def _local_ranks_alive() -> set[int]:
    """Ranks of this job running on this node (processes not yet exited), from /proc; empty off Linux."""
    mine = _job_key(dict(os.environ))
    alive: set[int] = set()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            if stat[0] in "ZX" or int(stat[6]) & _PF_EXITING:
                continue  # exiting (its sockets close while it still runs) or exited, not yet reaped
            fields = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        env = dict(f.decode(errors="replace").partition("=")[::2] for f in fields if b"=" in f)
        if mine is not None and _job_key(env) == mine and env.get("RANK", "").isdigit():
            alive.add(int(env["RANK"]))
    return alive
