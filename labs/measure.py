"""Run one `sft` command in this process and record its wall time and peak memory (for the lab tables).

    python -m labs.measure OUT.json train labs/lab1_lora.yaml train.max_steps=40

Peak memory is this process's VmHWM (peak resident set) from /proc, read at exit: it belongs to this process
image alone (ru_maxrss would carry over the parent's peak across exec).
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path


def peak_rss_mib() -> float:
    status = Path("/proc/self/status").read_text()
    match = re.search(r"VmHWM:\s+(\d+) kB", status)
    return int(match.group(1)) / 1024 if match else float("nan")


def main() -> int:
    from sft.cli import main as sft_main

    out, argv = Path(sys.argv[1]), sys.argv[2:]
    start = time.perf_counter()
    code = sft_main(argv)
    out.write_text(
        json.dumps({"seconds": time.perf_counter() - start, "peak_rss_mib": peak_rss_mib(), "exit": code})
    )
    return code


if __name__ == "__main__":
    sys.exit(main())
