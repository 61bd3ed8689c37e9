"""The merge stage: fold a LoRA/QLoRA adapter into its base, or combine fine-tunes of one base into one model.

    sft merge recipes/merge_ties.yaml                       # YAML
    sft merge recipes/merge_lora.yaml adapter=runs/x/adapter output=runs/x/merged
    sft merge "" method=linear models='[a, b]' output=out   # no file: everything from key=value

Layout: config.py (the YAML, no torch) → plan.py (open inputs, check, decide the output) → run.py (stream
tensor by tensor through methods.py into stream.py's sharded writer, publish atomically) with lora.py for
adapters and the QLoRA round trip, sources.py for inputs, verify.py for the post-merge check.
Importing this package imports no torch (`sft --help` stays fast).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["run_merge"]


def run_merge(config_path: str, overrides: list[str]) -> Path:
    """Load the merge YAML (may be '' for overrides only), apply key=value overrides, run; return the output.

    Bad input raises `sft.errors.SftError` with a one-line message, before anything is written.
    """
    from sft.merge.config import load_merge_config
    from sft.merge.run import merge

    cfg = load_merge_config(config_path or None, overrides)
    return merge(cfg).output
