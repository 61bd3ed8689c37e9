"""Peak host memory per rank while loading and while exporting a sharded model, and time to the first step.

For each world size (torchrun on this CPU, gloo) and strategy (FSDP2, ZeRO-3), every rank measures its own
resident memory: the peak while the model's weights are put in place (`strategy.build_model`, and FSDP2's
`prepare`, which shards and fills; its optimizer state comes at the first step), DeepSpeed's engine apart
(`prepare` for ZeRO-3: this rank's fp32 master, AdamW moments and gradient partitions, 1/N of each by design),
then the peak while the final model is exported (`strategy.export`), each as the rise over the resident memory
just before (Linux: the high-water mark is reset through /proc/self/clear_refs). glibc's heap keeps freed
tensors' memory mapped (and reuses it unseen by the peak), so every process uses a fixed mmap threshold of
1 MiB: each tensor gets its own mapping, returned when it is freed, and the peaks count live tensors. The
model's bytes are its safetensors files. The modules the loading paths import lazily are imported before any
measurement (code, not model: ~150 MiB). `--repo` measures another checkout (e.g. the code before sharded
loading) with the same script.

    python bench/bench_sharded_memory.py [--model builtin | --model random --hidden 2048 --layers 12]
        [--worlds 1 2 4] [--strategies fsdp2 zero3] [--repo PATH] [--json OUT]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
LIBC = ctypes.CDLL("libc.so.6")


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


class Peak:
    """The rise of this process's resident memory over its level at entry, at its highest inside the block."""

    def __enter__(self) -> Peak:
        gc.collect()
        LIBC.malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark (VmHWM) to the current RSS
        self.start = rss_kib("VmRSS")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bytes = (rss_kib("VmHWM") - self.start) * 1024


def child(args: argparse.Namespace) -> None:
    LIBC.mallopt(M_MMAP_THRESHOLD, MIB)
    import torch
    import torch.distributed.checkpoint  # noqa: F401  (imports that load lazily, outside the measurement)
    from transformers import AutoTokenizer, LlamaForCausalLM  # noqa: F401

    from sft.config import validate_recipe
    from sft.dist import init_dist
    from sft.loss import loss_sum
    from sft.strategies import build_strategy

    dist = init_dist("cpu")
    # Code, not model memory: modules the loading paths import lazily (~150 MiB), and DeepSpeed's process group.
    from transformers.models.llama import modeling_llama  # noqa: F401

    with contextlib.suppress(ImportError):  # (the code before sharded loading has no sft.model.sharded)
        import sft.model.sharded  # noqa: F401

    if "zero3" in args.strategies:
        import deepspeed
        import transformers.integrations.deepspeed  # noqa: F401

        deepspeed.init_distributed(dist_backend="gloo")
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model_bytes = sum(f.stat().st_size for f in Path(args.model_dir).glob("*.safetensors"))
    rows = []
    for name in args.strategies:
        strategy_cfg = (
            {"name": "fsdp2"} if name == "fsdp2" else {"name": "deepspeed", "deepspeed": {"zero_stage": 3}}
        )
        raw = {
            "model": args.model_dir,
            "method": "full",
            "train": {"device": "cpu", "micro_batch_size": 1, "grad_accum": 1, "max_steps": 1},
            "strategy": strategy_cfg,
        }
        recipe = validate_recipe(raw)
        strategy = build_strategy(recipe, dist)
        started = time.perf_counter()
        with Peak() as load:
            # The code before sharded loading built the whole model on every rank first.
            build = getattr(strategy, "build_model", None)
            if build is None:
                from sft.model import build_model

                model = build_model(recipe, dist.device)
            else:
                model = build()
            if (
                name == "fsdp2"
            ):  # FSDP2 shards and fills in prepare; its optimizer state comes at the first step
                model, optimizer = strategy.prepare(model)
        if name == "zero3":  # the engine: this rank's fp32 master, AdamW moments and gradient partitions
            with Peak() as engine:
                model, optimizer = strategy.prepare(model)
        loaded = time.perf_counter() - started
        step_s = None
        if args.step:
            ids = torch.randint(0, 1000, (1, 64), generator=torch.Generator().manual_seed(dist.rank))
            batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
            with strategy.accumulating(model, last_micro_batch=True):
                strategy.backward(loss_sum(model, batch, "fp32") / (63 * dist.world_size))
            strategy.step(optimizer, 1.0)
            step_s = time.perf_counter() - started
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "export"
            if dist.is_main:
                folder.mkdir()
            torch.distributed.barrier()
            with Peak() as export:
                strategy.export(folder, model, tokenizer)
            torch.distributed.barrier()
            written = sum(f.stat().st_size for f in folder.glob("*.safetensors")) if dist.is_main else 0
        rows.append(
            {
                "strategy": name,
                "world": dist.world_size,
                "rank": dist.rank,
                "model_bytes": model_bytes,
                "load_peak": load.bytes,
                "engine_peak": engine.bytes if name == "zero3" else None,
                "load_s": loaded,
                "first_step_s": step_s,
                "export_peak": export.bytes,
                "export_written": written,
            }
        )
        del model, optimizer, strategy
        gc.collect()
    gathered: list[Any] = [None] * dist.world_size
    torch.distributed.all_gather_object(gathered, rows)
    if dist.is_main:
        Path(args.out).write_text(json.dumps([r for part in gathered for r in part]))


def random_model(hidden: int, layers: int) -> Path:
    """A random Llama with the built-in tokenizer, saved once under the cache."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from sft.model.builtin import builtin_model_dir
    from sft.paths import cache_root

    out = cache_root() / "bench" / f"random-llama-h{hidden}-l{layers}"
    if (out / "config.json").is_file():
        return out
    tokenizer = AutoTokenizer.from_pretrained(builtin_model_dir("builtin:smollm2-135m-instruct"))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.6875),
        num_hidden_layers=layers,
        num_attention_heads=max(hidden // 64, 1),
        num_key_value_heads=max(hidden // 256, 1),
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def measure(args: argparse.Namespace, model_dir: Path, world: int, repo: Path) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]
        cmd += [str(Path(__file__).resolve()), "--child", f"--model-dir={model_dir}", f"--out={out}"]
        cmd += ["--strategies", *args.strategies, "--step" if args.step else "--no-step"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo), "HF_HUB_OFFLINE": "1"}
        subprocess.run(cmd, check=True, env=env, cwd=repo)
        rows: list[dict[str, Any]] = json.loads(out.read_text())
        return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["builtin", "random"], default="builtin")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--strategies", nargs="+", default=["fsdp2", "zero3"], choices=["fsdp2", "zero3"])
    ap.add_argument("--step", action=argparse.BooleanOptionalAction, default=True, help="time one step")
    ap.add_argument("--repo", type=Path, default=REPO, help="the checkout whose code is measured")
    ap.add_argument("--label", default="after")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    sys.path.insert(0, str(REPO))
    if args.model == "builtin":
        from sft.model.builtin import builtin_model_dir

        model_dir = builtin_model_dir("builtin:smollm2-135m-instruct")
    else:
        model_dir = random_model(args.hidden, args.layers)
    from sft.strategies.deepspeed import prebuild_ops

    prebuild_ops(offload=False)
    rows = [r for world in args.worlds for r in measure(args, model_dir, world, args.repo.resolve())]
    for r in rows:
        r["label"] = args.label
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    size = rows[0]["model_bytes"]
    print(f"\n{model_dir.name}: {size / MIB:.0f} MiB of safetensors; code: {args.label} ({args.repo})\n")
    print(
        "| strategy | ranks | rank | load peak MiB | load / model | ZeRO-3 engine MiB | export peak MiB "
        "| export / model | load s | first step s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["strategy"], r["world"], r["rank"])):
        step = f"{r['first_step_s']:.1f}" if r["first_step_s"] is not None else "-"
        engine = f"{r['engine_peak'] / MIB:.0f}" if r["engine_peak"] is not None else "-"
        print(
            f"| {r['strategy']} | {r['world']} | {r['rank']} | {r['load_peak'] / MIB:.0f} | {r['load_peak'] / size:.2f} "
            f"| {engine} | {r['export_peak'] / MIB:.0f} | {r['export_peak'] / size:.2f} | {r['load_s']:.1f} | {step} |"
        )


if __name__ == "__main__":
    main()
