"""Bytes of a base model in 4-bit vs bf16 (and fp32), measured from the loaded tensors on CPU.

Loads the built-in SmolLM2-135M-Instruct (or --model NAME) the way `sft train` does: as stored (fp32, bf16) and
with the recipe's 4-bit settings (NF4 / FP4, with and without double quantization), and counts the bytes of
every weight tensor (packed 4-bit values plus their quantization state). The embeddings (tied with the output
head here) and norms are not quantized: they stay in model.dtype, bf16 in every 4-bit row below.

    python bench/bench_qlora_memory.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sft.config import ModelConfig, QuantConfig  # noqa: E402
from sft.model.load import load_model  # noqa: E402
from sft.model.quant import memory_report  # noqa: E402

MIB = 1024**2
CPU = torch.device("cpu")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct")
    args = ap.parse_args()

    rows: list[tuple[str, dict, float]] = []
    for label, dtype, quant in [
        ("fp32", "float32", None),
        ("bf16", "bfloat16", None),
        ("4-bit NF4 + double quant", "bfloat16", QuantConfig(quant_type="nf4", double_quant=True)),
        ("4-bit NF4", "bfloat16", QuantConfig(quant_type="nf4", double_quant=False)),
        ("4-bit FP4 + double quant", "bfloat16", QuantConfig(quant_type="fp4", double_quant=True)),
    ]:
        t0 = time.perf_counter()
        model = load_model(ModelConfig(name=args.model, dtype=dtype), CPU, quant)  # type: ignore[arg-type]
        seconds = time.perf_counter() - t0
        for p in model.parameters():  # report every weight as "base" (nothing is trained here)
            p.requires_grad_(False)
        rows.append((label, memory_report(model, "adamw"), seconds))
        del model

    bf16 = next(r for label, r, _ in rows if label == "bf16")["base_bytes"]
    print(f"Base weights of {args.model}, measured from the loaded tensors (CPU)\n")
    print(
        f"| {'format':<26} | {'all weights (MiB)':>17} | {'vs bf16':>7} | "
        f"{'linear layers (MiB)':>19} | {'their bits/value':>16} | {'load (s)':>8} |"
    )
    print(f"|{'-' * 28}|{'-' * 19}|{'-' * 9}|{'-' * 21}|{'-' * 18}|{'-' * 10}|")
    linear_values = max(r["params_4bit"] for _, r, _ in rows)
    for label, r, seconds in rows:
        if r["params_4bit"]:
            linear = r["quantized_bytes"]
        else:  # the same linear layers at this row's dtype
            per_value = r["base_bytes"] / r["params_total"]
            linear = linear_values * per_value
        print(
            f"| {label:<26} | {r['base_bytes'] / MIB:>17.1f} | {r['base_bytes'] / bf16:>6.2f}x | "
            f"{linear / MIB:>19.1f} | {8 * linear / linear_values:>16.2f} | {seconds:>8.1f} |"
        )
    total = rows[0][1]["params_total"]
    print(
        f"\n{total / 1e6:.1f}M parameters; {linear_values / 1e6:.1f}M of them in the linear layers that 4-bit "
        f"quantizes ({linear_values / total:.0%}); the rest (embeddings, norms) stays bf16."
    )


if __name__ == "__main__":
    main()
