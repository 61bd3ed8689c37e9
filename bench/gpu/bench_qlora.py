"""QLoRA at 8B scale on one GPU: peak memory and tokens/s, with random weights (nothing is downloaded).

Builds a Llama-3.1-8B-shaped model from its config with random bf16 weights on the GPU, quantizes every decoder
linear layer to 4-bit NF4 with double quantization (bitsandbytes), adds LoRA r=16 on all linear layers (peft),
and trains with gradient checkpointing, bf16 autocast and paged 8-bit AdamW at sequence length 2048, batch 2.
Prints the harness's memory report, peak memory (torch.cuda.max_memory_allocated) and tokens/s.
Published reference: ~7.4 GiB peak at 2,413 tokens/s for Llama-3.1-8B QLoRA on one RTX 4090 (torchtune's table;
torchtune computes the loss in chunks, and so does the harness: sft.loss's chunked loss, used here too).

Same pieces as `sft train` with recipes/qlora_llama3_8b_24gb.yaml (the 4-bit layers transformers would make,
peft LoRA as in sft.model.load.add_lora, the harness's eval-safety switch and memory report), but the weights
are random and quantized in place, since an 8B checkpoint cannot be downloaded on the benchmark machine.
Needs torch, transformers, peft and bitsandbytes; imports from sft sft.model.quant and sft.loss (pydantic).

On the lent GPU machine (no bitsandbytes or pydantic there; ~2-3 minutes on an H200), carry the wheels (46 MB):
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 -d .whl bitsandbytes==0.50.2 \\
        pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \\
        PYTHONPATH=/tmp/site:. python3 bench/gpu/bench_qlora.py --json $OUT/qlora.json
Dry run of the same logic on CPU with a tiny config (seconds):
    python bench/gpu/bench_qlora.py --tiny
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # the repo, for sft.model.quant

GIB = 1024**3
REFERENCE = "torchtune, Llama-3.1-8B QLoRA, one RTX 4090: ~7.4 GiB peak, 2,413 tokens/s"

# meta-llama/Llama-3.1-8B's published architecture numbers, as sft bundles them for the memory planner
LLAMA_31_8B = json.loads(
    (REPO / "sft" / "model" / "bundled_configs" / "meta-llama" / "Llama-3.1-8B" / "config.json").read_text()
)
TINY = dict(
    vocab_size=1024,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)


def build_random_model(shape: dict[str, Any], device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**shape)
    with torch.device(device):
        model: Any = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model


def quantize_decoder_linears(
    model: Any, compute_dtype: torch.dtype, quant_type: str = "nf4", double_quant: bool = True
) -> int:
    """Replace each nn.Linear inside the decoder layers by a bitsandbytes Linear4bit holding its weight in 4-bit,
    as transformers' 4-bit loading does (it too leaves the embeddings and the output head alone)."""
    import bitsandbytes as bnb

    count = 0
    for layer in model.model.layers:
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is not torch.nn.Linear:
                    continue
                q = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    compute_dtype=compute_dtype,
                    compress_statistics=double_quant,
                    quant_type=quant_type,
                    quant_storage=torch.uint8,
                    device="meta",
                )
                weight: Any = bnb.nn.Params4bit(
                    child.weight.data,
                    requires_grad=False,
                    compress_statistics=double_quant,
                    quant_type=quant_type,
                    quant_storage=torch.uint8,
                    module=q,
                )
                q.weight = weight.to(child.weight.device)  # Params4bit quantizes when moved to a device
                if child.bias is not None:
                    q.bias = child.bias
                setattr(parent, name, q)  # the bf16 weight is freed with `child`
                count += 1
    model.is_loaded_in_4bit = True  # what transformers sets; peft then wraps Linear4bit with its 4-bit LoRA
    return count


def add_lora(model: Any, r: int) -> Any:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=r, lora_alpha=2 * r, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    return get_peft_model(model, cfg)


def build_optimizer(model: torch.nn.Module, name: str, lr: float) -> torch.optim.Optimizer:
    import bitsandbytes as bnb

    params = [p for p in model.parameters() if p.requires_grad]
    cls = {"paged_adamw_8bit": bnb.optim.PagedAdamW8bit, "adamw_8bit": bnb.optim.AdamW8bit}.get(name)
    optimizer: torch.optim.Optimizer = cls(params, lr=lr) if cls else torch.optim.AdamW(params, lr=lr)
    return optimizer


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--tiny", action="store_true", help="tiny config on CPU: checks the logic, measures nothing"
    )
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (kernels, paged buffers)")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument(
        "--optim", default="paged_adamw_8bit", choices=["paged_adamw_8bit", "adamw_8bit", "adamw"]
    )
    ap.add_argument("--no-checkpointing", action="store_true")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)

    from sft.model.quant import describe_memory, disable_cpu_repack, memory_report, repacked_layers

    cuda = not args.tiny
    if cuda and not torch.cuda.is_available():
        sys.exit("no CUDA device; use --tiny for a CPU dry run")
    device = torch.device("cuda" if cuda else "cpu")
    seq, batch = (args.seq, args.batch) if cuda else (min(args.seq, 64), args.batch)
    compute = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)

    t0 = time.perf_counter()
    model: Any = build_random_model(
        LLAMA_31_8B if cuda else TINY, device, torch.bfloat16 if cuda else torch.float32
    )
    n_4bit = quantize_decoder_linears(model, compute)
    for p in model.parameters():
        p.requires_grad_(False)
    disable_cpu_repack(model)
    model.config.use_cache = False
    if not args.no_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = add_lora(model, args.r)
    optimizer = build_optimizer(model, args.optim, 2e-4)
    build_s = time.perf_counter() - t0
    report = memory_report(model, args.optim)
    print(describe_memory(report))
    print(f"[bench] built and quantized {n_4bit} linear layers in {build_s:.1f}s", flush=True)

    if cuda:
        torch.cuda.synchronize()
        build_peak = torch.cuda.max_memory_allocated()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), device=device)
    model.train()

    from sft.loss import loss_sum

    inputs = {"input_ids": ids, "labels": ids}
    targets = ids[:, 1:].numel()

    def step() -> float:
        loss = loss_sum(model, inputs, "bf16" if cuda else "fp32") / targets  # chunked: no full logits
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    losses = [step() for _ in range(args.warmup)]
    if cuda:
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    losses += [step() for _ in range(args.steps)]
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t1
    assert repacked_layers(model) == []
    results = {
        "device": torch.cuda.get_device_name() if cuda else "cpu (--tiny dry run: numbers mean nothing)",
        "shape": "Llama-3.1-8B" if cuda else "tiny",
        "seq": seq,
        "batch": batch,
        "optimizer": args.optim,
        "gradient_checkpointing": not args.no_checkpointing,
        "lora_r": args.r,
        "params_total": report["params_total"],
        "params_trainable": report["params_trainable"],
        "base_4bit_gib": report["base_bytes"] / GIB,
        "base_bf16_gib": report["base_bf16_bytes"] / GIB,
        "peak_gib": torch.cuda.max_memory_allocated() / GIB if cuda else None,
        "build_peak_gib": build_peak / GIB if cuda else None,
        "tokens_per_s": args.steps * batch * seq / elapsed,
        "step_s": elapsed / max(args.steps, 1),
        "losses": [round(x, 4) for x in losses],
    }
    print()
    print(f"| {'QLoRA, ' + results['shape'] + ', ' + results['device']:<60} | {'value':>14} |")
    print(f"| {'-' * 60} | {'-' * 14} |")
    rows = [
        (
            "parameters (trainable)",
            f"{report['params_total'] / 1e9:.2f}B ({report['params_trainable'] / 1e6:.1f}M)",
        ),
        ("base weights, 4-bit NF4 + double quant (GiB)", f"{results['base_4bit_gib']:.2f}"),
        ("the same base in bf16 (GiB)", f"{results['base_bf16_gib']:.2f}"),
        (f"peak memory training, seq {seq} x batch {batch} (GiB)", f"{results['peak_gib'] or 0:.2f}"),
        ("tokens/s", f"{results['tokens_per_s']:,.0f}"),
        ("step time (s)", f"{results['step_s']:.2f}"),
    ]
    for name, value in rows:
        print(f"| {name:<60} | {value:>14} |")
    print(f"reference: {REFERENCE}")
    print(f"losses: {results['losses']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
