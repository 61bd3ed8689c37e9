"""sft installed from its wheel, outside any checkout: the package data (DeepSpeed configs, sbatch template)
travel with it. The wheel is built from a copy of the sources, installed without dependencies into a fresh
venv that borrows the test environment's packages (nothing is downloaded), and run from another folder with
no PYTHONPATH, so the checkout cannot be what gets imported."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "sft", "launch")


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """(the venv's bin folder, an environment that sees only the venv)."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    for name in SOURCES:  # a copy: building writes build/ and *.egg-info next to the sources
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy2(path, src / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(root / "dist"), str(src)], root, env)
    (wheel,) = (root / "dist").glob("sft-*.whl")

    venv = root / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], root, env)
    python = venv / "bin" / "python"
    run([*pip, "--python", str(python), "install", "--no-deps", str(wheel)], root, env)
    # The dependencies come from the test environment's site-packages, added after the venv's own (a plain
    # path: its .pth files, among them an editable install of the checkout, are not run).
    venv_site = Path(
        run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root, env
        ).strip()
    )
    (venv_site / "borrowed-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return venv / "bin", env


def test_the_installed_package_is_the_wheel_and_carries_its_data(
    installed: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    bin_dir, env = installed
    code = (
        "import launch.slurm, sft, sft.ds_config as d, sft.model.bundled as m; "
        "print(sft.__file__); print(sorted(p.name for p in d.BUNDLED_DIR.iterdir())); print(launch.slurm.TEMPLATE.is_file()); "
        "print(m.bundled_models())"
    )
    where, configs, template, models = run([str(bin_dir / "python"), "-c", code], tmp_path, env).splitlines()
    assert Path(where).is_relative_to(bin_dir.parent) and not Path(where).is_relative_to(REPO), where
    assert configs == str(["zero1.json", "zero2.json", "zero3.json", "zero3_offload.json"])
    assert template == "True"
    from sft.model.bundled import bundled_models  # the checkout's: the planner's offline configs travel too

    assert models == str(bundled_models()) and bundled_models()


def test_zero3_check_and_slurm_dry_run_from_another_folder(
    installed: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    bin_dir, env = installed
    recipe = tmp_path / "zero3.yaml"  # a user's recipe, in the user's folder
    shutil.copy2(REPO / "recipes" / "domain_adaptation_zero3.yaml", recipe)

    resolved = run([str(bin_dir / "sft"), "train", str(recipe), "--check"], tmp_path, env)
    assert "zero_stage: 3" in resolved

    out = run(
        [str(bin_dir / "sft"), "launch", "zero3.yaml", "--backend", "slurm", "--dry-run", "launch.nodes=2"],
        tmp_path,
        env,
    )
    assert "(not submitted)" in out
    (script,) = (tmp_path / "runs").rglob("*.sbatch")
    text = script.read_text()
    assert "#SBATCH --nodes=2" in text and "sft.cli train" in text and str(recipe) in text
