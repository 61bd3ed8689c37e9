"""The `sft` command. Parsing and recipe validation import no torch (DESIGN invariant 8)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from sft.errors import SftError

OVERRIDES_HELP = "dotted key=value overrides, e.g. train.max_steps=20 lora.r=8 (values parsed as YAML)"


def _train(args: argparse.Namespace) -> int:
    from sft.config import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if args.check:
        print(recipe.to_yaml(), end="")
        return 0
    from sft.signals import PREEMPTED_EXIT_CODE, Preempted
    from sft.train import train

    try:
        train(recipe)
    except Preempted:
        return PREEMPTED_EXIT_CODE
    return 0


def _launch(args: argparse.Namespace) -> int:
    from launch import run_launch

    return run_launch(args)


def _merge(args: argparse.Namespace) -> int:
    from sft.merge import run_merge

    run_merge(args.config, args.overrides)
    return 0


def _data_preview(args: argparse.Namespace) -> int:
    from sft.config import load_recipe
    from sft.data.preview import preview

    print(preview(load_recipe(args.recipe, args.overrides), args.n))
    return 0


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
    p.set_defaults(func=_train)

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
