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
