"""Reading rows from data sources. Every bad row is reported with its file and line number."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sft.errors import SftError


def resolve_path(spec: str) -> Path:
    """`builtin:NAME/SPLIT` -> the packaged file; anything else is a local path that must exist."""
    if spec.startswith("builtin:"):
        from sft.builtin_data import builtin_data_path

        return builtin_data_path(spec)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise SftError(f"data: file not found: {spec}")
    return path


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, row) for each non-blank line; a malformed line is an error naming file:line."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise SftError(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                raise SftError(f"{path}:{lineno}: malformed JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(row, dict):
                raise SftError(f"{path}:{lineno}: each line must be a JSON object, got {type(row).__name__}")
            yield lineno, row
