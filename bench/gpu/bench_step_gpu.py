"""The step on one GPU, with random weights (nothing downloaded): one prepared script, three parts, ~6 min on an H200.

1. LoRA on a Llama-3.2-1B-shaped model in bf16 (r=16, all linear layers, dropout 0), 4 packed rows of 2048
   tokens: trained tokens/s and peak memory (torch.cuda.max_memory_allocated) of sft's step with the chunked
   loss, the full-logits loss, torch.compile, gradient checkpointing, activation offloading (with and without
   checkpointing), and TRL's SFTTrainer on the same rows (packed, padding-free) when TRL is installed.
2. QLoRA, Llama-3.1-8B-shaped, seq 2048 x batch 2 (bench/gpu/bench_qlora.py, with the chunked loss).
3. Full fine-tuning of the 1B shape under FSDP2 (one process, bf16 compute, fp32 weights): tokens/s and MFU.

    python bench/gpu/bench_step_gpu.py --json $OUT/step_gpu.json      # on the GPU machine
    python bench/gpu/bench_step_gpu.py --tiny                           # dry run of the same code on CPU (~1 min)

The lent GPU machine has torch, transformers and peft but not bitsandbytes, pydantic, datasets or TRL; carry
the wheels in the working tree (64 MiB per call in all) and install them into a folder on the path:
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 -d .whl \\
        bitsandbytes==0.50.2 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \\
        PYTHONPATH=/tmp/site:. python3 bench/gpu/bench_step_gpu.py --json $OUT/step_gpu.json
TRL needs `datasets` and pyarrow (~45 MB) besides itself: without them part 1 reports TRL as not run.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo

GIB = 1024**3
LLAMA_32_1B = dict(  # meta-llama/Llama-3.2-1B's config.json, shapes only
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    tie_word_embeddings=True,
)
TINY = dict(
    vocab_size=4096,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    tie_word_embeddings=True,
)
H200_BF16_TFLOPS = 989.0  # dense bf16 peak of an H100/H200 SXM


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.tiny = args.tiny
        self.device = torch.device("cpu" if args.tiny else "cuda")
        self.shape = TINY if args.tiny else LLAMA_32_1B
        self.rows, self.width = (2, 128) if args.tiny else (4, 2048)
        self.steps, self.warmup = (2, 1) if args.tiny else (args.steps, 2)
        self.results: dict[str, Any] = {
            "device": "cpu (dry run)" if args.tiny else torch.cuda.get_device_name()
        }
        self.json = args.json
        g = torch.Generator().manual_seed(0)
        self.samples = self._samples(g)

    def _samples(self, g: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Random "conversations" of 1/8 to 1/2 row each: the first 40% prompt (no loss), the rest answer."""
        out = []
        total = self.rows * self.width * (self.steps + self.warmup)
        while total > 0:
            n = int(torch.randint(self.width // 8, self.width // 2, (1,), generator=g))
            ids = torch.randint(0, int(self.shape["vocab_size"]), (n,), generator=g)
            labels = ids.clone()
            labels[: max(1, int(0.4 * n))] = -100
            out.append((ids, labels))
            total -= n
        return out

    def packed_batches(self) -> list[dict[str, torch.Tensor]]:
        """The samples first-fit into rows of `width` (position ids restart per sample), `rows` per batch."""
        rows: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
        for s in self.samples:
            for row in rows:
                if sum(len(i) for i, _ in row) + len(s[0]) <= self.width:
                    row.append(s)
                    break
            else:
                rows.append([s])
        batches = []
        for b in range(0, len(rows) - self.rows + 1, self.rows):
            ids = torch.zeros(self.rows, self.width, dtype=torch.long)
            labels = torch.full_like(ids, -100)
            pos = torch.zeros_like(ids)
            for r, row in enumerate(rows[b : b + self.rows]):
                at = 0
                for i, lab in row:
                    ids[r, at : at + len(i)], labels[r, at : at + len(i)] = i, lab
                    pos[r, at : at + len(i)] = torch.arange(len(i))
                    at += len(i)
            batches.append({"input_ids": ids, "labels": labels, "position_ids": pos})
        return batches[: self.steps + self.warmup]

    def model(self, dtype: torch.dtype) -> Any:
        from transformers import AutoModelForCausalLM, LlamaConfig

        torch.manual_seed(0)
        with torch.device(self.device):
            model = AutoModelForCausalLM.from_config(
                LlamaConfig(**self.shape), dtype=dtype, attn_implementation="sdpa"
            )
        model.config.use_cache = False
        return model

    def reset_memory(self) -> None:
        gc.collect()
        if not self.tiny:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float | None:
        return None if self.tiny else torch.cuda.max_memory_allocated() / GIB

    def timed(self, step: Callable[[dict[str, torch.Tensor]], None]) -> tuple[float, float, float]:
        """(trained tokens/s and token slots/s over the timed steps, seconds of the warm-up steps)."""
        batches = [{k: v.to(self.device) for k, v in b.items()} for b in self.packed_batches()]
        start = time.perf_counter()
        for b in batches[: self.warmup]:
            step(b)
        self.sync()
        first = time.perf_counter() - start
        start = time.perf_counter()
        for b in batches[self.warmup :]:
            step(b)
        self.sync()
        seconds = time.perf_counter() - start
        trained = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches[self.warmup :])
        slots = sum(b["input_ids"].numel() for b in batches[self.warmup :])
        return trained / seconds, slots / seconds, first

    def sync(self) -> None:
        if not self.tiny:
            torch.cuda.synchronize()

    def record(self, part: str, name: str, **values: Any) -> None:
        self.results.setdefault(part, {})[name] = values
        shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
        print(f"[{part}] {name}: {shown}", flush=True)
        if self.json:
            self.json.parent.mkdir(parents=True, exist_ok=True)
            self.json.write_text(json.dumps(self.results, indent=2) + "\n")


def sft_lora_step(bench: Bench, loss_impl: str, compile: bool, checkpointing: bool, offload: bool) -> None:
    from sft.config import LoraConfig
    from sft.loss import loss_sum
    from sft.model.load import add_lora

    bench.reset_memory()
    model = bench.model(torch.float32 if bench.tiny else torch.bfloat16)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = add_lora(model, LoraConfig(r=16, alpha=32, dropout=0.0, target_modules="all-linear"))
    if compile:
        from sft.model.compile import compile_layers

        compile_layers(model, bench.device)
    if offload:
        from sft.model.offload import offload_activations

        offload_activations(model, bench.device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4)
    model.train()
    precision = "fp32" if bench.tiny else "bf16"

    def step(batch: dict[str, torch.Tensor]) -> None:
        targets = int((batch["labels"][:, 1:] != -100).sum())
        (loss_sum(model, batch, precision, loss_impl) / targets).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    tps, _, first = bench.timed(step)
    name = (
        f"sft {loss_impl}" + " +compile" * compile + " +checkpointing" * checkpointing + " +offload" * offload
    )
    bench.record("lora_1b", name, trained_tokens_per_s=tps, peak_gib=bench.peak_gib(), first_steps_s=first)


def trl_lora(bench: Bench) -> None:
    try:
        from datasets import Dataset
        from peft import LoraConfig
        from transformers import TrainerCallback
        from trl import SFTConfig, SFTTrainer
    except ImportError as e:
        bench.record("lora_1b", "TRL SFTTrainer", skipped=f"not installed ({e.name})")
        return
    import tempfile

    bench.reset_memory()
    rows = [{"input_ids": i.tolist(), "labels": lab.tolist()} for i, lab in bench.samples]
    ends: list[float] = []

    class Timing(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            bench.sync()
            ends.append(time.perf_counter())

    total = bench.steps + bench.warmup
    with tempfile.TemporaryDirectory() as tmp:
        config = SFTConfig(
            output_dir=tmp,
            per_device_train_batch_size=bench.rows,
            max_steps=total,
            learning_rate=2e-4,
            lr_scheduler_type="constant",
            max_length=bench.width,
            packing=True,
            padding_free=True,
            bf16=not bench.tiny,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_cpu=bench.tiny,
            disable_tqdm=True,
        )
        trainer = SFTTrainer(
            model=bench.model(torch.float32 if bench.tiny else torch.bfloat16),
            args=config,
            train_dataset=Dataset.from_list(rows),
            processing_class=stand_in_tokenizer(),
            callbacks=[Timing()],
            peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"),
        )
        trained: list[int] = []
        collate = trainer.data_collator

        def counting(examples: list[dict[str, Any]]) -> dict[str, Any]:
            batch = collate(examples)
            trained.append(int((batch["labels"][:, 1:] != -100).sum()))
            return batch

        trainer.data_collator = counting
        trainer.train()
    seconds = ends[total - 1] - ends[bench.warmup - 1]
    tps = sum(trained[bench.warmup : total]) / seconds
    bench.record(
        "lora_1b",
        "TRL SFTTrainer (packed, padding-free)",
        trained_tokens_per_s=tps,
        peak_gib=bench.peak_gib(),
    )


def stand_in_tokenizer() -> Any:
    """The rows are token ids already: TRL needs a tokenizer only for its pad and end-of-sequence ids."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")), pad_token="<pad>", eos_token="<eos>"
    )


def fsdp2_full(bench: Bench, peak_tflops: float) -> None:
    from sft.config import validate_recipe
    from sft.dist import DistEnv
    from sft.loss import loss_sum
    from sft.strategies.fsdp2 import FSDP2Strategy

    bench.reset_memory()
    recipe = validate_recipe(
        {
            "method": "full",
            "strategy": {"name": "fsdp2"},
            "train": {"precision": "fp32" if bench.tiny else "bf16"},
        }
    )
    dist = DistEnv(0, 0, 1, bench.device)
    model = bench.model(torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    strategy = FSDP2Strategy(recipe, dist)
    model, optimizer = strategy.prepare(model)
    model.train()

    def step(batch: dict[str, torch.Tensor]) -> None:
        targets = int((batch["labels"][:, 1:] != -100).sum())
        strategy.backward(loss_sum(model, batch, recipe.train.precision) / targets)
        strategy.step(optimizer, 1.0)

    _, tokens_per_s, _ = bench.timed(step)
    mfu = 6 * n_params * tokens_per_s / (peak_tflops * 1e12)  # 6N flops per token (forward + backward)
    bench.record(
        "full_fsdp2_1b",
        "sft fsdp2, bf16 compute, fp32 weights",
        tokens_per_s=tokens_per_s,
        mfu=mfu,
        peak_gib=bench.peak_gib(),
        params=n_params,
    )
    torch.distributed.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--tiny", action="store_true", help="tiny config on CPU: checks the code, measures nothing"
    )
    ap.add_argument("--steps", type=int, default=8, help="timed steps per variant (after 2 warm-up steps)")
    ap.add_argument("--parts", default="lora,qlora,fsdp2", help="which parts to run")
    ap.add_argument("--peak-tflops", type=float, default=H200_BF16_TFLOPS, help="the GPU's dense bf16 peak")
    ap.add_argument("--json", type=Path, help="write the results here (after every measurement)")
    args = ap.parse_args()
    if not args.tiny and not torch.cuda.is_available():
        sys.exit("no CUDA device; use --tiny for a CPU dry run")
    bench = Bench(args)
    parts = set(args.parts.split(","))
    started = time.perf_counter()
    if "lora" in parts:
        for loss_impl, comp, ckpt, off in [
            ("chunked", False, False, False),
            ("full", False, False, False),
            ("chunked", True, False, False),
            ("chunked", False, True, False),
            ("chunked", False, False, True),
            ("chunked", False, True, True),
        ]:
            if off and bench.tiny:
                continue  # offloading moves GPU memory: refused on a CPU
            sft_lora_step(bench, loss_impl, comp, ckpt, off)
        trl_lora(bench)
    if "qlora" in parts:
        sys.path.insert(0, str(Path(__file__).parent))
        import bench_qlora

        qlora = bench_qlora.main(["--tiny"] if args.tiny else ["--steps", "4"])
        bench.record("qlora_8b", "sft QLoRA 2048x2", **{k: qlora[k] for k in ("peak_gib", "tokens_per_s")})
    if "fsdp2" in parts:
        fsdp2_full(bench, args.peak_tflops)
    print(f"[bench] all parts in {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
