"""Slurm: render the sbatch script from `slurm/torchrun.sbatch`, check the request against the cluster, submit.

The job runs one srun task per node; each task runs torchrun, which starts the node's ranks and meets the
other nodes through a c10d rendezvous on the first node of the allocation.
"""

from __future__ import annotations

import re
import shlex
import shutil
import string
import subprocess
from dataclasses import dataclass
from pathlib import Path

from launch.spec import PORT_BASE, PORT_SPAN, JobSpec, check_slurm, mem_megabytes, sbatch_extra_option
from sft.errors import SftError
from sft.run_folder import claim

# Package data (shipped in the wheel); the repository's slurm/torchrun.sbatch is a link to it.
TEMPLATE = Path(__file__).resolve().parent / "torchrun.sbatch"
SRUN_WAIT_SECONDS = 120


class _Template(string.Template):
    """`@{name}` placeholders, so that the shell's own `$VAR` and `${VAR}` stay as they are."""

    delimiter = "@"
    pattern = r"@(?:(?P<escaped>@)|\{(?P<braced>[a-z_]+)\}|(?P<named>(?!))|(?P<invalid>(?!)))"  # type: ignore[assignment]


def sbatch_lines(spec: JobSpec) -> list[str]:
    """The #SBATCH lines. Values were checked by `check_slurm` (no blanks, quotes or newlines)."""
    opts: list[str] = [
        f"--job-name={spec.name}",
        f"--nodes={spec.nodes}",
        "--ntasks-per-node=1",
    ]
    if spec.cpus_per_task:
        opts.append(f"--cpus-per-task={spec.cpus_per_task}")
    if spec.gpus_per_node:
        opts.append(f"--gpus-per-node={spec.gpus_per_node}")
    if spec.mem:
        opts.append(f"--mem={spec.mem}")
    for key in ("partition", "account", "qos", "time"):
        value = getattr(spec, key)
        if value:
            opts.append(f"--{key}={value}")
    opts += [
        f"--output={spec.log_dir}/%x-%j.out",
        "--open-mode=append",  # a requeued job appends to the same log
        f"--chdir={spec.workdir}",
        f"--signal=B:USR1@{spec.signal_seconds}",
        "--requeue" if spec.requeue else "--no-requeue",
    ]
    opts += [line.strip().removeprefix("#SBATCH").strip() for line in spec.sbatch_extra]
    return [f"#SBATCH {o}" for o in opts]


def render_sbatch(spec: JobSpec, template: Path = TEMPLATE) -> str:
    """The sbatch script for `spec`. Everything that comes from the recipe is shell-quoted, except
    `launch.setup`, which is shell code by design (module loads, venv activation)."""
    check_slurm(spec)
    srun_options = f" --cpus-per-task={spec.cpus_per_task}" if spec.cpus_per_task else ""
    exports = [f"export {k}={shlex.quote(v)}" for k, v in spec.env.items()]
    values = {
        "job_name": spec.name,
        "sbatch_lines": "\n".join(sbatch_lines(spec)),
        "setup": "\n".join(spec.setup) if spec.setup else "# (none)",
        "env": "\n".join(exports) if exports else "# (none)",
        "port_base": str(PORT_BASE),
        "port_span": str(PORT_SPAN),
        "nodes": str(spec.nodes),
        "procs_per_node": str(spec.procs_per_node),
        "srun_options": srun_options,
        "srun_wait": str(SRUN_WAIT_SECONDS),
        "python": shlex.quote(spec.python),
        "entry": shlex.join(spec.entry),
        "requeue": "1" if spec.requeue else "0",
    }
    if not template.is_file():
        raise SftError(
            f"sbatch template {template} not found: run sft from its source folder (slurm/ is not packaged)"
        )
    try:
        return _Template(template.read_text()).substitute(values)
    except (KeyError, ValueError) as e:
        raise SftError(f"{template}: bad placeholder {e}") from None


def script_path(spec: JobSpec) -> Path:
    return spec.log_dir / f"{spec.name}.sbatch"


def log_path(spec: JobSpec, job_id: str) -> Path:
    return spec.log_dir / f"{spec.name}-{job_id}.out"


def write_sbatch(spec: JobSpec) -> Path:
    path = script_path(spec)
    text = render_sbatch(spec)
    claim(spec.output_dir)  # the run folder is sft's from here: the trainer may write into it
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


# ---------------------------------------------------------------- the cluster


@dataclass
class Partition:
    name: str
    default: bool
    nodes: int
    cpus: int  # the most CPUs of one node
    gpus: int  # the most GPUs of one node
    mem_mb: int  # the most memory of one node


def require_slurm() -> None:
    """Fail early and clearly on a machine without the Slurm client commands."""
    for command in ("sbatch", "sinfo"):
        if shutil.which(command) is None:
            raise SftError(
                f"`{command}` not found: the Slurm backends need a Slurm login node "
                "(for tests on one machine: slurm/local_cluster.sh start)"
            )


def _run(cmd: list[str]) -> str:
    require_slurm()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        err = (proc.stderr or proc.stdout).strip().splitlines()
        raise SftError(f"`{shlex.join(cmd)}` failed: {err[-1] if err else f'exit {proc.returncode}'}")
    return proc.stdout


def _gpus(gres: str) -> int:
    """GPUs per node from sinfo's GRES column: `gpu:8`, `gpu:a100:4(S:0-1)`, `(null)`."""
    total = 0
    for item in re.split(r",(?![^(]*\))", gres):
        parts = item.split("(")[0].split(":")
        if parts[0] == "gpu" and len(parts) >= 2 and parts[-1].isdigit():
            total += int(parts[-1])
    return total


def partitions() -> dict[str, Partition]:
    """The cluster's partitions, from `sinfo` (one line per partition and node configuration)."""
    found: dict[str, Partition] = {}
    for line in _run(["sinfo", "--noheader", "--format=%P|%D|%c|%G|%m"]).splitlines():
        cols = line.strip().split("|")
        if len(cols) != 5:
            continue
        raw, nodes, cpus, gres, mem = cols
        name = raw.rstrip("*")
        p = found.setdefault(name, Partition(name, raw.endswith("*"), 0, 0, 0, 0))
        p.nodes += int(nodes) if nodes.isdigit() else 0
        p.cpus = max(p.cpus, int(re.sub(r"\D.*", "", cpus) or 0))
        p.gpus = max(p.gpus, _gpus(gres))
        p.mem_mb = max(p.mem_mb, int(re.sub(r"\D.*", "", mem) or 0))
    return found


def check_cluster(spec: JobSpec) -> Partition:
    """Compare the request with what the partition has, before anything is submitted."""
    known = partitions()
    if spec.partition:
        names = spec.partition.split(",")
        missing = [n for n in names if n not in known]
        if missing:
            raise SftError(
                f"launch.partition '{missing[0]}' is not a partition of this cluster; "
                f"partitions: {', '.join(sorted(known)) or 'none'}"
            )
        part = known[names[0]]
    else:
        defaults = [p for p in known.values() if p.default]
        if not defaults:
            raise SftError(
                f"this cluster has no default partition: set launch.partition (one of {', '.join(sorted(known))})"
            )
        part = defaults[0]
    if spec.nodes > part.nodes:
        raise SftError(f"launch.nodes={spec.nodes} but partition '{part.name}' has {part.nodes} node(s)")
    if spec.gpus_per_node and spec.gpus_per_node > part.gpus:
        has = f"{part.gpus} GPU(s) per node" if part.gpus else "no GPUs"
        raise SftError(f"launch.gpus_per_node={spec.gpus_per_node} but partition '{part.name}' has {has}")
    if part.cpus and (spec.cpus_per_task or 0) > part.cpus:
        raise SftError(
            f"launch.cpus_per_task={spec.cpus_per_task} (CPUs for all processes of a node) but the nodes of "
            f"partition '{part.name}' have {part.cpus}"
        )
    if part.cpus and spec.procs_per_node > part.cpus:
        raise SftError(
            f"launch.procs_per_node={spec.procs_per_node} but the nodes of partition '{part.name}' have "
            f"{part.cpus} CPUs"
        )
    if spec.mem and part.mem_mb and mem_megabytes(spec.mem) > part.mem_mb:
        raise SftError(f"launch.mem={spec.mem} but the nodes of partition '{part.name}' have {part.mem_mb}M")
    return part


def submit_sbatch(spec: JobSpec) -> tuple[str, Path]:
    """Check, write the script, submit it; returns (job id, script path)."""
    render_sbatch(spec)  # validate before asking the cluster anything
    require_slurm()
    check_cluster(spec)
    path = write_sbatch(spec)
    out = _run(["sbatch", "--parsable", str(path)])
    job_id = out.strip().split(";")[0]
    if not job_id.isdigit():
        raise SftError(f"sbatch answered {out.strip()!r}, expected a job id")
    return job_id, path


def extra_parameters(spec: JobSpec) -> dict[str, str | bool]:
    """`launch.sbatch_extra` as submitit's `slurm_additional_parameters` (option -> value or True)."""
    params: dict[str, str | bool] = {}
    for line in spec.sbatch_extra:
        option, value = sbatch_extra_option(line)
        params[option.replace("-", "_")] = True if value is None else value
    return params
