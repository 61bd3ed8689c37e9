"""Step time of the harness against a minimal hand-written PyTorch loop on identical batches.

Same model (built-in SmolLM2-135M + LoRA), same data, same seed, same optimizer and schedule. The harness
runs through `sft.train.train` and reports per-step wall time (data collation, forward, backward, clip,
step, logging); the hand loop does the same work with the model's own mean loss. Prints a table.

    python bench/bench_step.py [--steps 8] [--micro 4] [--seq 256]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def harness_step_times(args: argparse.Namespace, out: Path) -> list[float]:
    from sft.config import load_recipe
    from sft.train import train

    recipe = load_recipe(
        Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml",
        [
            f"train.max_steps={args.steps}",
            f"train.micro_batch_size={args.micro}",
            f"data.max_seq_len={args.seq}",
            "eval.every=null",
            "eval.prompts=[]",
            "data.eval=[]",
            "checkpoint.every=null",
            "logging.wandb.mode=disabled",
            "logging.progress=false",
            f"output_dir={out}",
        ],
    )
    train(recipe)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["train/step_time_s"] for r in rows if "train/step_time_s" in r]


def minimal_step_times(args: argparse.Namespace) -> list[float]:
    """The loop a careful user would write by hand with transformers + peft."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler

    from sft.config import load_recipe
    from sft.data.pipeline import DataPipeline
    from sft.model.builtin import builtin_model_dir

    recipe = load_recipe(
        Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml",
        [f"train.micro_batch_size={args.micro}", f"data.max_seq_len={args.seq}", "data.eval=[]"],
    )
    path = builtin_model_dir(recipe.model.name)
    torch.manual_seed(recipe.seed)
    tokenizer = AutoTokenizer.from_pretrained(path)
    data = DataPipeline(recipe, tokenizer)  # identical batches, built before timing
    batches = [data.micro_batches(step)[0] for step in range(args.steps)]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    lc = recipe.lora
    model = get_peft_model(
        model,
        LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=lc.target_modules),
    )
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.optim.lr)
    sched = get_scheduler(
        "cosine", opt, num_warmup_steps=recipe.optim.warmup_steps, num_training_steps=args.steps
    )
    times = []
    for batch in batches:
        start = time.perf_counter()
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        float(loss)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        minimal = minimal_step_times(args)
        harness = harness_step_times(args, Path(tmp) / "run")
    # The first step pays one-time costs (allocator warm-up) in both loops; leave it out of the median.
    h, m = statistics.median(harness[1:]), statistics.median(minimal[1:])
    print(
        f"threads={torch.get_num_threads()} steps={args.steps} micro_batch={args.micro} max_seq_len={args.seq}"
    )
    print(f"{'loop':<12}{'median step s':>15}{'min step s':>12}")
    print(f"{'minimal':<12}{m:>15.3f}{min(minimal[1:]):>12.3f}")
    print(f"{'sft':<12}{h:>15.3f}{min(harness[1:]):>12.3f}")
    print(f"ratio sft/minimal (median): {h / m:.3f}")


if __name__ == "__main__":
    main()
