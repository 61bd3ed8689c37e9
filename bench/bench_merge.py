"""Time and peak RSS of each merge method on the built-in model (SmolLM2-135M, fp32, 0.54 GB).

Inputs: the built-in model as base, two perturbed copies of it (base + seeded noise, standing in for two
fine-tunes), and a random rank-16 LoRA adapter on all linear layers (also merged as a QLoRA adapter, with
the NF4 round trip). Each merge runs in a fresh process so its peak RSS (ru_maxrss) is its own; the
verification step is off, so the numbers are the streaming merge alone. Prints a table; writes nothing
outside a temporary folder.

    python bench/bench_merge.py [--threads N] [--methods ties,slerp]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUILTIN = "builtin:smollm2-135m-instruct"
METHODS = ["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp", "lora", "qlora"]
QUANT = {
    "quant_type": "nf4",
    "double_quant": True,
    "blocksize": 64,
    "compute_dtype": "bfloat16",
    "quant_storage": "uint8",
}


def make_inputs(root: Path) -> None:
    """Two noisy copies of the built-in model and a random LoRA adapter (plus a QLoRA twin)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from sft.merge.sources import FolderSource
    from sft.model.builtin import builtin_model_dir
    from sft.safetensors_io import ShardedWriter

    base = builtin_model_dir(BUILTIN)
    src = FolderSource(BUILTIN, base)
    for i, name in enumerate(("copy_a", "copy_b")):
        folder = root / name
        folder.mkdir()
        for f in base.iterdir():
            if not f.name.endswith(".safetensors"):
                shutil.copy2(f, folder)
        specs = list(src.specs().values())
        writer = ShardedWriter(folder, specs, 10**10)
        g = torch.Generator().manual_seed(i)
        for spec in specs:
            t = src.read(spec.name, "cpu")
            writer.write(spec.name, t + 1e-3 * t.std() * torch.randn(t.shape, generator=g))
        writer.finish()
    src.close()

    torch.manual_seed(0)
    base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = get_peft_model(base_model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    for name, quant in (("lora", None), ("qlora", QUANT)):
        model.save_pretrained(str(root / name))
        (root / name / "sft_adapter.json").write_text(
            json.dumps({"base_model": BUILTIN, "quantization": quant})
        )


def config_for(method: str, root: Path) -> dict[str, object]:
    out = str(root / f"out_{method}")
    models = [str(root / "copy_a"), str(root / "copy_b")]
    if method in ("lora", "qlora"):
        return {"method": "lora", "adapter": str(root / method), "output": out, "verify": False}
    raw: dict[str, object] = {"method": method, "models": models, "output": out}
    if method not in ("linear", "slerp"):
        raw["base"] = BUILTIN
    if method in ("ties", "dare_linear", "dare_ties"):
        raw["density"] = 0.5
    if method == "slerp":
        raw["t"] = [0.2, 0.8]
    return raw


def rss_mib(field: str) -> float:
    # /proc's VmHWM belongs to this process image; ru_maxrss would carry over the parent's peak across exec.
    return int(re.search(field + r":\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024  # type: ignore[union-attr]


def child(method: str, root: Path, threads: int | None) -> None:
    """Runs in a fresh process: one merge, then one JSON line with its time and memory."""
    import torch

    from sft.merge.config import validate_merge_config
    from sft.merge.run import merge

    if threads:
        torch.set_num_threads(threads)
    cfg = validate_merge_config(config_for(method, root))
    baseline = rss_mib("VmRSS")
    start = time.perf_counter()
    result = merge(cfg, log=lambda line: None)
    seconds = time.perf_counter() - start
    peak = rss_mib("VmHWM")
    shutil.rmtree(result.output)
    print(
        json.dumps(
            {"seconds": seconds, "peak_mib": peak, "baseline_mib": baseline, "gb": result.bytes_written / 1e9}
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads in each merge (default: torch's)"
    )
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "ROOT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]), args.threads)
        return
    methods = args.methods.split(",")
    with tempfile.TemporaryDirectory(prefix="bench_merge_") as tmp:
        root = Path(tmp)
        make_inputs(root)
        rows = []
        for method in methods:
            cmd = [sys.executable, __file__, "--child", method, str(root)]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True)
            rows.append((method, json.loads(out.stdout.strip().splitlines()[-1])))
    print(
        f"merging two copies of {BUILTIN} (fp32, {rows[0][1]['gb']:.2f} GB out); threads: {args.threads or 'torch default'}"
    )
    print(f"{'method':<16} {'seconds':>8} {'peak RSS MiB':>13} {'over start MiB':>15}")
    for method, r in rows:
        print(
            f"{method:<16} {r['seconds']:>8.1f} {r['peak_mib']:>13.0f} {r['peak_mib'] - r['baseline_mib']:>15.0f}"
        )
    print(
        "lora/qlora fold a random rank-16 adapter (all linear layers); qlora adds the NF4 round trip of 210 weights."
    )
    print("'over start': peak RSS minus the RSS of the same process after imports, before the merge.")


if __name__ == "__main__":
    main()
