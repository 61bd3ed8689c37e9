"""The launcher: one recipe's `launch:` section -> one process, torchrun, an sbatch script, or a submitit job.

Importing this package (and rendering, and --dry-run) never imports torch; submitit is imported only
for `--backend submitit`.
"""

from launch.cli import add_launch_arguments, run_launch
from launch.slurm import check_cluster, render_sbatch, submit_sbatch, write_sbatch
from launch.spec import JobSpec, job_spec, rdzv_port, trainer_entry
from launch.torchrun import local_command, torchrun_command

__all__ = [
    "JobSpec",
    "add_launch_arguments",
    "check_cluster",
    "job_spec",
    "local_command",
    "rdzv_port",
    "render_sbatch",
    "run_launch",
    "submit_sbatch",
    "torchrun_command",
    "trainer_entry",
    "write_sbatch",
]
