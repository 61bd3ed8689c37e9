"""Every case of the bad-input corpus (tests/bad_inputs.py): one line naming the file, row or key and the fix,
exit code 2, nothing written. And docs/errors.md is the table these cases print."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest

from tests.bad_inputs import (
    CASES,
    DOC,
    FAULT_TESTS,
    FAULTS,
    Case,
    problems,
    render_doc,
    run_case,
    shown_message,
)

SEEN: dict[str, str] = {}  # case id -> the message as docs/errors.md shows it


@pytest.fixture(autouse=True)
def tokenizer_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cases are about what happens after the tokenizer loads; load it once, not for every case."""
    import sft.train

    monkeypatch.setattr(sft.train, "load_tokenizer", _cached_tokenizer)


@functools.cache
def _load(name: str) -> Any:
    from sft.config import ModelConfig
    from sft.model.load import load_tokenizer

    return load_tokenizer(ModelConfig(name=name))


def _cached_tokenizer(cfg: Any) -> Any:
    return _load(cfg.name)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gives_one_line_exit_2_and_writes_nothing(
    case: Case, tmp_path: Path, tiny_model_dir: Path
) -> None:
    folder = tmp_path / "case"
    out = run_case(case, folder, tiny_model_dir)
    assert not problems(case, out), (problems(case, out), out.err[-3000:])
    SEEN[case.id] = shown_message(out, folder, tiny_model_dir)


def test_corpus_covers_every_kind_of_input() -> None:
    groups = {c.group for c in CASES}
    assert {"recipe", "override", "data", "file", "model", "output", "resume", "combination"} <= groups
    assert len(CASES) >= 120 and len({c.id for c in CASES}) == len(CASES)


def test_every_fault_in_the_doc_has_its_test() -> None:
    source = FAULT_TESTS.read_text()
    assert all(f"def {test}(" in source for _, _, test in FAULTS)


def test_errors_doc_is_current(tmp_path: Path, tiny_model_dir: Path) -> None:
    for case in CASES:  # cases not run in this session (a -k selection) run here
        if case.id not in SEEN:
            folder = tmp_path / case.id
            SEEN[case.id] = shown_message(run_case(case, folder, tiny_model_dir), folder, tiny_model_dir)
    assert DOC.read_text() == render_doc(SEEN), (
        "docs/errors.md is out of date: python -m tests.bad_inputs --write-doc"
    )
