"""`sft launch RECIPE [key=value ...] --backend local|torchrun|slurm|submitit [--dry-run]`."""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

from launch.slurm import log_path, script_path, submit_sbatch, write_sbatch
from launch.spec import PORT_BASE, PORT_SPAN, JobSpec, job_spec
from launch.torchrun import check_local_capacity, local_command, torchrun_command
from sft.config import load_recipe
from sft.errors import SftError
from sft.run_folder import check_output_dir

BACKENDS = ("local", "torchrun", "slurm", "submitit")


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `sft launch` (the CLI adds the positional `recipe` and `overrides`)."""
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="local",
        help="local: one process here; torchrun: launch.procs_per_node processes here (several boxes: "
        "launch.rdzv_endpoint); slurm: an sbatch script from slurm/torchrun.sbatch; submitit: the same "
        "through submitit (default: local)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="start even when the memory plan says the recipe cannot fit (passed on to the trainer)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the command (local, torchrun, submitit) or write the sbatch script (slurm); submit nothing",
    )


def run_launch(args: argparse.Namespace) -> int:
    """Run `sft launch`; bad input raises SftError before anything starts or is submitted."""
    overrides = list(args.overrides or [])
    recipe = load_recipe(args.recipe, overrides)
    try:  # what every rank will load: the trainer runs with resume=auto
        resumable = load_recipe(args.recipe, [*overrides, "resume=auto"])
    except SftError as e:
        raise SftError(
            f"{e} (sft launch always runs the trainer with resume=auto, so that a requeued job "
            "continues from its checkpoint)"
        ) from None
    force = bool(getattr(args, "force", False))
    check_output_dir(
        resumable, [args.recipe] if args.recipe else []
    )  # before anything is written or submitted
    spec = job_spec(recipe, args.recipe, overrides, force=force)
    backend = args.backend
    if backend in ("local", "torchrun"):
        if not (args.dry_run or force):  # here the devices are known: stop before anything starts
            from sft.plan import check_fits

            check_fits(recipe, spec.world_size, local_ranks=spec.procs_per_node)
        return _run_here(spec, backend, args.dry_run)
    if backend == "slurm":
        return _slurm(spec, args.dry_run)
    return _submitit(spec, args.dry_run)


def _run_here(spec: JobSpec, backend: str, dry_run: bool) -> int:
    cmd = local_command(spec) if backend == "local" else torchrun_command(spec)
    env_line = " ".join(f"{k}={shlex.quote(v)}" for k, v in spec.env.items())
    shown = f"{env_line} {shlex.join(cmd)}" if env_line else shlex.join(cmd)
    if dry_run:
        print(shown)
        if spec.nodes > 1:
            print(f"# run this same command on each of the {spec.nodes} machines")
        return 0
    check_local_capacity(spec)
    if spec.setup:
        print("sft: note: launch.setup is for Slurm jobs; here, set up the environment yourself", flush=True)
    print(f"sft: {shown}", flush=True)
    if spec.nodes > 1:
        print(f"sft: run the same command on the other {spec.nodes - 1} machine(s)", flush=True)
    print(f"sft: output in {spec.output_dir}; W&B: {spec.wandb}", flush=True)
    return subprocess.call(cmd, cwd=spec.workdir, env={**os.environ, **spec.env})


def _slurm(spec: JobSpec, dry_run: bool) -> int:
    if dry_run:
        path = write_sbatch(spec)
        print(f"sft: wrote {path} (not submitted)")
        print(f"sft: submit it with: sbatch {shlex.quote(str(path))}")
        return 0
    job_id, path = submit_sbatch(spec)
    print(
        f"sft: submitted Slurm job {job_id}: {spec.nodes} node(s) x {spec.procs_per_node} process(es)"
        + (f", partition {spec.partition}" if spec.partition else "")
    )
    print(f"  log:     tail -f {log_path(spec, job_id)}")
    print(f"  status:  squeue -j {job_id}")
    print(
        f"  cancel:  scancel {job_id}    (checkpoint and requeue now: scancel --signal=USR1 --batch {job_id})"
    )
    print(f"  script:  {script_path(spec)}")
    print(f"  output:  {spec.output_dir}   (a requeued job resumes from its checkpoints/latest)")
    print(f"  W&B:     {spec.wandb}")
    return 0


def _submitit(spec: JobSpec, dry_run: bool) -> int:
    from launch.submitit_job import executor_parameters, submit_submitit  # submitit only when it is used

    if dry_run:
        params = executor_parameters(spec)
        cmd = torchrun_command(spec, endpoint="FIRST_NODE:PORT", rdzv_id="JOB_ID")
        print(f"# submitit job '{spec.name}': {spec.nodes} task(s), one per node, each running:")
        print(shlex.join(cmd))
        print(f"# FIRST_NODE: the first node of the allocation; PORT: {PORT_BASE} + JOB_ID % {PORT_SPAN}")
        print(f"# AutoExecutor parameters: {params}")
        print(f"# submitit folder: {spec.output_dir / 'submitit'} (not submitted)")
        return 0
    job = submit_submitit(spec)
    print(
        f"sft: submitted submitit job {job.job_id}: {spec.nodes} node(s) x {spec.procs_per_node} process(es)"
    )
    print(f"  log:     tail -f {job.paths.stdout}".replace("%t", "0"))
    print(f"  status:  squeue -j {job.job_id}")
    print(f"  cancel:  scancel {job.job_id}")
    print(f"  output:  {spec.output_dir}   (a requeued job resumes from its checkpoints/latest)")
    print(f"  W&B:     {spec.wandb}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (`python -m launch`), for when the `sft` CLI is not at hand."""
    parser = argparse.ArgumentParser(prog="sft launch")
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    add_launch_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_launch(args)
    except SftError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
