"""Lab 1: LoRA vs full fine-tuning vs the base model on an instruction data set (labs/lab1.md).

    python -m labs.lab1            # or: make lab1

Fine-tunes the base twice on the same data and steps (labs/lab1_lora.yaml, labs/lab1_full.yaml), then
scores the base and both fine-tunes on the held-out splits with `sft eval` and asks each the same prompts.
Writes OUT/results.md, OUT/results.json and OUT/lab1.png.
"""

from __future__ import annotations

import time

from labs.common import evaluate, finish, log, mib, millions, parser, pyplot, short, table, train

EVAL = ["builtin:instruct/eval", "builtin:jargon/eval"]
PROMPTS = [
    "How do I convert a string to a number?",  # a Python FAQ question held out of training
    "Sort the words of this sentence alphabetically (ignoring case), comma-separated:\nWhy is Python installed on my machine?",
    "What does the hacker jargon term 'cruft' mean?",
]


def main() -> None:
    args = parser(1, __doc__.splitlines()[0], steps=24).parse_args()
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    runs = {"LoRA": train("lora", "lab1_lora.yaml", args), "full": train("full", "lab1_full.yaml", args)}
    models = {"base": args.model, "LoRA": runs["LoRA"]["final"], "full": runs["full"]["final"]}
    scores = {label: evaluate(label, ref, EVAL, PROMPTS, args) for label, ref in models.items()}

    rows = []
    for label in models:
        s = scores[label]["sources"]
        run = runs.get(label)
        rows.append(
            [
                label,
                *(f"{s[src]['loss']:.3f}" for src in EVAL),
                millions(run["trainable_params"]) if run else "-",
                f"{run['train_seconds']:.0f} s" if run else "-",
                mib(run["peak_rss_mib"] * 2**20) if run else "-",
                mib(run["bytes_written"]) if run else "-",
            ]
        )
    headers = ["model", *(f"held-out loss {src.split(':')[1]}" for src in EVAL)]
    headers += ["trainable parameters", "train time", "peak RSS (training process)", "bytes written"]
    answers = [
        [short(p, 90), *(short(scores[label]["answers"][i]["answer"]) for label in models)]
        for i, p in enumerate(PROMPTS)
    ]
    steps = runs["LoRA"]["steps"]
    sections = [
        f"Same data, same {steps} steps of 2 samples, base `{args.model}`.",
        table(headers, rows),
        "Sample answers (greedy):",
        table(["prompt", *models], answers),
    ]
    chart(args.out, models, scores, runs)
    finish(args.out, "Lab 1: LoRA vs full fine-tuning", sections, {"runs": runs, "scores": scores}, started)


def chart(out, models, scores, runs) -> None:  # type: ignore[no-untyped-def]
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    labels = list(models)
    width = 0.38
    for k, src in enumerate(EVAL):
        axes[0].bar(
            [i + (k - 0.5) * width for i in range(len(labels))],
            [scores[m]["sources"][src]["loss"] for m in labels],
            width,
            label=src.split(":")[1],
        )
    axes[0].set_xticks(range(len(labels)), labels)
    axes[0].set_ylabel("held-out loss (lower is better)")
    axes[0].legend()
    tuned = [m for m in labels if m in runs]
    axes[1].bar(tuned, [runs[m]["trainable_params"] / 1e6 for m in tuned], color="tab:green")
    axes[1].set_ylabel("trainable parameters (millions)")
    axes[2].bar(
        tuned, [runs[m]["bytes_written"] / 2**20 for m in tuned], color="tab:red", label="bytes written"
    )
    axes[2].bar(
        tuned, [runs[m]["peak_rss_mib"] for m in tuned], color="tab:gray", width=0.4, label="peak RSS"
    )
    axes[2].set_ylabel("MiB")
    axes[2].legend()
    fig.suptitle("Lab 1: LoRA vs full fine-tuning (same data and steps)")
    fig.tight_layout()
    fig.savefig(out / "lab1.png", dpi=110)
    log(f"chart: {out / 'lab1.png'}")


if __name__ == "__main__":
    main()
