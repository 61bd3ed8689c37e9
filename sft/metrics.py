"""Metrics go to three places from rank 0 only: a JSONL file, Weights & Biases, and the console."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from sft.config import Recipe


class Metrics:
    def __init__(
        self, recipe: Recipe, output_dir: Path, enabled: bool, run_id: str | None, start_step: int
    ) -> None:
        self.enabled = enabled
        self.recipe = recipe
        self.wandb_run: Any = None
        self.run_id = run_id
        self.bar: Any = None
        self.file = (output_dir / "metrics.jsonl").open("a") if enabled else None
        if enabled and recipe.logging.wandb.mode != "disabled":
            self._start_wandb(output_dir, run_id)

    def _start_wandb(self, output_dir: Path, run_id: str | None) -> None:
        import wandb

        cfg = self.recipe.logging.wandb
        # Offline unless the recipe says online; the API key comes from the environment or wandb's own
        # login file and is never written by us.
        os.environ.setdefault("WANDB_SILENT", "true")
        self.wandb_run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            name=cfg.name,
            tags=cfg.tags,
            mode=cfg.mode,
            dir=str(output_dir),
            id=run_id,
            resume="allow",
            config=self.recipe.model_dump(mode="json"),
        )
        self.run_id = self.wandb_run.id

    def start_progress(self, total: int, initial: int) -> None:
        if self.enabled and self.recipe.logging.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr
            )

    def log(self, step: int, values: dict[str, float], console: bool = False) -> None:
        if not self.enabled:
            return
        assert self.file is not None
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(values, step=step)
        if self.bar is not None and "train/loss" in values:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(
                loss=f"{values['train/loss']:.4f}",
                lr=f"{values['train/lr']:.2e}",
                tok_s=f"{values['train/tokens_per_s']:.0f}",
                refresh=False,
            )
        if console:
            self.print(" ".join(f"{k}={v:.4g}" for k, v in values.items()) + f" (step {step})")

    def print(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stdout)  # clears the bar (on stderr), prints, redraws it
            sys.stdout.flush()  # keep the order of log lines when stdout is a file
        else:
            print(text, flush=True)

    def summary(self, values: dict[str, Any]) -> None:
        if self.wandb_run is not None:
            self.wandb_run.summary.update(values)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
