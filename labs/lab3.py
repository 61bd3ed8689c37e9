"""Lab 3: two specialists from one base (code, poetry), then every merge method of the two (labs/lab3.md).

    python -m labs.lab3            # or: make lab3

Fine-tunes the base on Python function bodies (labs/lab3_code.yaml) and on Shakespeare's sonnets
(labs/lab3_poetry.yaml), merges the two adapters with each method of `sft merge` (MERGES below, each one
`sft merge` config), and scores the base, both specialists and every merge on both held-out sets. Writes
OUT/results.md (the matrix, the share of each specialist's improvement each merge keeps, sample answers),
OUT/results.json and OUT/lab3.png. Merged models are deleted once scored unless --keep-models.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from labs.common import evaluate, finish, log, parser, pyplot, short, table, train
from sft.builtin_data import builtin_data_path

CODE, POETRY = "builtin:code/eval", "builtin:sonnets/eval"
# The base, the two specialists, and a merge config per method (`models` and `base` are filled in).
MERGES: dict[str, dict[str, Any]] = {
    "linear": {"method": "linear"},  # the average: weights 1, 1, normalized
    "task_arithmetic": {"method": "task_arithmetic"},  # base + τ_code + τ_poetry
    "ties": {
        "method": "ties",
        "density": 0.5,
    },  # top half of each τ by magnitude, sign election, disjoint mean
    "ties_sum": {"method": "ties", "density": 0.5, "normalize": False},  # ... agreeing entries summed
    "dare_linear": {"method": "dare_linear", "density": 0.5},
    "dare_ties": {"method": "dare_ties", "density": 0.5},
    "della": {"method": "della", "density": 0.5, "epsilon": 0.1},
    "model_stock": {"method": "model_stock"},
    "slerp": {"method": "slerp", "t": 0.5},
}


def first_user_turn(spec: str) -> str:
    row = json.loads(builtin_data_path(spec).read_text().splitlines()[0])
    return row["messages"][0]["content"]


def merge_config(
    name: str, extra: dict[str, Any], args: Any, adapters: list[str], out: Path
) -> dict[str, Any]:
    # Each adapter counts as its recorded base with the adapter folded in; SLERP runs from models[0] (t=0)
    # to models[1] (t=1); the task-vector methods also read the base itself.
    raw = {"models": adapters, "output": str(out), "overwrite": True, "verify": False} | extra
    if extra["method"] not in ("linear", "slerp"):
        raw["base"] = args.model
    return raw


def main() -> None:
    p = parser(3, __doc__.splitlines()[0], steps=24)
    p.add_argument("--keep-models", action="store_true", help="keep the merged model folders")
    p.add_argument("--methods", help="comma-separated subset of: " + ", ".join(MERGES))
    args = p.parse_args()
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    runs = {
        "code": train("code", "lab3_code.yaml", args),
        "poetry": train("poetry", "lab3_poetry.yaml", args),
    }
    prompts = [first_user_turn(CODE), first_user_turn(POETRY)]  # both held out of training
    sources = [CODE, POETRY]
    scores = {"base": evaluate("base", args.model, sources, prompts, args)}
    scores |= {name: evaluate(name, run["final"], sources, prompts, args) for name, run in runs.items()}

    from sft.merge.config import validate_merge_config
    from sft.merge.run import merge

    adapters = [runs["code"]["final"], runs["poetry"]["final"]]
    merge_seconds = {}
    methods = args.methods.split(",") if args.methods else list(MERGES)
    for name in methods:
        out = args.out / "merged" / name
        timing = args.out / "evals" / f"{name}.merge_seconds"
        if args.reuse and timing.is_file() and (args.out / "evals" / f"{name}.json").is_file():
            merge_seconds[name] = float(timing.read_text())
            scores[name] = evaluate(name, str(out), sources, prompts, args)  # the saved evaluation
            continue
        cfg = validate_merge_config(merge_config(name, MERGES[name], args, adapters, out))
        log(f"merging: {name}")
        result = merge(cfg, log=lambda line: None)
        merge_seconds[name] = round(result.seconds, 1)
        scores[name] = evaluate(name, str(out), sources, prompts, args)
        timing.write_text(str(merge_seconds[name]))
        if not args.keep_models:
            shutil.rmtree(out)

    loss = {m: (s["sources"][CODE]["loss"], s["sources"][POETRY]["loss"]) for m, s in scores.items()}
    gain = {"code": loss["base"][0] - loss["code"][0], "poetry": loss["base"][1] - loss["poetry"][1]}

    def kept(model: str) -> tuple[float, float]:
        """Share of each specialist's held-out improvement that a model keeps (1 = all of it)."""
        return (loss["base"][0] - loss[model][0]) / gain["code"], (loss["base"][1] - loss[model][1]) / gain[
            "poetry"
        ]

    rows = []
    for m in scores:
        share = kept(m) if m not in ("base", "code", "poetry") else None
        rows.append(
            [
                m,
                f"{loss[m][0]:.3f}",
                f"{loss[m][1]:.3f}",
                f"{share[0]:.0%}" if share else "",
                f"{share[1]:.0%}" if share else "",
                f"{merge_seconds[m]:.0f} s" if m in merge_seconds else "",
            ]
        )
    merged = [m for m in scores if m in MERGES]
    best = max(merged, key=lambda m: min(kept(m)))
    verdict = (
        f"Best merge (the largest worst-domain share): **{best}**, keeping {kept(best)[0]:.0%} of the code "
        f"specialist's improvement and {kept(best)[1]:.0%} of the poetry specialist's."
    )
    answers = [
        [m, short(scores[m]["answers"][0]["answer"], 120), short(scores[m]["answers"][1]["answer"], 120)]
        for m in scores
    ]
    sections = [
        f"Base `{args.model}`; LoRA specialists of {runs['code']['steps']} steps each "
        f"({runs['code']['train_seconds']:.0f} s code, {runs['poetry']['train_seconds']:.0f} s poetry). Held-out "
        f"loss (lower is better) on `{CODE}` and `{POETRY}`; kept = (base − merge) / (base − specialist).",
        table(["model", "code loss", "poetry loss", "kept: code", "kept: poetry", "merge time"], rows),
        verdict,
        f"Sample answers (greedy, {args.max_new_tokens} new tokens) to a held-out code prompt and a held-out "
        "sonnet request:",
        table(["model", "code prompt", "poetry prompt"], answers),
        f"Code prompt: {short(prompts[0], 300)}\n\nPoetry prompt: {prompts[1]}",
    ]
    chart(args.out, loss, {m: kept(m) for m in merged})
    data = {
        "runs": runs,
        "scores": scores,
        "merges": MERGES,
        "kept": {m: kept(m) for m in merged},
        "best": best,
    }
    data["merge_seconds"] = merge_seconds
    finish(args.out, "Lab 3: merging a code model and a poetry model", sections, data, started)


def chart(out: Path, loss: dict[str, tuple[float, float]], kept: dict[str, tuple[float, float]]) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.5))
    names = list(loss)
    x = range(len(names))
    axes[0].bar([i - 0.2 for i in x], [loss[m][0] for m in names], 0.4, label="code (HumanEval bodies)")
    axes[0].bar([i + 0.2 for i in x], [loss[m][1] for m in names], 0.4, label="poetry (sonnets)")
    axes[0].set_xticks(list(x), names, rotation=35, ha="right")
    axes[0].set_ylabel("held-out loss (lower is better)")
    axes[0].legend()
    merged = list(kept)
    y = range(len(merged))
    axes[1].bar([i - 0.2 for i in y], [100 * kept[m][0] for m in merged], 0.4, label="code")
    axes[1].bar([i + 0.2 for i in y], [100 * kept[m][1] for m in merged], 0.4, label="poetry")
    axes[1].axhline(50, color="black", linestyle="--", linewidth=1)
    axes[1].axhline(100, color="gray", linestyle=":", linewidth=1)
    axes[1].set_xticks(list(y), merged, rotation=35, ha="right")
    axes[1].set_ylabel("% of the specialist's improvement kept")
    axes[1].legend()
    fig.suptitle("Lab 3: code + poetry specialists and their merges")
    fig.tight_layout()
    fig.savefig(out / "lab3.png", dpi=110)
    log(f"chart: {out / 'lab3.png'}")


if __name__ == "__main__":
    main()
