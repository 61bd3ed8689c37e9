"""Test payload that torchrun runs on every rank inside the Slurm tests, in place of the trainer.

    slurm_payload.py OUT_DIR MODE     MODE: allreduce | wait

Every rank joins a gloo process group (the rendezvous under test) and all-reduces rank + 1, then writes
OUT_DIR/run<restart>-rank<rank>.json. In `wait` mode, a first run (SLURM_RESTART_COUNT unset or 0) then
behaves like the trainer on preemption: it waits for USR1/TERM, takes part in a collective "checkpoint"
(a barrier) and exits 99; a requeued run finishes normally.
"""

import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

out, mode = Path(sys.argv[1]), sys.argv[2]
got: list[str] = []


def on_signal(signum, frame):
    got.append(signal.Signals(signum).name)


signal.signal(signal.SIGUSR1, on_signal)
signal.signal(signal.SIGTERM, on_signal)

import torch  # noqa: E402  (after the handlers: a signal during the slow import must not be lost)
import torch.distributed as dist  # noqa: E402

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
value = torch.tensor([float(rank + 1)])
dist.all_reduce(value)
restart = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
record = {
    "rank": rank,
    "world": world,
    "local_rank": int(os.environ["LOCAL_RANK"]),
    "sum": value.item(),
    "restart": restart,
    "node": os.environ.get("SLURMD_NODENAME"),
    "job": os.environ.get("SLURM_JOB_ID"),
    "host": socket.gethostname(),
    "env_probe": os.environ.get("SFT_TEST_PROBE"),
}
out.mkdir(parents=True, exist_ok=True)

if mode == "wait" and restart == 0:
    dist.barrier()
    if rank == 0:
        (out / "ready").write_text(str(os.getpid()))
    deadline = time.monotonic() + 150
    while not got and time.monotonic() < deadline:
        time.sleep(0.1)
    dist.barrier()  # the collective checkpoint every rank takes part in
    record["signals"] = got
    (out / f"run{restart}-rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()
    sys.exit(99 if got else 3)

record["signals"] = got
(out / f"run{restart}-rank{rank}.json").write_text(json.dumps(record))
dist.destroy_process_group()
