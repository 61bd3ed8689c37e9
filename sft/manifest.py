"""The run manifest, `run.json` in the run folder (and in W&B's config): what ran, where, on what.

sft's version and git commit (when run from a checkout), the versions of the libraries that decide the
numbers, host names, world size, device names, the recipe's hash, each data source's content fingerprint
(what the tokenized-data cache keys on), the seed, and one entry per attempt (the first start and every
resume): when it started and ended, and how it ended (done, preempted, failed with which error).

`data_fingerprints` and `recipe_hash` are what a resume compares (sft/resume.py, issue 15); `changes` lists
what differs between two manifests. Rank 0 writes; every rank takes part in gathering hosts and devices.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import hashlib
import json
import os
import platform
import socket
import subprocess
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

from sft import publish
from sft.config import DataConfig, Recipe

MANIFEST = "run.json"
PACKAGES = (
    "sft",
    "torch",
    "transformers",
    "peft",
    "deepspeed",
    "bitsandbytes",
    "datasets",
    "accelerate",
    "wandb",
)
# Keys that say how to start a run, not what it computes: left out of the recipe's hash.
UNHASHED = ("resume", "overwrite", "launch", "logging")

F = TypeVar("F", bound=Callable[..., Any])


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def recipe_hash(recipe: Recipe) -> str:
    """sha256 of the recipe's values that decide the training (not resume/overwrite/launch/logging)."""
    values = recipe.model_dump(mode="json", exclude=set(UNHASHED))
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()


def data_fingerprints(data: DataConfig) -> dict[str, str | None]:
    """Each source's content fingerprint, keyed `train[0] PATH`: a hash of the files' bytes (the tokenized-data
    cache's content key); None for a hub data set read as a stream (hashing it would read it all)."""
    from sft.data.sources import open_source

    out: dict[str, str | None] = {}
    for split, specs in (("train", data.train), ("eval", data.eval)):
        for i, spec in enumerate(specs):
            src = open_source(spec)
            streamed_hub = src.kind == "hub" and data.streaming and split == "train"
            out[f"{split}[{i}] {spec.path}"] = None if streamed_hub else src.fingerprint()
    return out


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> dict[str, Any] | None:
    """The checkout sft runs from: commit and whether files differ from it; None outside a git checkout."""
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        status = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode != 0:
        return None
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}


def device_name(device: Any) -> str:
    if device.type == "cuda":
        import torch

        return str(torch.cuda.get_device_name(device))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return "CPU: " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU: " + (platform.processor() or platform.machine())


def slurm_job() -> dict[str, str] | None:
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    if not job:
        return None
    return {
        "job_id": job,
        "restart": os.environ.get("SLURM_RESTART_COUNT", "0"),
        "nodes": os.environ.get("SLURM_JOB_NODELIST", ""),
    }


def changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, list[Any]]:
    """What differs between two manifests in what decides the numbers: {key: [old, new]}."""
    out: dict[str, list[Any]] = {}
    if old.get("recipe_hash") != new.get("recipe_hash"):
        out["recipe_hash"] = [old.get("recipe_hash"), new.get("recipe_hash")]
    a, b = old.get("data", {}), new.get("data", {})
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            out[f"data: {key}"] = [a.get(key), b.get(key)]
    return out


class RunManifest:
    """run.json of one run folder; `start` at the beginning of an attempt, `finish` at its end (rank 0)."""

    current: RunManifest | None = None

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path = path
        self.data = data

    @classmethod
    def start(cls, recipe: Recipe, dist: Any, output_dir: Path, step: int) -> RunManifest:
        """Gather hosts and devices (every rank calls this), then rank 0 writes run.json."""
        mine = {"host": socket.gethostname(), "device": device_name(dist.device)}
        ranks = [mine]
        import torch.distributed as tdist

        if tdist.is_initialized() and dist.world_size > 1:
            ranks = [{} for _ in range(dist.world_size)]
            tdist.all_gather_object(ranks, mine)
        path = output_dir / MANIFEST
        previous = json.loads(path.read_text()) if path.is_file() and dist.is_main else {}
        data = {
            "git": git_commit(),
            "versions": versions(),
            "hosts": sorted({r["host"] for r in ranks}),
            "world_size": dist.world_size,
            "devices": [r["device"] for r in ranks],
            "recipe_hash": recipe_hash(recipe),
            "data": data_fingerprints(recipe.data) if dist.is_main else {},
            "seed": recipe.seed,
            "slurm": slurm_job(),
            "wandb": previous.get("wandb"),
        }
        attempt: dict[str, Any] = {"started": now(), "from_step": step, "status": "running"}
        if previous:
            attempt["changed"] = changes(previous, data)
        data["attempts"] = [*previous.get("attempts", []), attempt]
        manifest = cls(path, data)
        if dist.is_main:
            manifest.write()
            cls.current = manifest
        return manifest

    def update(self, **values: Any) -> None:
        self.data.update(values)
        if RunManifest.current is self:
            self.write()

    def finish(self, status: str, error: str | None = None, step: int | None = None) -> None:
        attempt = self.data["attempts"][-1]
        attempt.update(ended=now(), status=status)
        if error:
            attempt["error"] = error
        if step is not None:
            attempt["to_step"] = step
        self.write()

    def write(self) -> None:
        publish.write_text(self.path, json.dumps(self.data, indent=2) + "\n")


def records_outcome(train: F) -> F:
    """Decorator for the training entry: records in run.json how the attempt ended (done, preempted, failed
    with the error), whatever way it leaves, once run.json exists."""
    from sft.signals import Preempted

    @functools.wraps(train)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        RunManifest.current = None
        try:
            result = train(*args, **kwargs)
        except Preempted as e:
            _finish("preempted", step=e.args[0] if e.args else None)
            raise
        except BaseException as e:
            _finish("failed", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            raise
        _finish("done", step=result.get("steps") if isinstance(result, dict) else None)
        return result

    return wrapper  # type: ignore[return-value]


def _finish(status: str, error: str | None = None, step: int | None = None) -> None:
    manifest, RunManifest.current = RunManifest.current, None
    if manifest is not None:
        with contextlib.suppress(OSError):  # a full disk must not hide the run's own error
            manifest.finish(status, error, step)
