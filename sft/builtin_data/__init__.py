"""Small data sets shipped inside the package, so examples and tests run offline with real text.

A recipe names one as `builtin:<name>/<split>`, e.g. `builtin:jargon/train`. Each folder has a README.md with
provenance, licence, counts, and the command (a `make_*.py` script here) that regenerates it.
No torch here: config validation resolves these paths.
"""

from __future__ import annotations

from pathlib import Path

from sft.errors import SftError

BUILTIN_PREFIX = "builtin:"
BUILTIN_DATASETS: dict[str, str] = {
    "jargon": "chat Q&A: what a hacker-jargon term means, answered from the Jargon File (public domain)",
    "shakespeare": "raw text: six Shakespeare plays in ~4,000-character chunks, one play held out (public domain)",
    "instruct": "chat: varied instructions (Python FAQ questions and answers, text tasks with one right answer; PSF)",
    "code": "chat: complete a Python function from its signature and docstring (HumanEval, MIT)",
    "sonnets": "chat: write a sonnet that begins with a given line (Shakespeare's sonnets, public domain)",
}
SPLITS = ("train", "eval")
ROOT = Path(__file__).parent


def is_builtin(spec: str) -> bool:
    return spec.startswith(BUILTIN_PREFIX)


def builtin_specs() -> list[str]:
    return [f"{BUILTIN_PREFIX}{name}/{split}" for name in BUILTIN_DATASETS for split in SPLITS]


def builtin_data_path(spec: str) -> Path:
    """`builtin:jargon/train` -> the packaged jargon/train.jsonl. Raises SftError for an unknown name."""
    name, _, split = spec.removeprefix(BUILTIN_PREFIX).partition("/")
    if not is_builtin(spec) or name not in BUILTIN_DATASETS or split not in SPLITS:
        raise SftError(f"unknown built-in data set {spec!r}; valid: {', '.join(builtin_specs())}")
    path = ROOT / name / f"{split}.jsonl"
    if not path.is_file():
        raise SftError(f"built-in data set {spec!r} is missing its file {path}; reinstall the sft package")
    return path


def write_held_out_splits(out: Path, rows: list[dict], held: set[int], readme: str) -> None:
    """The generators' last step: rows whose index is in `held` go to eval.jsonl, the rest to train.jsonl, in
    their order; README.md is `readme` formatted with the counts (`eval_rows`, `train`, `eval`)."""
    import json

    train = [r for i, r in enumerate(rows) if i not in held]
    evals = [r for i, r in enumerate(rows) if i in held]
    out.mkdir(parents=True, exist_ok=True)
    for name, split in (("train", train), ("eval", evals)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in split))
    (out / "README.md").write_text(readme.format(eval_rows=len(held), train=len(train), eval=len(evals)))
    print(f"train {len(train)} rows, eval {len(evals)} rows -> {out}")
