"""The job spec: everything a backend needs to run one recipe, taken from the recipe's `launch:` section.

Validation here is about the *launcher's* inputs (what will end up in a command line or an sbatch script);
the recipe itself is already validated by `sft.config`. Values that reach a shell are quoted where they are
rendered; values that reach `#SBATCH` lines cannot be quoted, so they are checked here instead.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from sft.config import Recipe
from sft.errors import SftError

# The rendezvous port of a Slurm job is derived from its job id, so that every node computes the same port
# without talking to the others, and two jobs sharing a node rarely collide. The range stays below Linux's
# ephemeral ports (32768+), which outgoing connections use.
PORT_BASE = 10000
PORT_SPAN = 20000

# Options that the launcher writes itself: a user's `sbatch_extra` line may not set them a second time
# (sbatch would take the last one, and what we print about logs and sizes would be wrong).
RESERVED_SBATCH = {
    "job-name": "launch.job_name",
    "J": "launch.job_name",
    "nodes": "launch.nodes",
    "N": "launch.nodes",
    "ntasks": "launch.nodes (one task per node)",
    "n": "launch.nodes (one task per node)",
    "ntasks-per-node": "launch.nodes (one task per node)",
    "partition": "launch.partition",
    "p": "launch.partition",
    "account": "launch.account",
    "A": "launch.account",
    "qos": "launch.qos",
    "q": "launch.qos",
    "time": "launch.time",
    "t": "launch.time",
    "cpus-per-task": "launch.cpus_per_task",
    "c": "launch.cpus_per_task",
    "mem": "launch.mem",
    "gpus-per-node": "launch.gpus_per_node",
    "output": "the launcher (logs go to <output_dir>/slurm)",
    "o": "the launcher (logs go to <output_dir>/slurm)",
    "error": "the launcher (logs go to <output_dir>/slurm)",
    "e": "the launcher (logs go to <output_dir>/slurm)",
    "chdir": "the launcher (the job runs where `sft launch` ran)",
    "D": "the launcher (the job runs where `sft launch` ran)",
    "signal": "launch.signal_seconds",
    "requeue": "launch.requeue",
    "no-requeue": "launch.requeue",
    "open-mode": "the launcher",
}

_NAME = re.compile(r"[A-Za-z0-9_.+-]+")  # job names
_SLURM_WORD = re.compile(r"[A-Za-z0-9_.,+@-]+")  # partition / account / qos (comma lists allowed)
_MEM = re.compile(r"(\d+)([KMGT]?)")
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_EXTRA = re.compile(r"--?([A-Za-z][A-Za-z0-9-]*)(=.*|\s.*)?")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Paths that go into #SBATCH lines: sbatch splits on blanks, expands %-patterns and does not run a shell.
_SBATCH_PATH = re.compile(r"[A-Za-z0-9_./+,@:=~-]+")
_TIME_FORMATS = [
    re.compile(r"(?P<m>\d+)"),
    re.compile(r"(?P<m>\d+):(?P<s>\d+)"),
    re.compile(r"(?P<h>\d+):(?P<m>\d+):(?P<s>\d+)"),
    re.compile(r"(?P<d>\d+)-(?P<h>\d+)"),
    re.compile(r"(?P<d>\d+)-(?P<h>\d+):(?P<m>\d+)"),
    re.compile(r"(?P<d>\d+)-(?P<h>\d+):(?P<m>\d+):(?P<s>\d+)"),
]


@dataclass
class JobSpec:
    """One training job: what every rank runs, and how many of them where."""

    name: str
    entry: list[str]
    """What each rank runs after `python`: `-m sft.cli train RECIPE [overrides...] resume=auto`."""
    output_dir: Path
    workdir: Path
    python: str = sys.executable
    nodes: int = 1
    procs_per_node: int = 1
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | None = None
    cpus_per_task: int | None = None
    mem: str | None = None
    gpus_per_node: int | None = None
    sbatch_extra: list[str] = field(default_factory=list)
    setup: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    signal_seconds: int = 90
    requeue: bool = True
    rdzv_endpoint: str | None = None
    wandb: str = ""
    """One line about the W&B run, for the 'how to follow' message."""

    @property
    def log_dir(self) -> Path:
        return self.output_dir / "slurm"

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node

    @property
    def rdzv_id(self) -> str:
        """A stable id for torchrun across boxes without Slurm: the same output folder, the same id."""
        return "sft-" + hashlib.sha1(str(self.output_dir).encode()).hexdigest()[:10]


def rdzv_port(job_id: int) -> int:
    """The c10d rendezvous port of a Slurm job (the sbatch template computes the same in bash)."""
    return PORT_BASE + job_id % PORT_SPAN


def trainer_entry(recipe_path: str | Path | None, overrides: list[str], force: bool = False) -> list[str]:
    """The trainer's command line. `resume=auto` always: a requeued job continues from its checkpoint (and
    a first start, with no checkpoint yet, starts at step 0)."""
    args = ["-m", "sft.cli", "train"]
    if recipe_path is not None:
        args.append(str(Path(recipe_path).resolve()))
    return [*args, *overrides, "resume=auto", *(["--force"] if force else [])]


def job_spec(
    recipe: Recipe, recipe_path: str | Path | None, overrides: list[str], force: bool = False
) -> JobSpec:
    """The job spec of a validated recipe, as run from the current folder."""
    launch = recipe.launch
    output_dir = Path(recipe.output_dir).resolve()
    name = launch.job_name or default_job_name(output_dir)
    wb = recipe.logging.wandb
    wandb = (
        "off"
        if wb.mode == "disabled"
        else f"project '{wb.project}'" + (f", run '{wb.name}'" if wb.name else "")
    )
    if wb.mode == "offline":
        wandb += " (offline: `wandb sync` the run folder afterwards)"
    return JobSpec(
        name=name,
        entry=trainer_entry(recipe_path, list(overrides), force),
        output_dir=output_dir,
        workdir=Path.cwd(),
        python=launch.python or sys.executable,
        nodes=launch.nodes,
        procs_per_node=launch.procs_per_node,
        partition=launch.partition,
        account=launch.account,
        qos=launch.qos,
        time=launch.time,
        cpus_per_task=launch.cpus_per_task,
        mem=launch.mem,
        gpus_per_node=launch.gpus_per_node,
        sbatch_extra=list(launch.sbatch_extra),
        setup=list(launch.setup),
        env=dict(launch.env),
        signal_seconds=launch.signal_seconds,
        requeue=launch.requeue,
        rdzv_endpoint=launch.rdzv_endpoint,
        wandb=wandb,
    )


def default_job_name(output_dir: Path) -> str:
    tail = re.sub(r"[^A-Za-z0-9_.+-]+", "-", output_dir.name).strip("-.") or "run"
    return f"sft-{tail}"[:64]


# ---------------------------------------------------------------- checks


def check_common(spec: JobSpec) -> None:
    """Checks for every backend: values that reach an environment or a command line."""
    for key in spec.env:
        if not _ENV_KEY.fullmatch(key):
            raise SftError(
                f"launch.env: '{key}' is not a valid environment variable name (letters, digits, _)"
            )
    for key, value in spec.env.items():
        if "\x00" in value:
            raise SftError(f"launch.env.{key}: the value contains a NUL byte")
    for i, line in enumerate(spec.setup):
        if _CONTROL.search(line.replace("\t", " ")):
            raise SftError(
                f"launch.setup[{i}]: one shell command per list item, without newlines or control characters"
            )


def check_slurm(spec: JobSpec) -> None:
    """Checks for the Slurm backends (sbatch, submitit): values that end up in #SBATCH lines."""
    check_common(spec)
    if not _NAME.fullmatch(spec.name) or len(spec.name) > 64:
        raise SftError(f"launch.job_name {spec.name!r}: use up to 64 letters, digits and . _ + -")
    for key in ("partition", "account", "qos"):
        value = getattr(spec, key)
        if value is not None and not _SLURM_WORD.fullmatch(value):
            raise SftError(
                f"launch.{key} {value!r}: a Slurm name is letters, digits and . _ + @ - (comma-separated for a list)"
            )
    if spec.time is not None:
        minutes = time_minutes(spec.time)
        if spec.signal_seconds >= minutes * 60:
            raise SftError(
                f"launch.signal_seconds={spec.signal_seconds} is not shorter than launch.time={spec.time}: "
                "the stop signal must come before the time limit"
            )
    if spec.mem is not None:
        mem_megabytes(spec.mem)
    if spec.gpus_per_node and spec.procs_per_node > spec.gpus_per_node:
        raise SftError(
            f"launch.procs_per_node={spec.procs_per_node} is more than launch.gpus_per_node={spec.gpus_per_node}: "
            "one process per GPU"
        )
    for path, what in ((spec.log_dir, "output_dir"), (spec.workdir, "the current folder")):
        if not _SBATCH_PATH.fullmatch(str(path)):
            raise SftError(
                f"{what} {str(path)!r} has characters that an #SBATCH line cannot carry (blanks, quotes, %, $, ...); "
                "use a plainer path"
            )
    for line in spec.sbatch_extra:
        sbatch_extra_option(line)


def sbatch_extra_option(line: str) -> tuple[str, str | None]:
    """Check one `launch.sbatch_extra` line and return (option, value); `#SBATCH ` in front is optional."""
    text = line.strip()
    if text.startswith("#SBATCH"):
        text = text[len("#SBATCH") :].strip()
    if _CONTROL.search(line.replace("\t", " ")):
        raise SftError(f"launch.sbatch_extra {line!r}: newlines and control characters are not allowed")
    m = _EXTRA.fullmatch(text)
    if not m:
        raise SftError(f"launch.sbatch_extra {line!r}: expected one sbatch option, e.g. --constraint=a100")
    option = m.group(1)
    if option in RESERVED_SBATCH:
        dash = "-" if len(option) == 1 else "--"
        raise SftError(f"launch.sbatch_extra {line!r}: {dash}{option} is set by {RESERVED_SBATCH[option]}")
    value = m.group(2)
    return option, (value[1:].strip() if value else None)


def time_minutes(text: str) -> int:
    """Slurm's time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) in whole minutes, rounded up."""
    for pattern in _TIME_FORMATS:
        m = pattern.fullmatch(text.strip())
        if m:
            parts = {k: int(v) for k, v in m.groupdict().items() if v is not None}
            seconds = (
                parts.get("d", 0) * 86400
                + parts.get("h", 0) * 3600
                + parts.get("m", 0) * 60
                + parts.get("s", 0)
            )
            if seconds <= 0:
                break
            return -(-seconds // 60)
    raise SftError(f"launch.time {text!r}: use a Slurm time such as 90, 04:00:00 or 2-00:00:00")


def mem_megabytes(text: str) -> int:
    m = _MEM.fullmatch(text.strip())
    if not m:
        raise SftError(f"launch.mem {text!r}: use a Slurm size such as 64G or 500M (0: all of the node)")
    scale = {"": 1, "K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}[m.group(2)]
    return int(int(m.group(1)) * scale)


def local_gpu_count() -> int:
    """GPUs this process may use, without importing torch (CUDA_VISIBLE_DEVICES, else the NVIDIA driver)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    gpus = Path("/proc/driver/nvidia/gpus")
    return len(list(gpus.iterdir())) if gpus.is_dir() else 0
