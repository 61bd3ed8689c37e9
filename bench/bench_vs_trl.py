"""TRL's SFTTrainer against `sft train` on the same rows, model and LoRA settings: trained tokens/s, peak RSS.

The rows are sft's own tokenization of the built-in data (chat template, answer-only labels, max length 512),
handed to TRL as a pre-tokenized data set (`input_ids` + `labels`, which TRL uses as they are), so both
train the same tokens. Model: the built-in SmolLM2-135M-Instruct in fp32; LoRA r=16, alpha 32, all linear
layers, dropout 0; AdamW lr 2e-4 constant, no warm-up, clipping at 1.0; 4 per micro-batch, no accumulation.
Layouts: padded (one sample per row) and packed (TRL: best-fit packing to 512 + padding-free, the 4 packed
rows of a micro-batch flattened into one row; sft: rows mode, 4 rows of 512).

Each run is a fresh process (peak RSS = that process's high-water mark, `ru_maxrss` from wait4); runs of
the layouts alternate, round after round, because the machine is noisy. Trained tokens/s = the tokens with
a label in steps 2..N divided by the wall time of those steps (step 1 pays one-time costs), for both tools
measured from the end of one optimizer step to the end of the next (data, forward, backward, step).

Needs TRL (the `bench` extra: pip install -e .[bench]).

    python bench/bench_vs_trl.py [--steps 12] [--rounds 2] [--runs "trl padded,sft packed"]

A run may carry options after its layout, to compare variants in alternation: recipe overrides for sft,
`SFTConfig` fields for TRL (values read as YAML):

    python bench/bench_vs_trl.py --runs "sft packed,sft packed train.compile=true"
    python bench/bench_vs_trl.py --runs "trl padded,trl padded gradient_checkpointing=false"

Mind TRL's defaults: TRL 1.16's `SFTConfig` turns gradient checkpointing ON unless told otherwise, sft leaves
it off unless the recipe sets `model.gradient_checkpointing=true`. A bare "trl padded" is TRL as its users
get it (checkpointing on); compare like with like by naming the setting on one side or the other.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MAX_LEN = 512
MICRO = 4
LR = 2e-4
RUNS = ["trl padded", "sft padded", "trl packed", "sft packed"]


def sft_overrides(layout: str, steps: int, out: Path, extra: list[str]) -> list[str]:
    return [
        "model=builtin:smollm2-135m-instruct",
        "method=lora",
        "lora.r=16",
        "lora.alpha=32",
        "lora.dropout=0.0",
        "lora.target_modules=all-linear",
        "data.train=builtin:jargon/train",
        "data.eval=[]",
        f"data.max_seq_len={MAX_LEN}",
        f"data.packing={'true' if layout == 'packed' else 'false'}",
        f"optim.lr={LR}",
        "optim.scheduler=constant",
        "optim.warmup_steps=0",
        "optim.max_grad_norm=1.0",
        f"train.micro_batch_size={MICRO}",
        "train.grad_accum=1",
        f"train.max_steps={steps}",
        "train.precision=fp32",
        "train.device=cpu",
        "eval.prompts=[]",
        "checkpoint.every=null",
        "logging.wandb.mode=disabled",
        "logging.progress=false",
        f"output_dir={out}",
        *extra,
    ]


def child_sft(layout: str, steps: int, extra: list[str]) -> dict[str, Any]:
    from sft.config import load_recipe
    from sft.train import train

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        train(load_recipe(None, sft_overrides(layout, steps, out, extra)))
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "train/step_time_s" in r]
    return {
        "tokens": sum(r["train/trained_tokens"] for r in rows[1:]),
        "seconds": sum(r["train/step_time_s"] for r in rows[1:]),
        "first_step_s": rows[0]["train/step_time_s"],  # with train.compile=true: compiling included
    }


def same_rows() -> list[dict[str, list[int]]]:
    """sft's tokenized training samples (input ids and aligned labels, -100 where nothing is trained)."""
    from sft.config import load_recipe
    from sft.data.indexed import IndexedSamples
    from sft.data.pipeline import DataPipeline
    from sft.model.load import load_tokenizer

    recipe = load_recipe(None, sft_overrides("padded", 1, Path("unused"), []))
    steps = DataPipeline(recipe, load_tokenizer(recipe.model)).steps
    assert isinstance(steps, IndexedSamples)  # padded: the samples held in memory
    store = steps.corpus.store
    rows = []
    for i in range(len(store)):
        ids, labels = store.ids_labels(i)
        rows.append({"input_ids": ids.tolist(), "labels": labels.tolist()})
    return rows


def child_trl(layout: str, steps: int, options: list[str]) -> dict[str, Any]:
    import torch
    import yaml
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from sft.config import ModelConfig
    from sft.model.builtin import builtin_model_dir
    from sft.model.load import load_tokenizer

    path = builtin_model_dir("builtin:smollm2-135m-instruct")
    tokenizer = load_tokenizer(ModelConfig())
    packed = layout == "packed"
    trained: list[int] = []

    ends: list[float] = []

    class Timing(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            ends.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as tmp:
        config = SFTConfig(
            output_dir=tmp,
            per_device_train_batch_size=MICRO,
            gradient_accumulation_steps=1,
            max_steps=steps,
            learning_rate=LR,
            lr_scheduler_type="constant",
            warmup_steps=0,
            max_grad_norm=1.0,
            weight_decay=0.0,
            max_length=MAX_LEN,
            packing=packed,
            padding_free=packed,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            bf16=False,
            fp16=False,
            dataloader_num_workers=0,
            seed=0,
            disable_tqdm=True,
            **{key: yaml.safe_load(value) for key, value in (o.split("=", 1) for o in options)},
        )
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        trainer = SFTTrainer(
            model=model,
            args=config,
            train_dataset=Dataset.from_list(same_rows()),
            processing_class=tokenizer,
            peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"),
            callbacks=[Timing()],
        )
        collate = trainer.data_collator  # TRL's own (it refuses a custom one with padding-free): counted

        def counting(examples: list[dict[str, Any]]) -> dict[str, Any]:
            batch = collate(examples)
            trained.append(int((batch["labels"][:, 1:] != -100).sum()))
            return batch

        trainer.data_collator = counting
        trainer.train()
    # trained[k] is the batch of step k+1 (the dataloader may fetch one batch ahead: ignore the extra)
    return {"tokens": sum(trained[1:steps]), "seconds": ends[steps - 1] - ends[0], "first_step_s": None}


def run_child(tool: str, layout: str, steps: int, extra: list[str]) -> dict[str, Any]:
    """One run in a fresh process; its peak RSS from the kernel (wait4's rusage of that child).

    `extra`: recipe overrides for sft, SFTConfig fields for TRL (both as key=value)."""
    cmd = [sys.executable, __file__, "--child", tool, layout, "--steps", str(steps)]
    cmd += [f"--child-option={o}" for o in extra]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env, cwd=REPO)
        out = proc.stdout.read() if proc.stdout else ""
        _, status, usage = os.wait4(proc.pid, 0)
        if status != 0:
            log.seek(0)
            raise SystemExit(f"{tool} {layout} failed:\n{log.read()[-3000:]}")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_gib"] = usage.ru_maxrss * 1024 / 2**30
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--runs",
        default=",".join(RUNS),
        help="comma-separated, from: " + ", ".join(RUNS) + " (an sft run may add key=value overrides)",
    )
    parser.add_argument(
        "--sft-override", action="append", default=[], help="an extra key=value for the sft runs"
    )
    parser.add_argument("--child", nargs=2, metavar=("TOOL", "LAYOUT"), help=argparse.SUPPRESS)
    parser.add_argument("--child-option", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        tool, layout = args.child
        result = (
            child_trl(layout, args.steps, args.child_option)
            if tool == "trl"
            else child_sft(layout, args.steps, args.child_option)
        )
        print(json.dumps(result))
        return

    runs = [r.strip() for r in args.runs.split(",")]
    results: dict[str, list[dict[str, Any]]] = {r: [] for r in runs}
    for round_ in range(args.rounds):
        for run in runs if round_ % 2 == 0 else reversed(runs):
            tool, layout, *options = run.split()  # "sft packed key=value ...": a variant of a run
            shared = args.sft_override if tool == "sft" else []
            r = run_child(tool, layout, args.steps, [*shared, *options])
            r["tokens_per_s"] = r["tokens"] / r["seconds"]
            results[run].append(r)
            print(
                f"[round {round_ + 1}] {run}: {r['tokens_per_s']:.1f} trained tokens/s, "
                f"peak RSS {r['peak_rss_gib']:.2f} GiB",
                flush=True,
            )
    print(
        f"\n{args.steps} steps, micro-batch {MICRO}, max length {MAX_LEN}, {args.rounds} rounds; "
        f"sft overrides: {args.sft_override or 'none'}"
    )
    print(
        "\n| run | trained tokens/s (each round) | peak RSS GiB (each round) | first step s (each round) |"
        "\n|---|---|---|---|"
    )
    for run, rs in results.items():
        tps = " / ".join(f"{r['tokens_per_s']:.0f}" for r in rs)
        rss = " / ".join(f"{r['peak_rss_gib']:.2f}" for r in rs)
        first = " / ".join(f"{r['first_step_s']:.1f}" for r in rs if r["first_step_s"] is not None) or "-"
        print(f"| {run} | {tps} | {rss} | {first} |")
    mean = {run: sum(r["tokens_per_s"] for r in rs) / len(rs) for run, rs in results.items() if rs}
    best = {
        tool: max((v for run, v in mean.items() if run.startswith(tool)), default=0.0)
        for tool in ("sft", "trl")
    }
    if best["trl"] and best["sft"]:
        print(
            f"\nbest sft layout / best TRL layout (mean trained tokens/s over rounds): {best['sft'] / best['trl']:.2f}x"
        )


if __name__ == "__main__":
    main()
