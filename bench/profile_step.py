"""Where a training step's time goes: torch.profiler over a few steps of the real loop (sft.train.train).

Built-in SmolLM2-135M + LoRA (all linear layers), packed rows, one process, the quickstart recipe otherwise.
The first step warms up; the next `--steps` are recorded. Prints the time per step split into kinds of work
(from the profiler's per-operator self times), the top operators, and how many sums over ranks the loop does
per step (each is an all-reduce that waits for the device under torchrun).

    python bench/profile_step.py [--steps 3] [--micro 4] [--seq 512] [--dropout 0.05] [--loss-impl full]
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]

# Kinds of work, by operator name (first match wins; forward and backward kernels alike); the self CPU time
# of every other operator is "other".
KINDS = [
    ("matmul (linear layers, head)", r"addmm|\bmm|bmm|matmul|linear"),
    ("attention kernel", r"scaled_dot_product|flash_attention|efficient_attention"),
    ("LoRA dropout masks", r"bernoulli|dropout"),
    ("softmax / logsumexp / cross entropy", r"logsumexp|log_softmax|softmax|nll_loss|cross_entropy|::exp_?$"),
    ("optimizer and clipping", r"_foreach|adam|lerp|addcdiv|addcmul|norm\b|_fused"),
    (
        "element-wise (mul, add, silu, rms norm, rotary)",
        r"::(mul|add|sub|div|silu|rsqrt|pow|mean|neg|sigmoid|cat|sum)",
    ),
    (
        "copies, casts, indexing",
        r"copy_|::to\b|_to_copy|clone|contiguous|index|gather|scatter|masked|nonzero|where",
    ),
    ("allocation and zero-filling", r"empty|zeros|fill_|zero_|ones|full|resize"),
]


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if re.search(pattern, name):
            return kind
    return "other"


def recipe_for(args: argparse.Namespace, out: Path) -> Any:
    from sft.config import load_recipe

    return load_recipe(
        REPO / "recipes" / "quickstart.yaml",
        [
            f"train.micro_batch_size={args.micro}",
            f"train.max_steps={args.steps + 2}",
            f"data.max_seq_len={args.seq}",
            "data.packing=true",
            f"lora.dropout={args.dropout}",
            f"train.loss_impl={args.loss_impl}",
            "optim.scheduler=constant",
            "optim.warmup_steps=0",
            "data.eval=[]",
            "eval.prompts=[]",
            "eval.every=null",
            "checkpoint.every=null",
            "train.device=cpu",
            "logging.wandb.mode=disabled",
            "logging.progress=false",
            f"output_dir={out}",
        ],
    )


def profile_training(args: argparse.Namespace, out: Path) -> tuple[Any, list[float], int]:
    """Run the real loop (sft.train.train); the profiler records steps 2.. (step 1 warms up), advanced at each
    optimizer step; every call of the strategy's sum over ranks is counted (an all-reduce under torchrun)."""
    import sft.train
    from sft.strategies.single import SingleStrategy

    prof = torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU],
        schedule=torch.profiler.schedule(wait=0, warmup=1, active=args.steps, repeat=1),
    )
    step_times: list[float] = []
    collectives = [0]
    last = [time.perf_counter()]
    original_step, original_sum = SingleStrategy.step, SingleStrategy.sum_across_ranks

    def stepped(self: Any, *args: Any) -> float:
        norm = original_step(self, *args)
        prof.step()
        now = time.perf_counter()
        step_times.append(now - last[0])
        last[0] = now
        return norm

    def counted(self: Any, values: torch.Tensor) -> torch.Tensor:
        collectives[0] += 1
        return original_sum(self, values)

    SingleStrategy.step, SingleStrategy.sum_across_ranks = stepped, counted  # type: ignore[method-assign]
    try:
        with prof:
            sft.train.train(recipe_for(args, out))
    finally:
        SingleStrategy.step, SingleStrategy.sum_across_ranks = original_step, original_sum  # type: ignore[method-assign]
    # Steps 2 .. steps+1 were recorded; the per-step collectives are the same every step.
    return prof, step_times[1 : args.steps + 1], collectives[0] // (args.steps + 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--loss-impl", default="chunked", choices=["chunked", "full"])
    parser.add_argument("--trace", help="also write a Chrome trace (chrome://tracing, Perfetto) to this file")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        prof, times, collectives = profile_training(args, Path(tmp) / "run")
    if args.trace:
        prof.export_chrome_trace(args.trace)

    kinds: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        kinds[kind_of(event.key)] += event.self_cpu_time_total / 1e6
    total = sum(kinds.values())
    n = args.steps
    print(
        f"threads={torch.get_num_threads()} steps={n} micro_batch={args.micro} max_seq_len={args.seq} packed rows, "
        f"lora.dropout={args.dropout} loss_impl={args.loss_impl}; median step {statistics.median(times):.2f}s"
    )
    print("\n| kind of work | s/step | share |\n|---|---:|---:|")
    for kind, seconds in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print(f"| {kind} | {seconds / n:.3f} | {seconds / total:.1%} |")
    print(f"sums over ranks per step (one all-reduce each under torchrun): {collectives}")
    print("\ntop operators by self time:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
