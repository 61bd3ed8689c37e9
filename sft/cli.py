"""The `sft` command. Parsing and recipe validation import no torch (DESIGN invariant 8)."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence

from sft.errors import SftError

LIBRARIES = r"(torch|transformers|peft|accelerate|deepspeed|datasets|bitsandbytes)(\.|$)"
OVERRIDES_HELP = "dotted key=value overrides, e.g. train.max_steps=20 lora.r=8 (values parsed as YAML)"


def _train(args: argparse.Namespace) -> int:
    from sft.config import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if args.check:
        print(recipe.to_yaml(), end="")
        return 0
    from sft.preflight import preflight

    preflight(recipe, args.recipe)  # model, data, output folder, W&B key: before torch is even imported
    from sft.divergence import DIVERGED_EXIT_CODE, Diverged
    from sft.signals import PREEMPTED_EXIT_CODE, Preempted
    from sft.train import train

    try:
        train(recipe, check_memory=not args.force)
    except Preempted:
        return PREEMPTED_EXIT_CODE
    except Diverged as e:
        print(f"sft: stopped: {e}", file=sys.stderr)
        return DIVERGED_EXIT_CODE
    except (SftError, KeyboardInterrupt):
        raise
    except Exception as e:
        if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # say which rank failed before torchrun's summary
            from sft.rank_failure import describe

            line = describe(e)
            if line:
                print(line, file=sys.stderr, flush=True)
        raise
    return 0


def _plan(args: argparse.Namespace) -> int:
    from sft.config import load_recipe
    from sft.plan import device_from_args, format_plan, make_plan

    recipe = load_recipe(args.recipe, args.overrides)
    world = (args.gpus or recipe.launch.procs_per_node) * (args.nodes or recipe.launch.nodes)
    device, device_bytes = device_from_args(args.gpu, args.gpu_memory, recipe.train.device, args.gpus)
    print(format_plan(make_plan(recipe, world, device, device_bytes)))
    return 0


def _report(args: argparse.Namespace) -> int:
    from sft.report import report

    print(report(args.run_dir))
    return 0


def _launch(args: argparse.Namespace) -> int:
    from launch import run_launch

    return run_launch(args)


def _merge(args: argparse.Namespace) -> int:
    from sft.merge import run_merge

    run_merge(args.config, args.overrides)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from sft.model_eval import run_eval

    return run_eval(args)


def _data_preview(args: argparse.Namespace) -> int:
    from sft.config import load_recipe
    from sft.data.preview import preview
    from sft.model.load import load_tokenizer

    recipe = load_recipe(args.recipe, args.overrides)
    print(preview(recipe, load_tokenizer(recipe.model), args.n))
    return 0


def _gpu_keys() -> list[str]:
    from sft.gpus import GPUS

    return [g.key for g in GPUS]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sft",
        description="Supervised fine-tuning of causal language models: one recipe from a laptop to a Slurm cluster.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "train",
        help="train in this process (or in each process under torchrun)",
        description="Train from a YAML recipe. Example: sft train recipes/quickstart.yaml train.max_steps=20 lora.r=8",
    )
    p.add_argument("recipe", help="YAML recipe (see recipes/)")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p.add_argument("--check", action="store_true", help="validate the recipe, print it resolved, and exit")
    p.add_argument(
        "--force", action="store_true", help="train even when the memory plan says the recipe cannot fit"
    )
    p.set_defaults(func=_train)

    p = sub.add_parser(
        "plan",
        help="memory per rank for each layout (single, FSDP2, ZeRO-1/2/3, offload), what fits, what to use",
        description="Plan a recipe's memory from the model config alone (no weights are loaded). "
        "Example: sft plan recipes/full_fsdp2.yaml model.name=ORG/MODEL --gpus 8 --gpu h100",
    )
    p.add_argument("recipe", help="YAML recipe")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p.add_argument("--gpus", type=int, help="processes (GPUs) per node (default launch.procs_per_node)")
    p.add_argument("--nodes", type=int, help="nodes (default launch.nodes)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--gpu-memory", help="memory per GPU, e.g. 80GiB or 24GB (default: this machine's)")
    group.add_argument("--gpu", help="a GPU by name: " + ", ".join(_gpu_keys()))
    p.set_defaults(func=_plan)

    p = sub.add_parser(
        "report",
        help="redraw a run's plots and print its summary (finished or still running)",
        description="Example: sft report runs/quickstart",
    )
    p.add_argument("run_dir", help="the run's output_dir")
    p.set_defaults(func=_report)

    p = sub.add_parser(
        "launch",
        help="run a recipe locally, with torchrun, on Slurm (sbatch) or through submitit",
        description="Build the job for a recipe's `launch:` section and run or submit it.",
    )
    p.add_argument("recipe", help="YAML recipe")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    from launch import add_launch_arguments

    add_launch_arguments(p)
    p.set_defaults(func=_launch)

    p = sub.add_parser(
        "merge",
        help="merge a LoRA adapter into its base, or several fine-tuned models into one",
        description="Merge models as a YAML merge config describes (see recipes/merge_*.yaml).",
    )
    p.add_argument("config", help="YAML merge config")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    p.set_defaults(func=_merge)

    p = sub.add_parser(
        "eval",
        help="held-out loss and perplexity of a model (folder, built-in, adapter) on data sources, and answers",
        description="Example: sft eval runs/lab1/lora/final --data builtin:instruct/eval --prompt 'What is a tuple?'",
    )
    p.add_argument("model", help="model folder, builtin:NAME, hub id, or LoRA/QLoRA adapter folder")
    p.add_argument("--data", nargs="+", metavar="SOURCE", help="data sources, as in a recipe's data.eval")
    p.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt to answer (repeatable)")
    p.add_argument("--prompts", metavar="FILE", help="prompts: one per line, or a JSON/YAML list")
    p.add_argument("--json", metavar="OUT", help="also write the results to this JSON file")
    p.add_argument(
        "--max-seq-len", type=int, default=1024, help="longer samples are truncated (default 1024)"
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-batches", type=int, default=None, help="score only the first N batches per source")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.set_defaults(func=_eval)

    p = sub.add_parser(
        "data", help="inspect the data a recipe trains on", description="Inspect training data."
    )
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    q = data_sub.add_parser(
        "preview",
        help="print the first samples with the trained tokens highlighted, and the data statistics",
        description="Example: sft data preview recipes/quickstart.yaml data.packing=true -n 5",
    )
    q.add_argument("recipe", help="YAML recipe")
    q.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    q.add_argument("-n", type=int, default=3, help="samples to show (default 3)")
    q.set_defaults(func=_data_preview)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may also follow options (`sft launch r.yaml --backend slurm launch.nodes=2`).
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not (hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra)):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    # Deprecation notices between the libraries we call are for their developers, not for the user (and
    # would break the one-line contract of a bad-input error).
    warnings.filterwarnings("ignore", category=FutureWarning, module=LIBRARIES)
    try:
        return int(args.func(args))
    except SftError as e:
        print(f"sft: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sft: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
