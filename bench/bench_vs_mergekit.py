"""`sft merge` against mergekit 0.1.5 on the built-in model: the same config, the largest difference in the
output tensors, time and peak RSS of each tool (each merge in a fresh process).

Inputs: the built-in model (SmolLM2-135M, fp32) as base and two perturbed copies of it standing in for two
fine-tunes (bench_merge.py makes them). The mergekit config comes from `sft.merge.mergekit.to_mergekit`.
DARE and DELLA are random (different generators), so only deterministic methods are compared here.

    pip install -e '.[dev]'        # brings mergekit==0.1.5
    python bench/bench_vs_mergekit.py [--methods linear,ties] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_merge import BUILTIN, make_inputs  # noqa: E402

METHODS = ["linear", "task_arithmetic", "ties", "slerp", "model_stock"]


def config_for(method: str, root: Path) -> dict[str, object]:
    raw: dict[str, object] = {
        "method": method,
        "models": [str(root / "copy_a"), str(root / "copy_b")],
        "output": str(root / f"sft_{method}"),
        "dtype": "float32",
    }
    if method not in ("linear", "slerp"):
        raw["base"] = BUILTIN
    if method == "ties":
        raw["density"] = 0.5
    if method == "slerp":
        raw["t"] = [0.2, 0.8]
    return raw


def vm_hwm_mib() -> float:
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024  # type: ignore[union-attr]


def child(tool: str, method: str, root: Path, threads: int | None) -> None:
    """One merge in this fresh process; prints its time and peak RSS as JSON."""
    import torch

    from sft.merge.config import validate_merge_config
    from sft.model.builtin import resolve_model_path

    if threads:
        torch.set_num_threads(threads)
    cfg = validate_merge_config(config_for(method, root))
    start = time.perf_counter()
    if tool == "sft":
        from sft.merge.run import merge

        merge(cfg, log=lambda line: None)
    else:
        from mergekit.config import MergeConfiguration
        from mergekit.merge import MergeOptions, run_merge

        from sft.merge.mergekit import to_mergekit

        mk = MergeConfiguration.model_validate(to_mergekit(cfg, resolve_path=resolve_model_path))
        run_merge(mk, str(root / f"mergekit_{method}"), MergeOptions(copy_tokenizer=False, quiet=True))
    print(json.dumps({"seconds": time.perf_counter() - start, "peak_mib": vm_hwm_mib()}))


def max_difference(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    def load(folder: Path) -> dict:
        out: dict = {}
        for f in sorted(folder.glob("*.safetensors")):
            out |= load_file(str(f))
        return out

    x, y = load(a), load(b)
    common = set(x) & set(y)
    assert common, "no tensor names in common"
    return max(float((x[n].float() - y[n].float()).abs().max()) for n in common)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--child", nargs=3, metavar=("TOOL", "METHOD", "ROOT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child[0], args.child[1], Path(args.child[2]), args.threads)
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_inputs(root)
        print(
            "| method | max abs difference | sft merge s | mergekit s | sft merge peak RSS MiB | mergekit peak RSS MiB |"
        )
        print("|---|---|---|---|---|---|")
        for method in args.methods.split(","):
            stats = {}
            for tool in ("sft", "mergekit"):  # alternating per method: the machine is noisy
                cmd = [sys.executable, __file__, "--child", tool, method, str(root)]
                cmd += ["--threads", str(args.threads)] if args.threads else []
                out = (
                    subprocess.run(cmd, capture_output=True, text=True, check=True)
                    .stdout.strip()
                    .splitlines()
                )
                stats[tool] = json.loads(out[-1])
            diff = max_difference(root / f"sft_{method}", root / f"mergekit_{method}")
            s, m = stats["sft"], stats["mergekit"]
            print(
                f"| {method} | {diff:.2e} | {s['seconds']:.1f} | {m['seconds']:.1f} | {s['peak_mib']:.0f} | "
                f"{m['peak_mib']:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
