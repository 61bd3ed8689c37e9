"""Curves of a run drawn from its metrics.jsonl into OUTPUT/plots/*.png (matplotlib's Agg renderer, no display
needed): overview.png (train and eval loss, learning rate, throughput with MFU, peak memory) and loss.png
alone, larger. Written aside and moved into place (sft/publish.py), so a reader never sees half a picture."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from sft import publish

PANELS = ("loss", "lr", "throughput", "memory")


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of metrics.jsonl; a line still being written (a running run) is left out."""
    path = run_dir / "metrics.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric; a resumed run's repeated steps keep their last value."""
    last: dict[int, float] = {}
    for r in rows:
        if key in r and r[key] is not None:
            last[int(r["step"])] = float(r[key])
    steps = sorted(last)
    return steps, [last[s] for s in steps]


def _panel(ax: Any, name: str, rows: list[dict[str, Any]]) -> None:
    ax.grid(alpha=0.3)
    ax.set_xlabel("step")
    if name == "loss":
        ax.plot(*series(rows, "train/loss"), label="train", lw=1.2)
        steps, values = series(rows, "eval/loss")
        if steps:
            ax.plot(steps, values, "o-", label="eval (held out)", lw=1.5)
        ax.set_title("loss")
        ax.legend()
    elif name == "lr":
        ax.plot(*series(rows, "train/lr"), color="tab:green")
        ax.set_title("learning rate")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    elif name == "throughput":
        lines = ax.plot(*series(rows, "train/tokens_per_s"), label="tokens/s", color="tab:blue")
        ax.set_ylabel("tokens/s (all ranks)")
        ax.set_title("throughput")
        steps, mfu = series(rows, "train/mfu")
        if steps:
            twin = ax.twinx()
            lines += twin.plot(steps, [100 * m for m in mfu], "--", color="tab:orange", lw=1, label="MFU %")
            twin.set_ylabel("MFU %", color="tab:orange")
        ax.legend(handles=lines, loc="lower right")
    elif name == "memory":
        for key, label in (
            ("memory/peak_allocated_gib", "GPU peak allocated"),
            ("memory/peak_reserved_gib", "GPU peak reserved"),
            ("memory/peak_rss_gib", "host peak RSS"),
        ):
            steps, values = series(rows, key)
            if steps:
                ax.plot(steps, values, label=label)
        ax.set_ylabel("GiB (largest rank)")
        ax.set_title("peak memory")
        if ax.get_lines():
            ax.legend()


def draw_plots(run_dir: str | Path) -> list[Path]:
    """Draw the PNGs from the run's metrics; returns their paths (none when nothing was logged yet)."""
    from matplotlib.figure import Figure  # the object API: no pyplot state, no GUI backend

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    if not rows:
        return []
    out = run_dir / "plots"
    out.mkdir(exist_ok=True)
    overview = Figure(figsize=(11, 7), layout="constrained")
    for ax, name in zip(overview.subplots(2, 2).flat, PANELS, strict=True):
        _panel(ax, name, rows)
    overview.suptitle(run_dir.name)
    loss = Figure(figsize=(7, 4), layout="constrained")
    _panel(loss.subplots(), "loss", rows)
    written = []
    for name, fig in (("overview", overview), ("loss", loss)):
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=90)
        path = out / f"{name}.png"
        publish.write_bytes(path, png.getvalue())
        written.append(path)
    return written
