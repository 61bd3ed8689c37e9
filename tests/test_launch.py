"""The launcher without a cluster: commands, the rendered sbatch script, quoting, and bad input.

The script's shell logic (signal forwarding, requeue decision, quoting) runs for real here, with stand-ins
for `srun` and `scontrol` on PATH; tests/test_slurm.py runs the same scripts on a real Slurm cluster.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from launch import add_launch_arguments, job_spec, rdzv_port, render_sbatch, run_launch, torchrun_command
from launch.slurm import _gpus, extra_parameters, sbatch_lines, submit_sbatch, write_sbatch
from launch.spec import JobSpec, time_minutes
from launch.torchrun import check_local_capacity, local_command
from sft.config import load_recipe
from sft.errors import SftError

REPO = Path(__file__).resolve().parents[1]
NASTY = "a'b\"c $(touch {marker}) `touch {marker}`; touch {marker} \\ $HOME\nnext line"


def spec_for(tmp_path: Path, *overrides: str) -> JobSpec:
    recipe_file = tmp_path / "recipe.yaml"
    if not recipe_file.exists():
        recipe_file.write_text(f"output_dir: {tmp_path / 'run'}\n")
    recipe = load_recipe(recipe_file, list(overrides))
    return job_spec(recipe, recipe_file, list(overrides))


def namespace(recipe: Path, overrides: list[str], backend: str, dry_run: bool = True) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    add_launch_arguments(parser)
    argv = [str(recipe), *overrides, "--backend", backend] + (["--dry-run"] if dry_run else [])
    return parser.parse_args(argv)


# ---------------------------------------------------------------- the job spec and commands


def test_trainer_entry_always_resumes(tmp_path: Path) -> None:
    spec = spec_for(tmp_path, "train.max_steps=5", "resume=false")
    recipe = str((tmp_path / "recipe.yaml").resolve())
    assert spec.entry == [
        "-m",
        "sft.cli",
        "train",
        recipe,
        "train.max_steps=5",
        "resume=false",
        "resume=auto",
    ]
    assert spec.output_dir == (tmp_path / "run").resolve()
    assert spec.name == "sft-run"


def test_local_command(tmp_path: Path) -> None:
    spec = spec_for(tmp_path)
    assert local_command(spec) == [sys.executable, *spec.entry]
    with pytest.raises(SftError, match="--backend local runs one process"):
        local_command(spec_for(tmp_path, "launch.procs_per_node=2"))


def test_torchrun_one_box(tmp_path: Path) -> None:
    spec = spec_for(tmp_path, "launch.procs_per_node=4")
    cmd = torchrun_command(spec)
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert cmd[3:6] == ["--standalone", "--nnodes=1", "--nproc_per_node=4"]
    assert cmd[6:] == spec.entry


def test_torchrun_several_boxes(tmp_path: Path) -> None:
    spec = spec_for(tmp_path, "launch.nodes=3", "launch.procs_per_node=8", "launch.rdzv_endpoint=box1:29400")
    cmd = torchrun_command(spec)
    options = cmd[3 : cmd.index("-m", 3)]
    assert options == [
        "--nnodes=3",
        "--nproc_per_node=8",
        "--rdzv_backend=c10d",
        "--rdzv_endpoint=box1:29400",
        f"--rdzv_id={spec.rdzv_id}",
        "--max_restarts=0",
    ]
    # Every box runs the same command: the id depends on the output folder only.
    assert (
        torchrun_command(spec_for(tmp_path, "launch.nodes=3", "launch.rdzv_endpoint=box1:29400"))[7]
        == options[4]
    )
    with pytest.raises(SftError, match="needs launch.rdzv_endpoint"):
        torchrun_command(spec_for(tmp_path, "launch.nodes=2"))
    with pytest.raises(SftError, match="expected HOST:PORT"):
        torchrun_command(spec_for(tmp_path, "launch.nodes=2", "launch.rdzv_endpoint=box1"))


def test_more_processes_than_this_box_has(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(SftError, match="has 2 GPU"):
        check_local_capacity(spec_for(tmp_path, "launch.procs_per_node=4"))
    check_local_capacity(spec_for(tmp_path, "launch.procs_per_node=2"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(SftError, match="no GPU and"):
        check_local_capacity(spec_for(tmp_path, "launch.procs_per_node=4096"))


# ---------------------------------------------------------------- the sbatch script


def big_job(tmp_path: Path, *more: str) -> JobSpec:
    return spec_for(
        tmp_path,
        "launch.nodes=4",
        "launch.procs_per_node=8",
        "launch.gpus_per_node=8",
        "launch.cpus_per_task=96",
        "launch.partition=gpu",
        "launch.account=proj-42",
        "launch.qos=high",
        "launch.time=2-00:00:00",
        "launch.mem='0'",
        "launch.signal_seconds=300",
        "launch.setup=['module load cuda/12.4', 'source /opt/venv/bin/activate']",
        "launch.env={NCCL_DEBUG: WARN}",
        "launch.sbatch_extra=['--constraint=h100', '#SBATCH --exclusive']",
        *more,
    )


def test_sbatch_script_for_4_nodes_of_8_gpus(tmp_path: Path) -> None:
    spec = big_job(tmp_path)
    script = render_sbatch(spec)
    log_dir = spec.output_dir / "slurm"
    assert [line for line in script.splitlines() if line.startswith("#SBATCH")] == [
        "#SBATCH --job-name=sft-run",
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --cpus-per-task=96",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --mem=0",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj-42",
        "#SBATCH --qos=high",
        "#SBATCH --time=2-00:00:00",
        f"#SBATCH --output={log_dir}/%x-%j.out",
        "#SBATCH --open-mode=append",
        f"#SBATCH --chdir={Path.cwd()}",
        "#SBATCH --signal=B:USR1@300",
        "#SBATCH --requeue",
        "#SBATCH --constraint=h100",
        "#SBATCH --exclusive",
    ]
    assert script.startswith("#!/bin/bash\n")
    # #SBATCH lines are only read before the first command.
    first_command = next(i for i, line in enumerate(script.splitlines()) if line and not line.startswith("#"))
    assert all(i < first_command for i, line in enumerate(script.splitlines()) if line.startswith("#SBATCH"))
    # Set-up runs as written, before the environment and the job.
    assert script.index("module load cuda/12.4\nsource /opt/venv/bin/activate") < script.index(
        "export NCCL_DEBUG=WARN"
    )
    # One task per node, each torchrun with the node's 8 ranks, c10d rendezvous on the first node.
    flat = script.replace("\\\n", " ")
    srun = re.search(r"^\s*srun (.*)&$", flat, re.M)
    assert srun, flat
    words = srun.group(1).split()
    assert words[:5] == ["--nodes=4", "--ntasks=4", "--ntasks-per-node=1", "--cpus-per-task=96", "--wait=120"]
    assert "--nnodes=4" in words and "--nproc_per_node=8" in words and "--rdzv_backend=c10d" in words
    assert '--rdzv_endpoint="$head_node:$rdzv_port"' in words and '--rdzv_id="$SLURM_JOB_ID"' in words
    assert srun.group(1).endswith(shlex.join(spec.entry) + " ")
    assert 'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in script
    assert "scontrol requeue" in script and "trap 'on_signal USR1' USR1" in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_port_derivation_matches_python(tmp_path: Path) -> None:
    script = render_sbatch(spec_for(tmp_path))
    line = next(x for x in script.splitlines() if x.startswith("rdzv_port="))
    for job_id in (1, 12345, 29999, 987654321):
        out = subprocess.run(
            ["bash", "-c", f"{line}; echo $rdzv_port"],
            env={"SLURM_JOB_ID": str(job_id)},
            capture_output=True,
            text=True,
        )
        assert int(out.stdout) == rdzv_port(job_id) < 32768


def test_no_requeue_and_sbatch_extra_for_submitit(tmp_path: Path) -> None:
    spec = spec_for(
        tmp_path, "launch.requeue=false", "launch.sbatch_extra=['--constraint=a100', '--exclusive']"
    )
    assert "#SBATCH --no-requeue" in sbatch_lines(spec)
    assert "requeue=0" in render_sbatch(spec)
    assert extra_parameters(spec) == {"constraint": "a100", "exclusive": True}


# ---------------------------------------------------------------- injection


def fake_slurm(bin_dir: Path, log: Path, srun_body: str = "exit 0") -> None:
    """Stand-ins for srun (records its arguments and environment) and scontrol (records requeues)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    (bin_dir / "srun").write_text(
        textwrap.dedent(f"""\
        #!/bin/bash
        {sys.executable} -c 'import json, os, sys; json.dump({{"argv": sys.argv[1:], "env": dict(os.environ)}}, open("{log}", "w"))' "$@"
        """)
        + srun_body
        + "\n"
    )
    (bin_dir / "scontrol").write_text(
        textwrap.dedent(f"""\
        #!/bin/bash
        if [ "$1 $2" = "show hostnames" ]; then echo node1; echo node2; exit 0; fi
        echo "$@" >> {log}.scontrol
        """)
    )
    for f in ("srun", "scontrol"):
        (bin_dir / f).chmod(0o755)


def run_script(path: Path, bin_dir: Path, **popen: object) -> subprocess.Popen[str]:
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node[1-2]"}
    return subprocess.Popen(["bash", str(path)], env=env, text=True, cwd=path.parent, **popen)  # type: ignore[call-overload]


def test_recipe_values_cannot_escape_their_quotes(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    nasty = NASTY.format(marker=marker)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"output_dir: {tmp_path / 'run'}\n")
    overrides = [
        f"data.train={nasty}",
        f"launch.env={{PROBE: {json.dumps(nasty)}}}",
        # Set-up lines run as written, before `set -u` (module and conda scripts use unset variables).
        f"launch.setup=['echo \"ran $SFT_UNSET_VARIABLE\" > {tmp_path / 'setup.txt'}']",
    ]
    spec = job_spec(load_recipe(recipe, overrides), recipe, overrides)
    assert spec.env["PROBE"] == nasty and f"data.train={nasty}" in spec.entry
    path = write_sbatch(spec)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    log = tmp_path / "srun.json"
    fake_slurm(tmp_path / "bin", log)
    assert run_script(path, tmp_path / "bin").wait(timeout=30) == 0
    seen = json.loads(log.read_text())
    assert not marker.exists()
    assert (tmp_path / "setup.txt").read_text() == "ran \n"
    assert seen["env"]["PROBE"] == nasty  # the value arrives as written, not run
    assert f"data.train={nasty}" in seen["argv"]
    assert seen["argv"][-len(spec.entry) :] == spec.entry
    assert "--rdzv_endpoint=node1:14242" in seen["argv"] and "--rdzv_id=4242" in seen["argv"]


@pytest.mark.parametrize(
    "override, message",
    [
        ('launch.partition="gpu\\n#SBATCH --uid=0"', "launch.partition"),
        ("launch.partition='gpu; touch x'", "launch.partition"),
        ("launch.account='a b'", "launch.account"),
        ("launch.qos='$(id)'", "launch.qos"),
        ('launch.time="1:00:00\\n--uid=0"', "launch.time"),
        ("launch.time=forever", "launch.time"),
        ("launch.mem='64G --uid=0'", "launch.mem"),
        ('launch.job_name="x\\ny"', "launch.job_name"),
        ('launch.sbatch_extra=["--constraint=a\\n--uid=0"]', "newlines"),
        ("launch.sbatch_extra=['touch x']", "expected one sbatch option"),
        ("launch.sbatch_extra=['--output=/etc/x']", "--output is set by the launcher"),
        ("launch.sbatch_extra=['-p gpu']", "-p is set by launch.partition"),
        ("launch.env={'A B': x}", "not a valid environment variable"),
        ("launch.env={'X=$(id)': x}", "not a valid environment variable"),
        ('launch.setup=["module load x\\ntouch y"]', "launch.setup"),
        ("output_dir='/tmp/my runs/x'", "output_dir"),
        ("output_dir='/tmp/$(id)/x'", "output_dir"),
        ("launch.signal_seconds=600", "signal_seconds"),
    ],
)
def test_bad_sbatch_values_are_refused(tmp_path: Path, override: str, message: str) -> None:
    # (YAML double quotes: "\\n" is a real newline in the value.)
    spec = (
        spec_for(tmp_path, "launch.time='10'", override)
        if "time" not in override
        else spec_for(tmp_path, override)
    )
    with pytest.raises(SftError, match=re.escape(message)) as e:
        render_sbatch(spec)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- the script's signal handling


def test_usr1_is_forwarded_and_the_job_requeued(tmp_path: Path) -> None:
    # The stand-in srun behaves like the ranks: on USR1 it "checkpoints" and fails (torchrun reports 1).
    log = tmp_path / "srun.json"
    fake_slurm(
        tmp_path / "bin",
        log,
        "trap 'echo got >> " + str(tmp_path / "usr1") + "; exit 1' USR1\n"
        "touch " + str(tmp_path / "started") + "\nfor i in $(seq 300); do sleep 0.1; done; exit 0",
    )
    path = write_sbatch(spec_for(tmp_path))
    proc = run_script(path, tmp_path / "bin", stdout=subprocess.PIPE)
    wait_for(tmp_path / "started")
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=30)
    assert (tmp_path / "usr1").read_text() == "got\n"
    assert (Path(f"{log}.scontrol")).read_text() == "requeue 4242\n"
    assert "requeueing job 4242" in out and proc.returncode == 1


def test_usr1_during_the_setup_requeues_without_starting(tmp_path: Path) -> None:
    log = tmp_path / "srun.json"
    fake_slurm(tmp_path / "bin", log)
    started = tmp_path / "started"
    path = write_sbatch(spec_for(tmp_path, f"launch.setup=['touch {started}; sleep 1']"))
    proc = run_script(path, tmp_path / "bin", stdout=subprocess.PIPE)
    wait_for(started)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=30)
    assert not log.exists()  # srun never ran
    assert Path(f"{log}.scontrol").read_text() == "requeue 4242\n" and proc.returncode == 1


def test_term_and_clean_exits_are_not_requeued(tmp_path: Path) -> None:
    log = tmp_path / "srun.json"
    fake_slurm(
        tmp_path / "bin",
        log,
        "trap 'exit 1' TERM\ntouch "
        + str(tmp_path / "started")
        + "\nfor i in $(seq 300); do sleep 0.1; done; exit 0",
    )
    path = write_sbatch(spec_for(tmp_path))
    proc = run_script(path, tmp_path / "bin", stdout=subprocess.PIPE)
    wait_for(tmp_path / "started")
    proc.send_signal(signal.SIGTERM)  # scancel, or preemption: Slurm decides, the script does not requeue
    proc.communicate(timeout=30)
    assert proc.returncode == 1 and not Path(f"{log}.scontrol").exists()

    # USR1 arriving when the run had finished anyway: nothing to requeue.
    fake_slurm(
        tmp_path / "bin", log, "trap '' USR1\ntouch " + str(tmp_path / "started2") + "\nsleep 1; exit 0"
    )
    proc = run_script(path, tmp_path / "bin", stdout=subprocess.PIPE)
    wait_for(tmp_path / "started2")
    proc.send_signal(signal.SIGUSR1)
    proc.communicate(timeout=30)
    assert proc.returncode == 0 and not Path(f"{log}.scontrol").exists()


def wait_for(path: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


# ---------------------------------------------------------------- `sft launch` itself


def test_dry_runs_print_and_write_without_torch(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"output_dir: {tmp_path / 'run'}\nlaunch: {{nodes: 2, time: '01:00:00'}}\n")
    code = textwrap.dedent(f"""
        import argparse, sys
        from launch import add_launch_arguments, run_launch
        for backend in ("torchrun", "slurm", "submitit"):
            p = argparse.ArgumentParser(); p.add_argument("recipe"); p.add_argument("overrides", nargs="*")
            add_launch_arguments(p)
            extra = ["launch.rdzv_endpoint=box1:29400"] if backend == "torchrun" else []
            assert run_launch(p.parse_args([{str(recipe)!r}, *extra, "--backend", backend, "--dry-run"])) == 0
        assert "torch" not in sys.modules, "rendering imported torch"
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert (
        "--rdzv_endpoint=box1:29400" in out.stdout and "run this same command on each of the 2" in out.stdout
    )
    assert f"wrote {tmp_path / 'run' / 'slurm' / 'sft-run.sbatch'} (not submitted)" in out.stdout
    assert (tmp_path / "run" / "slurm" / "sft-run.sbatch").is_file()
    assert "# submitit job 'sft-run': 2 task(s), one per node" in out.stdout


def test_local_dry_run_prints_the_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"output_dir: {tmp_path / 'run'}\nlaunch: {{env: {{A: 'x y'}}}}\n")
    assert run_launch(namespace(recipe, ["train.max_steps=3"], "local")) == 0
    line = capsys.readouterr().out.strip()
    trainer = [
        sys.executable,
        "-m",
        "sft.cli",
        "train",
        str(recipe.resolve()),
        "train.max_steps=3",
        "resume=auto",
    ]
    assert line == "A='x y' " + shlex.join(trainer)


def test_bad_recipe_and_no_slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"output_dir: {tmp_path / 'run'}\n")
    with pytest.raises(SftError, match="launch.nodes"):
        run_launch(namespace(recipe, ["launch.nodes=0"], "slurm"))
    with pytest.raises(SftError, match="unknown key 'launch.gpus'"):
        run_launch(namespace(recipe, ["launch.gpus=8"], "slurm"))
    with pytest.raises(SftError, match="always runs the trainer with resume=auto"):
        run_launch(namespace(recipe, ["overwrite=true"], "slurm"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    for backend in ("slurm", "submitit"):
        with pytest.raises(SftError, match="`sbatch` not found"):
            run_launch(namespace(recipe, ["launch.time='10'"], backend, dry_run=False))
    assert not (tmp_path / "run" / "slurm").exists()  # nothing written before the check
    with pytest.raises(SftError, match="`sbatch` not found"):
        submit_sbatch(spec_for(tmp_path))


def test_submitit_needs_a_time_limit(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"output_dir: {tmp_path / 'run'}\n")
    with pytest.raises(SftError, match="needs launch.time"):
        run_launch(namespace(recipe, [], "submitit"))


# ---------------------------------------------------------------- small parsers


def test_time_and_gres_parsing() -> None:
    assert [time_minutes(t) for t in ("90", "10:30", "04:00:00", "2-00", "1-01:30", "0-00:00:30")] == [
        90,
        11,
        240,
        2880,
        1530,
        1,
    ]
    assert [
        _gpus(g) for g in ("(null)", "gpu:8", "gpu:a100:4(S:0-1)", "gpu:a100:4,gpu:v100:2", "shard:8")
    ] == [
        0,
        8,
        4,
        6,
        0,
    ]
