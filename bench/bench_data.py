"""Data pipeline benchmark: tokenize + pack speed, padding with and without packing, packed vs padded training.

1. rows/s to tokenize (chat template + loss mask, or raw text + split) and to pack (rows mode, the default)
   + collate every step of an epoch, on >= 10k rows (the built-in data repeated), without the cache;
2. the padding fraction of the built-in data, padded vs packed rows (packing_mode=rows) vs each step's
   samples packed among themselves (packing_mode=batch; and by plain best-fit decreasing for comparison)
   at a few batch shapes;
3. trained tokens/s of a few LoRA steps on the built-in model at the same train.micro_batch_size: padded
   samples, packed rows, one step's samples packed (the padded run's very samples), and packed rows as one
   flat row (flash attention's layout, run by sdpa here).

    python bench/bench_data.py [--rows 10000] [--steps 4] [--micro 8] [--seq 512]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]


def recipe(*overrides: str) -> Any:
    from sft.config import load_recipe

    return load_recipe(REPO / "recipes" / "quickstart.yaml", ["data.eval=[]", "data.cache=false", *overrides])


def repeated_file(spec: str, rows: int, folder: Path) -> Path:
    from sft.data.sources import resolve_path

    lines = [line for line in resolve_path(spec).read_text().splitlines() if line.strip()]
    out = folder / (spec.replace(":", "_").replace("/", "_") + ".jsonl")
    out.write_text("\n".join(lines[i % len(lines)] for i in range(rows)) + "\n")
    return out


def tokenize_and_pack_speed(tokenizer: Any, args: argparse.Namespace) -> None:
    from sft.data.collate import pack_collate
    from sft.data.mixture import Mixture
    from sft.data.prepare import read_source
    from sft.data.sampler import RowSampler
    from sft.data.sources import open_source

    print(f"\n## tokenize + pack, {args.rows} rows, max_seq_len {args.seq}, {args.micro} samples per step\n")
    print("| data | tokenize rows/s | pack+collate samples/s | tokenize+pack rows/s | samples | tokens |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        for spec, extra in [
            ("builtin:jargon/train", []),
            ("builtin:shakespeare/train", ["data.on_overflow=split"]),
        ]:
            path = repeated_file(spec, args.rows, Path(tmp))
            r = recipe(f"data.train={path}", f"data.max_seq_len={args.seq}", *extra)
            start = time.perf_counter()
            store, stats = read_source(open_source(r.data.train[0]), tokenizer, r.data)
            t_tok = time.perf_counter() - start
            start = time.perf_counter()
            train = r.train.model_copy(update={"micro_batch_size": args.micro, "grad_accum": 1})
            sampler = RowSampler(Mixture([len(store)]), store.lengths, args.seq, 2048, train)
            for step in range(sampler.steps_per_epoch):
                for mb in sampler.micro_batches(step):
                    pack_collate([[store.ids_labels(i) for i in row] for row in mb], 0)
            t_pack = time.perf_counter() - start
            n = len(store)
            print(
                f"| {spec} | {stats.rows / t_tok:,.0f} | {n / t_pack:,.0f} | {stats.rows / (t_tok + t_pack):,.0f} "
                f"| {stats.samples:,} | {stats.tokens:,} |"
            )


def padding_table(tokenizer: Any) -> None:
    from sft.data.indexed import IndexedSamples
    from sft.data.pack import best_fit, deal, slots
    from sft.data.pipeline import DataPipeline

    print("\n## padding fraction (first 200 steps of epoch 0, one rank)\n")
    print(
        "| data | max_seq_len | micro x accum | padded | packed rows | step's samples packed | same, best-fit decreasing |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    cases = [
        ("builtin:jargon/train", 512, 8, 1),
        ("builtin:jargon/train", 512, 8, 4),
        ("builtin:jargon/train", 1024, 8, 1),
        ("builtin:jargon/train", 2048, 16, 1),
        ("builtin:shakespeare/train", 512, 8, 1),
        ("builtin:shakespeare/train", 512, 8, 4),
        ("builtin:shakespeare/train", 512, 32, 1),
    ]
    for spec, seq, micro, accum in cases:
        common = [
            f"data.train={spec}",
            f"data.max_seq_len={seq}",
            f"train.micro_batch_size={micro}",
            f"train.grad_accum={accum}",
            "data.on_overflow=split",
            "data.cache=true",
        ]
        padded = DataPipeline(recipe(*common), tokenizer)
        packed = DataPipeline(recipe(*common, "data.packing=true"), tokenizer)
        batch = DataPipeline(recipe(*common, "data.packing=true", "data.packing_mode=batch"), tokenizer)
        steps = padded.steps
        assert isinstance(steps, IndexedSamples)
        real = total = 0
        for step in range(min(200, steps.steps_per_epoch)):
            lengths = [
                int(steps.corpus.store.lengths[i]) for mb in steps.sampler.micro_batches(step) for i in mb
            ]
            real += sum(lengths)
            total += slots(deal(best_fit(lengths, seq), accum), lengths)
        print(
            f"| {spec} | {seq} | {micro} x {accum} | {steps.padding_fraction():.1%} "
            f"| {packed.steps.padding_fraction():.1%} | {batch.steps.padding_fraction():.1%} | {1 - real / total:.1%} |"
        )


def training_speed(tokenizer: Any, args: argparse.Namespace) -> None:
    from sft.data.chat import trained_tokens
    from sft.data.pipeline import DataPipeline
    from sft.loss import loss_sum
    from sft.model.load import add_lora, load_model

    print(
        f"\n## LoRA training on the built-in model: {args.steps} steps (after 1 warm-up), "
        f"train.micro_batch_size {args.micro}, max_seq_len {args.seq}, {torch.get_num_threads()} threads\n"
    )
    common = [f"data.max_seq_len={args.seq}", f"train.micro_batch_size={args.micro}", "data.cache=true"]
    packed = [*common, "data.packing=true"]
    # Rows at half the micro batch too: about the padded batch's token slots per micro-batch (on this CPU the
    # per-token speed falls as a micro-batch grows past ~2k tokens: memory-bound ops leave the caches).
    half = [
        f"data.max_seq_len={args.seq}",
        f"train.micro_batch_size={max(1, args.micro // 2)}",
        "data.packing=true",
    ]
    layouts = {
        "padded samples": DataPipeline(recipe(*common), tokenizer),
        "packed rows": DataPipeline(recipe(*packed), tokenizer),
        "packed rows, half the rows": DataPipeline(recipe(*half), tokenizer),
        "step's samples packed": DataPipeline(recipe(*packed, "data.packing_mode=batch"), tokenizer),
        # flash attention's layout, here run by sdpa on CPU
        "half the rows, as one flat row": DataPipeline(recipe(*half), tokenizer, flat=True),
    }
    layouts = {name: data for name, data in layouts.items() if args.layouts is None or name in args.layouts}
    r = recipe(*common)
    torch.manual_seed(0)
    model = add_lora(load_model(r.model, torch.device("cpu")), r.lora)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times: dict[str, list[float]] = {name: [] for name in layouts}
    trained: dict[str, list[int]] = {name: [] for name in layouts}
    slots: dict[str, list[int]] = {name: [] for name in layouts}
    shapes: dict[str, set[str]] = {name: set() for name in layouts}
    # The layouts take turns on each step (same samples), so a busy machine slows them alike.
    for step in range(args.steps + 1):
        for name, data in layouts.items():
            batches = data.micro_batches(step)
            start = time.perf_counter()
            targets = sum(trained_tokens(b["labels"]) for b in batches)
            for b in batches:
                (loss_sum(model, b, "fp32") / targets).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step:  # the first step pays one-time costs
                times[name].append(time.perf_counter() - start)
                trained[name].append(targets)
                slots[name].append(sum(b["input_ids"].numel() for b in batches))
                shapes[name] |= {"x".join(map(str, b["input_ids"].shape)) for b in batches}
    print(
        "| layout | batch shapes | token slots/step | trained tokens/step | median s/step | slots/s "
        "| trained tokens/s | vs padded |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    base = None
    for name in layouts:
        median = statistics.median(times[name])
        speed = sum(trained[name]) / sum(times[name])  # over all timed steps: long and short ones alike
        base = base or speed
        print(
            f"| {name} | {', '.join(sorted(shapes[name]))[:40]} | {statistics.mean(slots[name]):,.0f} "
            f"| {statistics.mean(trained[name]):,.0f} | {median:.2f} | {sum(slots[name]) / sum(times[name]):,.0f} "
            f"| {speed:,.0f} | {speed / base:.2f}x |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--micro", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--skip", nargs="*", default=[], choices=["speed", "padding", "train"])
    parser.add_argument(
        "--layouts", nargs="*", help="train only these layouts (names as printed; default all)"
    )
    args = parser.parse_args()
    from sft.model.load import load_tokenizer

    tokenizer = load_tokenizer(recipe().model)
    print(json.dumps({"threads": torch.get_num_threads(), **vars(args)}))
    if "speed" not in args.skip:
        tokenize_and_pack_speed(tokenizer, args)
    if "padding" not in args.skip:
        padding_table(tokenizer)
    if "train" not in args.skip:
        training_speed(tokenizer, args)


if __name__ == "__main__":
    main()
