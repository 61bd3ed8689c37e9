"""What the three labs share: options, measured training runs, evaluation, tables and charts."""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
LABS = REPO / "labs"
BUILTIN = "builtin:smollm2-135m-instruct"


def parser(lab: int, description: str, steps: int) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m labs.lab{lab}", description=description)
    p.add_argument("--out", type=Path, default=REPO / "runs" / "labs" / f"lab{lab}", help="where results go")
    p.add_argument(
        "--model", default=BUILTIN, help="base model (default: the built-in SmolLM2-135M-Instruct)"
    )
    p.add_argument(
        "--steps", type=int, default=steps, help=f"optimizer steps per fine-tune (default {steps})"
    )
    p.add_argument(
        "--eval-batches", type=int, default=4, help="score N batches of 8 per data set (default 4)"
    )
    p.add_argument("--max-new-tokens", type=int, default=40, help="length of the sample answers")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override for every fine-tune"
    )
    p.add_argument(
        "--reuse", action="store_true", help="keep fine-tunes and evaluations an earlier run of OUT completed"
    )
    return p


def log(line: str) -> None:
    print(f"[lab] {line}", flush=True)


def train(name: str, recipe: str, args: argparse.Namespace, extra: Sequence[str] = ()) -> dict[str, Any]:
    """One fine-tune in a fresh process (so its peak memory is its own); its output in OUT/logs/NAME.log."""
    out = args.out / name
    overrides = [
        f"model.name={args.model}",
        f"train.max_steps={args.steps}",
        f"output_dir={out}",
        "overwrite=true",
        *extra,
        *args.set,
    ]
    logs = args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    measured = logs / f"{name}.measure.json"
    done = args.reuse and measured.is_file() and (out / "results.json").is_file()
    if done:
        log(f"reusing the fine-tune {name} in {out}")
    else:
        log(f"fine-tuning {name}: sft train labs/{recipe} {' '.join(overrides)}")
    with open(logs / f"{name}.log", "a" if done else "w") as f:
        code = (
            0
            if done
            else subprocess.call(
                [
                    sys.executable,
                    "-m",
                    "labs.measure",
                    str(measured),
                    "train",
                    str(LABS / recipe),
                    *overrides,
                ],
                stdout=f,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env={
                    **os.environ,
                    "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                },
            )
        )
    if code != 0:
        sys.exit(f"[lab] {name} failed (exit {code}); see {logs / f'{name}.log'}")
    stats = json.loads(measured.read_text())
    results = json.loads((out / "results.json").read_text())
    stats |= {
        "final": str(out / "final"),
        "steps": results["steps"],
        "train_seconds": results["train_seconds"],
        "bytes_written": folder_bytes(out),
        "trainable_params": stored_values(out / "final"),
    }
    log(
        f"  {name}: {stats['steps']} steps in {stats['train_seconds']:.0f} s, peak RSS {stats['peak_rss_mib']:.0f} MiB, "
        f"{stats['bytes_written'] / 2**20:.0f} MiB written"
    )
    return stats


def evaluate(
    label: str, model: str, sources: list[str], prompts: list[str], args: argparse.Namespace
) -> dict:
    """Held-out loss per source and greedy answers (sft eval), in this process."""
    from sft.model_eval import evaluate_model

    saved = args.out / "evals" / f"{label.replace(' ', '_').replace('/', '_')}.json"
    if args.reuse and saved.is_file():
        log(f"reusing the evaluation of {label}")
        return json.loads(saved.read_text())
    log(f"evaluating {label}")
    result = evaluate_model(
        model,
        sources,
        prompts,
        max_seq_len=512,
        max_batches=args.eval_batches,
        max_new_tokens=args.max_new_tokens,
        log=lambda line: log("  " + line.removeprefix("[sft eval] ")),
    )
    gc.collect()
    saved.parent.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(result, ensure_ascii=False))
    return result


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def stored_values(folder: Path) -> int:
    """Values in a folder's safetensors files: the adapter's (LoRA) or the whole model's (full fine-tuning)."""
    from sft.safetensors_io import read_header

    total = 0
    for f in folder.glob("*.safetensors"):
        for info in read_header(f)[0].values():
            n = 1
            for d in info.shape:
                n *= d
            total += n
    return total


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(x: Any) -> str:
        if isinstance(x, float):
            return f"{x:.3f}"
        return str(x).replace("\n", " ").replace("|", "\\|")

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def short(text: str, n: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB" if n >= 100 * 2**20 else f"{n / 2**20:.1f} MiB"


def millions(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def finish(out: Path, title: str, sections: list[str], data: dict[str, Any], started: float) -> None:
    """results.md (the tables), results.json (every number), and how long the lab took."""
    import platform

    load = os.getloadavg()[0]
    minutes = (time.perf_counter() - started) / 60
    data["lab_minutes"] = round(minutes, 1)
    footer = (
        f"Measured {time.strftime('%Y-%m-%d %H:%M')} on {os.cpu_count()} CPU cores ({platform.machine()}), "
        f"load average {load:.2f} at the end; the whole lab took {minutes:.1f} min."
    )
    (out / "results.md").write_text(f"# {title}\n\n" + "\n\n".join(sections) + f"\n\n{footer}\n")
    (out / "results.json").write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    log(f"done in {minutes:.1f} min: {out / 'results.md'}")


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
