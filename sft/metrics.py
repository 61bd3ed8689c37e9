"""Metrics go to three places from rank 0 only: a JSONL file, Weights & Biases, and the console; the curves are
drawn into the run folder's plots/ at each evaluation and at the end (sft/plots.py)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from sft.config import Recipe
from sft.manifest import RunManifest


class Metrics:
    def __init__(
        self,
        recipe: Recipe,
        output_dir: Path,
        enabled: bool,
        run_id: str | None,
        start_step: int,
        manifest: RunManifest | None = None,
    ) -> None:
        self.enabled = enabled
        self.recipe = recipe
        self.output_dir = output_dir
        self.wandb_run: Any = None
        self.wandb_follow = ""
        self.run_id = run_id
        self.bar: Any = None
        self.file = (output_dir / "metrics.jsonl").open("a") if enabled else None
        if enabled and recipe.logging.wandb.mode != "disabled":
            self._start_wandb(output_dir, run_id, manifest)

    def _start_wandb(self, output_dir: Path, run_id: str | None, manifest: RunManifest | None) -> None:
        import wandb

        cfg = self.recipe.logging.wandb
        # Offline unless the recipe says online; the API key comes from the environment or wandb's own
        # login file and is never written by us.
        os.environ.setdefault("WANDB_SILENT", "true")
        slurm = manifest.data.get("slurm") if manifest else None
        self.wandb_run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            name=cfg.name,
            tags=cfg.tags,
            mode=cfg.mode,
            dir=str(output_dir),
            id=run_id,  # a resumed or requeued run continues its W&B run
            resume="allow",
            group=f"slurm-{slurm['job_id']}" if slurm else None,  # the ranks and restarts of one Slurm job
            job_type="train",
            config={**self.recipe.model_dump(mode="json"), "run": manifest.data if manifest else {}},
        )
        self.run_id = self.wandb_run.id
        if cfg.mode == "online":
            self.wandb_follow = f"W&B run: {self.wandb_run.url}"
        else:  # every fragment of a resumed run has the same id: sync them together
            fragments = output_dir / "wandb" / f"offline-run-*-{self.run_id}"
            self.wandb_follow = f"W&B offline; to upload: wandb sync --id {self.run_id} {fragments}"
        if manifest is not None:
            manifest.update(wandb={"id": self.run_id, "mode": cfg.mode, "project": cfg.project})
        self.print(f"[sft] {self.wandb_follow}")

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
            shown = {
                "loss": f"{values['train/loss']:.4f}",
                "lr": f"{values['train/lr']:.2e}",
                "tok_s": f"{values['train/tokens_per_s']:.0f}",
            }
            if "train/mfu" in values:
                shown["mfu"] = f"{values['train/mfu']:.1%}"
            self.bar.set_postfix(shown, refresh=False)
        if console:
            self.print(" ".join(f"{k}={v:.4g}" for k, v in values.items()) + f" (step {step})")
        if any(k.startswith("eval/") for k in values):
            self.draw()

    def draw(self) -> None:
        """(Re)draw plots/*.png from metrics.jsonl (rank 0; never stops the run)."""
        if not (self.enabled and self.recipe.logging.plots):
            return
        from sft.plots import draw_plots

        try:
            draw_plots(self.output_dir)
        except Exception as e:  # a plot is a convenience: report, go on training
            self.print(f"[sft] plots not drawn: {type(e).__name__}: {e}")

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
            self.bar = None
        if self.file is not None:
            self.file.close()
            self.draw()
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.print(f"[sft] {self.wandb_follow}")
