"""End to end on the real built-in model: the quickstart recipe, a few steps, through the `sft` CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def sft(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "sft.cli", *args], capture_output=True, text=True, cwd=REPO, env=env
    )


@pytest.mark.slow
def test_quickstart_few_steps_writes_a_loadable_adapter_and_offline_wandb(
    tmp_path: Path, builtin_dir: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "qs"
    small = [
        "train.micro_batch_size=2",
        "data.max_seq_len=96",
        "eval.max_batches=1",
        "eval.batch_size=4",
        "eval.max_new_tokens=6",
        "eval.every=null",
        f"output_dir={out}",
    ]
    proc = sft("train", "recipes/quickstart.yaml", "train.max_steps=2", *small)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trainable parameters" in proc.stdout and "[before]" in proc.stdout and "[after]" in proc.stdout
    assert "optim.warmup_steps=5 is not below the run's 2 steps" in proc.stdout  # said, not refused

    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 2 and len(results["answers_after"]) == 2
    assert results["eval_after"]["eval/loss"] > 0 and "eval/perplexity" in results["eval_before"]
    assert (out / "recipe.yaml").read_text().startswith("model:")

    # W&B ran offline into the run folder; the command that uploads it is printed at the start and the end.
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))
    assert proc.stdout.count("W&B offline; to upload: wandb sync --id") == 2

    # Every step's metrics (tests/test_observability.py has the full list), the manifest, the plots, the report.
    from tests.test_observability import STEP_METRICS

    trained = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in trained if "train/loss" in r]
    assert trained and all(set(r) >= STEP_METRICS and 0 < r["train/mfu"] < 1 for r in trained)
    assert json.loads((out / "run.json").read_text())["attempts"][-1]["status"] == "done"
    assert (out / "plots" / "overview.png").is_file() and (out / "plots" / "loss.png").is_file()
    report = sft("report", str(out))
    assert report.returncode == 0 and "status      done; step 2 of 2" in report.stdout, report.stderr

    # The adapter loads with peft on top of the base and computes the same logits as the trained model
    # would (its lora_B is no longer zero, so it differs from the base).
    final = out / "final"
    meta = json.loads((final / "sft_adapter.json").read_text())
    assert meta["base_model"] == "builtin:smollm2-135m-instruct" and meta["quantization"] is None
    tok = AutoTokenizer.from_pretrained(final)
    base = AutoModelForCausalLM.from_pretrained(builtin_dir, dtype=torch.float32)
    ids = tok("The Jargon File says a kluge is", return_tensors="pt")
    with torch.no_grad():
        base_logits = base(**ids).logits
        tuned = PeftModel.from_pretrained(base, final).eval()
        tuned_logits = tuned(**ids).logits
    assert (tuned_logits - base_logits).abs().max() > 1e-4

    # Resume continues the step count from the last checkpoint, into the same W&B run. A longer cosine
    # schedule changes the run, so it must be allowed explicitly (and is recorded).
    proc = sft("train", "recipes/quickstart.yaml", "train.max_steps=3", "resume=true", *small)
    assert proc.returncode == 2 and "train.max_steps 2 -> 3" in proc.stderr, proc.stderr[-3000:]
    proc = sft(
        "train", "recipes/quickstart.yaml", "train.max_steps=3", "resume=true", "resume_changes=allow", *small
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "at step 2" in proc.stdout
    assert "resume_changes=allow: continuing with train.max_steps 2 -> 3" in proc.stdout
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s for s in steps if s > 0] == [1, 2, 2, 3, 3]  # train 1,2, eval 2, train 3, eval 3
    assert {p.name.split("-")[-1] for p in (out / "wandb").glob("offline-run-*")} == {
        runs[0].name.split("-")[-1]
    }
