"""`sft report RUN_DIR`: redraw a run's plots and summarize it, finished or still running.

Reads only files in the run folder (metrics.jsonl, run.json, recipe.yaml, results.json when finished), so it
works on a copy of the folder, on another machine, while the run is writing it, and without W&B.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import yaml

from sft.errors import SftError
from sft.plots import draw_plots, read_metrics, series


def report(run_dir: str | Path) -> str:
    run = Path(run_dir)
    if not (run / "metrics.jsonl").is_file():
        raise SftError(f"{run}: no metrics.jsonl; point sft report at a run's output_dir")
    rows = read_metrics(run)
    plots = draw_plots(run)
    manifest = _json(run / "run.json")
    results = _json(run / "results.json")
    recipe = yaml.safe_load((run / "recipe.yaml").read_text()) if (run / "recipe.yaml").is_file() else {}
    attempts = manifest.get("attempts", [])
    last = attempts[-1] if attempts else {}
    steps, _ = series(rows, "train/loss")
    planned = (recipe.get("train") or {}).get("max_steps")
    lines = [f"run {run}"]
    status = last.get("status", "unknown")
    if status == "failed":
        status += f": {last.get('error', '')}"
    lines.append(
        f"  status      {status}; step {steps[-1] if steps else 0}"
        + (f" of {planned}" if planned else "")
        + (f"; {len(attempts)} attempts (resumed)" if len(attempts) > 1 else "")
    )
    if last:
        lines.append(
            f"  started     {attempts[0].get('started')}"
            + (f", ended {last['ended']}" if "ended" in last else "")
        )
    if manifest:
        lines.append(
            f"  on          {manifest.get('world_size')} rank(s), {', '.join(sorted(set(manifest.get('devices', []))))}"
        )
    step_times = [r["train/step_time_s"] for r in rows if "train/step_time_s" in r]
    if results.get("train_seconds") is not None:
        lines.append(f"  time        {results['train_seconds']:.0f} s of training")
    elif step_times:
        lines.append(f"  time        {sum(step_times):.0f} s in logged steps so far")
    lines += _evals(rows, results)
    lines += _throughput(rows)
    for tag in ("before", "after"):
        for a in results.get(f"answers_{tag}", []):
            lines.append(f"  [{tag}] {a['prompt']}\n    -> {a['answer']}")
    if plots:
        lines.append(f"  plots       {', '.join(str(p) for p in plots)}")
    return "\n".join(lines)


def _json(path: Path) -> dict[str, Any]:
    try:
        loaded = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):  # absent, or being written right now
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _evals(rows: list[dict[str, Any]], results: dict[str, Any]) -> list[str]:
    steps, losses = series(rows, "eval/loss")
    if not steps:
        return []
    before = results.get("eval_before", {}).get("eval/loss", losses[0] if steps[0] == 0 else None)
    after = results.get("eval_after", {}).get("eval/loss", losses[-1])
    text = f"  eval loss   {after:.4f} (perplexity {math.exp(min(after, 50)):.2f}) at step {steps[-1]}"
    if before is not None:
        text += f"; before training {before:.4f} (perplexity {math.exp(min(before, 50)):.2f})"
    return [text]


def _throughput(rows: list[dict[str, Any]]) -> list[str]:
    def median(key: str) -> float | None:
        values = [r[key] for r in rows if key in r]
        return statistics.median(values) if values else None

    out = []
    tok, samples, mfu = median("train/tokens_per_s"), median("train/samples_per_s"), median("train/mfu")
    if tok is not None:
        text = f"  throughput  {tok:,.0f} tokens/s"
        text += f", {samples:.2f} samples/s" if samples is not None else ""
        text += f", MFU {mfu:.1%}" if mfu is not None else ""
        out.append(text + " (medians over logged steps)")
    wait = median("train/data_wait_fraction")
    pad = median("train/padding_fraction")
    if wait is not None and pad is not None:
        out.append(f"  waste       {wait:.1%} of a step waiting for data, {pad:.1%} padding (medians)")
    peaks = {
        k: max(r[k] for r in rows if k in r) for k in {k for r in rows for k in r if k.startswith("memory/")}
    }
    if peaks:
        names = {"memory/peak_allocated_gib": "GPU allocated", "memory/peak_reserved_gib": "GPU reserved"}
        names["memory/peak_rss_gib"] = "host RSS"
        out.append(
            "  peak memory " + ", ".join(f"{names.get(k, k)} {v:.2f} GiB" for k, v in sorted(peaks.items()))
        )
    return out
