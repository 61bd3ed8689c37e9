"""Per-rank state of a 70B model under FSDP2 and ZeRO-3 at N = 8, 64, 512 ranks, simulated on this CPU.

Each N runs `python -m sft.simulate` in its own process (torch's fake process group plays rank 0 of N; the model is
never materialized) and prints a markdown table of the measured bytes next to the memory planner's formula
(`sft.plan.model_state`: FSDP2 4 + 4 + 8, ZeRO-3 2 + 2 + 12 bytes per parameter, over N, tensor by tensor).

    python bench/bench_scale.py [--model meta-llama/Llama-3.1-70B] [--worlds 8 64 512]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="meta-llama/Llama-3.1-70B", help="a bundled hub config")
    ap.add_argument("--worlds", type=int, nargs="+", default=[8, 64, 512])
    args = ap.parse_args()
    rows = []
    for world in args.worlds:
        start = time.perf_counter()
        cmd = [sys.executable, "-m", "sft.simulate", "--model", args.model, "--world", str(world)]
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True).stdout
        for row in json.loads(out.strip().splitlines()[-1]):
            row["seconds"] = time.perf_counter() - start
            rows.append(row)
    n = rows[0]["n_params"]
    print(
        f"\n{args.model}: {n / 1e9:.2f}B parameters, full fine-tuning, AdamW, bf16 mixed precision; rank 0 of N "
        "simulated with torch's fake process group (activations and the gathered layer in flight not included)\n"
    )
    print(
        "| N | strategy | params GiB/rank | grads GiB/rank | optimizer GiB/rank | total GiB/rank "
        "| formula (sft.plan) GiB/rank | measured / formula | simulated in s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        total = r["params"] + r["grads"] + r["optimizer"]
        expected = sum(r["formula"].values())
        print(
            f"| {r['world']} | {r['strategy']} | {r['params'] / GIB:.2f} | {r['grads'] / GIB:.2f} "
            f"| {r['optimizer'] / GIB:.2f} | {total / GIB:.2f} | {expected / GIB:.2f} | {total / expected:.5f} "
            f"| {r['seconds']:.0f} |"
        )


if __name__ == "__main__":
    main()
