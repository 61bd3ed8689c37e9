"""Step time and per-rank memory of each strategy on CPU: single process vs FSDP2 and ZeRO-1/2/3 on N ranks.

Same random Llama model, same global batch (random tokens), same optimizer, through the strategy protocol
the training loop uses (prepare, accumulating, backward, step). Bytes per rank are counted from the local
tensors each backend keeps (parameters, gradients just before the step, optimizer state, fp32 master copy)
and compared with the theory for P bytes of fp32 parameters on N ranks. Prints a markdown table.

    python bench/bench_strategies.py [--nproc 2] [--hidden 256] [--layers 4] [--seq 256] [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
STRATEGIES = ["fsdp2", "zero1", "zero2", "zero3"]
# Theory, in units of P (fp32 parameter bytes): params, grads before the step, optimizer state, master copy.
THEORY = {
    "single": (1, 1, 2, 0),
    "fsdp2": ("1/N", "1/N", "2/N", 0),
    "zero1": (1, 1, "2/N", "1/N"),
    "zero2": (1, "1/N", "2/N", "1/N"),
    "zero3": ("1/N", "1/N", "2/N", "1/N"),
}


def nbytes(tensors: Any) -> int:
    """Bytes of the distinct storages behind `tensors` (views into one flat buffer count once)."""
    from torch.distributed.tensor import DTensor

    seen: dict[int, int] = {}
    for t in tensors:
        if t is None:
            continue
        if isinstance(t, DTensor):
            t = t.to_local()
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def overrides(name: str, micro: int, accum: int) -> list[str]:
    strat = {"single": [], "fsdp2": ["strategy.name=fsdp2"]}.get(
        name, ["strategy.name=deepspeed", f"strategy.deepspeed.zero_stage={name[-1]}"]
    )
    return [*strat, "method=full", f"train.micro_batch_size={micro}", f"train.grad_accum={accum}"]


def measure(name: str, args: argparse.Namespace, model_dir: str, world: int) -> dict[str, Any]:
    import torch

    from sft.config import validate_recipe
    from sft.dist import init_dist
    from sft.loss import loss_sum
    from sft.strategies import build_strategy

    micro = args.global_batch // (world * args.accum)
    raw: dict[str, Any] = {"model": model_dir, "train": {"device": "cpu"}, "optim": {"lr": 1e-4}}
    from sft.config import apply_override

    for item in overrides(name, micro, args.accum):
        apply_override(raw, item)
    recipe = validate_recipe(raw)
    dist = init_dist("cpu")
    torch.manual_seed(0)
    strategy = build_strategy(recipe, dist)
    model, optimizer = strategy.prepare(strategy.build_model())
    engine_opt = getattr(model, "optimizer", None)  # DeepSpeed's ZeRO optimizer, if any

    inner = getattr(model, "module", model)

    def params_bytes() -> int:
        return nbytes(getattr(p, "ds_tensor", p) for p in inner.parameters())

    def grads_bytes() -> int:
        grads = [p.grad for p in inner.parameters()]
        if engine_opt is not None:  # ZeRO keeps reduced gradient partitions in its own buffers
            for group in (getattr(engine_opt, "averaged_gradients", None) or {}).values():
                grads += list(group or [])
            grads.append(getattr(engine_opt, "grad_partitions_flat_buffer", None))
        return nbytes(grads)

    def optim_bytes() -> tuple[int, int]:
        state = nbytes(
            v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.ndim
        )
        master: list[Any] = []
        if engine_opt is not None:  # ZeRO's fp32 copy of this rank's partition, stepped by the optimizer
            for attr in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
                master += list(getattr(engine_opt, attr, None) or [])
        return state, nbytes(master)

    g = torch.Generator().manual_seed(dist.rank)
    batches = [
        {
            "input_ids": (ids := torch.randint(0, 1000, (micro, args.seq), generator=g)),
            "labels": ids.clone(),
            "attention_mask": torch.ones_like(ids),
        }
        for _ in range(args.accum)
    ]
    targets = float(args.global_batch * (args.seq - 1))
    times, grads = [], 0
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        for a, batch in enumerate(batches):
            with strategy.accumulating(model, last_micro_batch=a == len(batches) - 1):
                strategy.backward(loss_sum(model, batch, "fp32") / targets)
        grads = grads_bytes()
        strategy.step(optimizer, 1.0)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    state, master = optim_bytes()
    return {
        "name": name,
        "world": world,
        "step_s": statistics.median(times),
        "params": params_bytes(),
        "grads": grads,
        "optim": state,
        "master": master,
    }


def child(args: argparse.Namespace) -> None:
    world = int(os.environ.get("WORLD_SIZE", 1))
    names = ["single"] if world == 1 else STRATEGIES
    results = [measure(n, args, args.model_dir, world) for n in names]
    if int(os.environ.get("RANK", 0)) == 0:
        Path(args.out).write_text(json.dumps(results))


def make_model(args: argparse.Namespace, out: Path) -> int:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from sft.model.builtin import builtin_model_dir

    tok = AutoTokenizer.from_pretrained(builtin_model_dir("builtin:smollm2-135m-instruct"))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=args.hidden,
        intermediate_size=int(args.hidden * 2.6875),
        num_hidden_layers=args.layers,
        num_attention_heads=max(args.hidden // 64, 1),
        num_key_value_heads=max(args.hidden // 64, 1),
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def fmt(n: float) -> str:
    return f"{n / 2**20:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="OMP threads per process (1: N ranks use N cores)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return

    from sft.strategies.deepspeed import prebuild_ops

    prebuild_ops(offload=False)  # DeepSpeed's CPU collectives op: compiled once, outside the timing
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        n_params = make_model(args, model_dir)
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        common = [f"--model-dir={model_dir}", f"--hidden={args.hidden}", f"--seq={args.seq}"]
        common += [f"--global-batch={args.global_batch}", f"--accum={args.accum}"]
        common += [f"--steps={args.steps}", f"--warmup={args.warmup}", "--child"]
        results = []
        for nproc, out in ((1, Path(tmp) / "one.json"), (args.nproc, Path(tmp) / "many.json")):
            launcher = (
                [sys.executable]
                if nproc == 1
                else [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--standalone",
                    f"--nproc_per_node={nproc}",
                ]
            )
            subprocess.run([*launcher, __file__, *common, f"--out={out}"], check=True, env=env, cwd=REPO)
            results += json.loads(out.read_text())

    p_bytes = n_params * 4
    base = results[0]["step_s"]
    print(
        f"\nStrategies on CPU: random Llama {n_params / 1e6:.1f}M parameters (P = {fmt(p_bytes)} MiB fp32), "
        f"global batch {args.global_batch} x {args.seq} tokens (accumulation {args.accum}), "
        f"N = {args.nproc} ranks, {args.threads} thread(s) per process on {os.cpu_count()} cores; median of "
        f"{args.steps} steps. Bytes from local tensors (distinct storages) after the last micro-batch's backward "
        "(gradients) and after the step (optimizer state).\n"
    )
    print(
        "| strategy | ranks | step s | vs 1 process | params MiB/rank | grads MiB/rank | optim state MiB/rank "
        "| fp32 master MiB/rank | theory (params, grads, optim, master) in P |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        theory = ", ".join(str(x) for x in THEORY[r["name"]])
        print(
            f"| {r['name']} | {r['world']} | {r['step_s']:.3f} | {r['step_s'] / base:.2f}x | {fmt(r['params'])} "
            f"| {fmt(r['grads'])} | {fmt(r['optim'])} | {fmt(r['master'])} | {theory} |"
        )


if __name__ == "__main__":
    main()
