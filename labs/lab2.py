"""Lab 2: QLoRA (4-bit NF4 base, double quantization, paged 8-bit AdamW) vs LoRA on the full-precision base.

    python -m labs.lab2            # or: make lab2

Fine-tunes the same LoRA twice on the same data and steps, once over the base in float32
(labs/lab2_lora.yaml) and once over the base in 4-bit (labs/lab2_qlora.yaml); measures the base's memory
each way, the held-out loss and the time; then folds the QLoRA adapter into the base with `sft merge`, as
trained (dequantize(quantize(W)) + BA, the default) and naively (W + BA), and reports how close each
merged model is to the 4-bit model that was trained. Last, the memory planner's table for an 8B model on
one 24 GB GPU: full fine-tuning, LoRA and QLoRA.
Writes OUT/results.md, OUT/results.json and OUT/lab2.png.
"""

from __future__ import annotations

import gc
import shutil
import time
from typing import Any

from labs.common import LABS, REPO, evaluate, finish, log, mib, parser, pyplot, short, table, train

EVAL = ["builtin:instruct/eval", "builtin:jargon/eval"]
PROMPTS = ["What does the hacker jargon term 'cruft' mean?"]
GIB = 2**30


def base_memory(recipe: str, args: Any) -> dict[str, Any]:
    """The memory report of the model the recipe trains (sft/model/quant.py), measured from its tensors."""
    import torch

    from sft.config import load_recipe
    from sft.model import build_model
    from sft.model.quant import memory_report

    r = load_recipe(LABS / recipe, [f"model.name={args.model}", *args.set])
    model = build_model(r, torch.device("cpu"))
    report = memory_report(model, r.optim.name)
    del model
    gc.collect()
    return report


# Llama-3.1-8B on one 24 GB GPU (RTX 3090/4090, A10, L4): the QLoRA recipe with only `method` changed.
GPU_RECIPE = REPO / "recipes" / "qlora_llama3_8b_24gb.yaml"
GPU_MODEL = "meta-llama/Llama-3.1-8B-Instruct"
GPU_BYTES = 24e9
GPU_METHODS = {
    "full fine-tuning": "full",
    "LoRA, bf16 base": "lora",
    "QLoRA, NF4 + double quant base": "qlora",
}
GPU_TOKENS = (2048, 4096)


def gpu_table() -> tuple[list[str], list[list[str]]]:
    """The memory planner's peak per GPU (`sft plan`) for full fine-tuning, LoRA and QLoRA of Llama-3.1-8B:
    recipes/qlora_llama3_8b_24gb.yaml (bf16 weights, gradient checkpointing, paged 8-bit AdamW, micro-batch 2)
    with only `method` changed, at 2048 tokens per sample (the recipe's) and at 4096. The model's config is the
    copy bundled with sft (its published architecture numbers), so nothing is downloaded."""
    from sft.config import load_recipe
    from sft.model.bundled import bundled_config_dir
    from sft.plan import make_plan

    model = bundled_config_dir(GPU_MODEL)
    out = []
    for label, method in GPU_METHODS.items():
        rows = []
        for tokens in GPU_TOKENS:
            overrides = [f"model.name={model}", f"method={method}", f"data.max_seq_len={tokens}"]
            if method == "full":
                overrides.append("lora={}")  # the recipe's lora settings are refused with method=full
            plan = make_plan(load_recipe(GPU_RECIPE, overrides), 1, "a 24 GB GPU", GPU_BYTES, ["single"])
            rows.append(plan.row("single"))
        st = rows[0].state
        assert st is not None  # one device runs every method
        out.append(
            [
                label,
                f"{(st.params + st.quantized) / GIB:.2f}",
                f"{(st.grads + st.optimizer) / GIB:.2f}",
                f"{(rows[0].activations + rows[0].loss + rows[0].temporary) / GIB:.2f}",
                *(cell for r in rows for cell in (f"{r.peak / GIB:.1f}", "yes" if r.fits else "no")),
            ]
        )
    headers = ["method (Llama-3.1-8B)", "weights GiB", "gradients + optimizer GiB", "activations + loss GiB"]
    for tokens in GPU_TOKENS:
        headers += [f"peak GiB, 2 x {tokens} tokens", "fits 24 GB?"]
    return headers, out


def main() -> None:
    args = parser(2, __doc__.splitlines()[0], steps=24).parse_args()
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    log("measuring the base in float32 and in 4-bit")
    memory = {"LoRA": base_memory("lab2_lora.yaml", args), "QLoRA": base_memory("lab2_qlora.yaml", args)}
    runs = {"LoRA": train("lora", "lab2_lora.yaml", args), "QLoRA": train("qlora", "lab2_qlora.yaml", args)}

    from sft.merge.config import validate_merge_config
    from sft.merge.run import merge

    fidelity = {}
    for label, roundtrip in (("as trained", True), ("naive", False)):
        out = args.out / f"merged_{'qlora' if roundtrip else 'naive'}"
        log(f"merging the QLoRA adapter {label} (qlora_roundtrip: {str(roundtrip).lower()})")
        cfg = validate_merge_config(
            {
                "method": "lora",
                "adapter": runs["QLoRA"]["final"],
                "output": str(out),
                "overwrite": True,
                "qlora_roundtrip": roundtrip,
                "prompts": PROMPTS + ["def fibonacci(n):", "Shall I compare thee to a summer's day?"],
            }
        )
        fidelity[label] = merge(cfg, log=lambda line: log("  " + line)).report | {"folder": str(out)}

    models = {
        "base": args.model,
        "LoRA (fp32 base)": runs["LoRA"]["final"],
        "QLoRA (4-bit base + adapter)": runs["QLoRA"]["final"],
        "QLoRA merged as trained": fidelity["as trained"]["folder"],
    }
    scores = {label: evaluate(label, ref, EVAL, PROMPTS, args) for label, ref in models.items()}
    for f in fidelity.values():
        shutil.rmtree(f["folder"], ignore_errors=True)

    rows = []
    for label, run_key, mem_key in (("LoRA", "LoRA", "LoRA"), ("QLoRA", "QLoRA", "QLoRA")):
        m, run = memory[mem_key], runs[run_key]
        s = scores["LoRA (fp32 base)" if label == "LoRA" else "QLoRA (4-bit base + adapter)"]["sources"]
        # the linear layers 4-bit quantizes; LoRA keeps the same layers in float32 (2x their bf16 size)
        linear = m["quantized_bytes"] if label == "QLoRA" else 2 * memory["QLoRA"]["quantized_bf16_bytes"]
        rows.append(
            [
                label,
                f"{mib(m['base_bytes'])} ({m['base_format']})",
                mib(linear),
                mib(m["optimizer_state_bytes"]) + f" ({m['optimizer']})",
                *(f"{s[src]['loss']:.3f}" for src in EVAL),
                f"{run['train_seconds']:.0f} s",
                mib(run["peak_rss_mib"] * 2**20),
            ]
        )
    base_scores = scores["base"]["sources"]
    rows.append(
        ["base (no training)", "", "", "", *(f"{base_scores[src]['loss']:.3f}" for src in EVAL), "", ""]
    )
    headers = ["", "base weights in memory", "of which linear layers", "optimizer state"]
    headers += [f"held-out loss {src.split(':')[1]}" for src in EVAL] + ["train time", "peak RSS"]
    fid_rows = [
        [
            label,
            f"{f['max_abs_logit_diff']:.2g}",
            f"{f['mean_kl']:.2g}",
            *(
                f"{scores['QLoRA merged as trained']['sources'][src]['loss']:.3f}"
                if label == "as trained"
                else ""
                for src in EVAL
            ),
        ]
        for label, f in fidelity.items()
    ]
    gpu_headers, gpu_rows = gpu_table()
    answers = [[label, short(s["answers"][0]["answer"])] for label, s in scores.items()]
    sections = [
        f"Same LoRA (r=16, all linear layers), same data, {runs['LoRA']['steps']} steps of 2 samples each, base "
        f"`{args.model}`.",
        table(headers, rows),
        "The QLoRA adapter folded into a 16/32-bit model (`sft merge`, method lora): as trained, into "
        "dequantize(quantize(W)), and naively, into W. Fidelity = how close the merged model's logits are to "
        "the 4-bit model that was trained, on three prompts:",
        table(
            [
                "merge",
                "max abs logit difference",
                "mean KL per token",
                *(f"loss {s.split(':')[1]}" for s in EVAL),
            ],
            fid_rows,
        ),
        f"Answers to: {PROMPTS[0]}",
        table(["model", "answer"], answers),
        "Llama-3.1-8B on one 24 GB GPU, from the memory planner (`sft plan recipes/qlora_llama3_8b_24gb.yaml "
        "method=lora|qlora --gpu-memory 24GB`, and `method=full lora={}`: bf16 weights, gradient checkpointing, paged 8-bit AdamW, "
        "micro-batch 2; weights include the 4-bit base; activations + loss include the dequantized 4-bit weight "
        "of a matmul). Planned, not measured here (`bench/gpu/bench_qlora.py` measures the QLoRA row on a GPU).",
        table(gpu_headers, gpu_rows),
    ]
    chart(args.out, memory, runs, gpu_rows)
    data = {"memory": memory, "runs": runs, "scores": scores, "fidelity": fidelity, "gpu_8b": gpu_rows}
    finish(args.out, "Lab 2: QLoRA vs LoRA", sections, data, started)


def chart(out: Any, memory: dict[str, Any], runs: dict[str, Any], gpu_rows: list[list[str]]) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    labels = list(memory)
    axes[0].bar(labels, [memory[k]["base_bytes"] / 2**20 for k in labels], color=["tab:blue", "tab:orange"])
    axes[0].set_ylabel("base weights in memory (MiB)")
    axes[1].bar(labels, [runs[k]["train_seconds"] for k in labels], color=["tab:blue", "tab:orange"])
    axes[1].set_ylabel("training time (s), CPU")
    methods = ["full", "LoRA", "QLoRA"]
    for i, tokens in enumerate(GPU_TOKENS):
        peaks = [float(r[4 + 2 * i]) for r in gpu_rows]
        axes[2].bar([x + 0.4 * i for x in range(3)], peaks, width=0.4, label=f"2 x {tokens} tokens")
    axes[2].set_xticks([x + 0.2 for x in range(3)], methods)
    axes[2].axhline(GPU_BYTES / GIB, color="black", linestyle="--", linewidth=1, label="24 GB GPU")
    axes[2].set_ylabel("Llama-3.1-8B peak per GPU (GiB, sft plan)")
    axes[2].legend()
    fig.suptitle("Lab 2: QLoRA vs LoRA (built-in model on CPU; right: the planner's 8B table)")
    fig.tight_layout()
    fig.savefig(out / "lab2.png", dpi=110)
    log(f"chart: {out / 'lab2.png'}")


if __name__ == "__main__":
    main()
