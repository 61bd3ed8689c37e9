"""The data sets shipped in sft/builtin_data: schema, held-out splits, README counts, the spec lookup, and the
cleaning helpers of the scripts that made them. Fast: no model, no network."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from sft.builtin_data import BUILTIN_DATASETS, ROOT, builtin_data_path, builtin_specs
from sft.builtin_data.make_jargon import b64_number, clean
from sft.builtin_data.make_shakespeare import chunks, strip_gutenberg
from sft.errors import SftError

SPLITS = ("train", "eval")


def read_rows(path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            pytest.fail(f"{path}:{number}: not JSON: {e}")
    return rows


def readme_counts(name: str) -> dict[str, int]:
    text = (ROOT / name / "README.md").read_text(encoding="utf-8")
    return {split: int(n) for split, n in re.findall(r"^\| (\w+)\.jsonl \| (\d+) \|$", text, re.MULTILINE)}


def questions(split: str) -> list[str]:
    return [row["messages"][0]["content"] for row in read_rows(ROOT / "jargon" / f"{split}.jsonl")]


def test_every_builtin_has_its_files():
    for name in BUILTIN_DATASETS:
        assert (ROOT / name / "README.md").is_file()
        for split in SPLITS:
            assert builtin_data_path(f"builtin:{name}/{split}") == ROOT / name / f"{split}.jsonl"


@pytest.mark.parametrize("split", SPLITS)
def test_jargon_rows_are_chat_pairs(split):
    for number, row in enumerate(read_rows(ROOT / "jargon" / f"{split}.jsonl"), start=1):
        where = f"jargon/{split}.jsonl row {number}"
        assert list(row) == ["messages"], where
        roles = [m["role"] for m in row["messages"]]
        assert roles == ["user", "assistant"], where
        for message in row["messages"]:
            assert set(message) == {"role", "content"}, where
            assert isinstance(message["content"], str) and message["content"].strip(), where
        answer = row["messages"][1]["content"]
        assert 80 <= len(answer) <= 1200, where
        # Markup and debris the script removes must not come back.
        assert "\xa0" not in answer and "\xad" not in answer and "00-database" not in answer, where


@pytest.mark.parametrize("split", SPLITS)
def test_shakespeare_rows_are_text(split):
    for number, row in enumerate(read_rows(ROOT / "shakespeare" / f"{split}.jsonl"), start=1):
        where = f"shakespeare/{split}.jsonl row {number}"
        assert list(row) == ["text"], where
        assert isinstance(row["text"], str) and row["text"].strip(), where
        assert len(row["text"]) <= 4000, where
        assert "gutenberg" not in row["text"].lower(), where


def test_jargon_eval_is_held_out():
    train, evaluation = questions("train"), questions("eval")
    assert len(set(train)) == len(train) and len(set(evaluation)) == len(evaluation)
    assert not set(train) & set(evaluation)
    assert len(evaluation) == 100


def test_shakespeare_eval_is_another_play():
    train = {row["text"] for row in read_rows(ROOT / "shakespeare" / "train.jsonl")}
    evaluation = [row["text"] for row in read_rows(ROOT / "shakespeare" / "eval.jsonl")]
    assert not train & set(evaluation)
    assert evaluation[0].startswith("MACBETH")
    assert not any("Macbeth" in text for text in train)


@pytest.mark.parametrize("name", list(BUILTIN_DATASETS))
def test_counts_match_readme(name):
    actual = {split: len(read_rows(ROOT / name / f"{split}.jsonl")) for split in SPLITS}
    assert readme_counts(name) == actual


@pytest.mark.parametrize(
    "spec", ["builtin:nope/train", "builtin:jargon/test", "jargon/train", "builtin:", ""]
)
def test_unknown_spec_names_the_valid_ones(spec):
    with pytest.raises(SftError) as info:
        builtin_data_path(spec)
    message = str(info.value)
    assert "\n" not in message
    for valid in builtin_specs():
        assert valid in message


def test_builtin_module_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, sft.builtin_data; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# The cleaning helpers, on small made-up inputs shaped like the real sources.


def test_b64_number():
    assert b64_number("A") == 0 and b64_number("B") == 1 and b64_number("BA") == 64


def test_jargon_clean_joins_unlinks_and_drops():
    entry = clean(
        "frob\n /frob/, vt.\n\n    To {tweak} a thing “\n    aimlessly”\n    , see {\n    twiddle}.\n\n"
    )
    assert entry is not None and entry.term == "frob"
    assert entry.definition == "To tweak a thing “aimlessly”, see twiddle."
    assert clean("hard boot\n n.\n\n    See {boot}.\n\n") is None
    assert clean("kahuna\n n.\n\n    [IBM] Synonym for {wizard}, {guru}.\n\n") is None
    assert clean("00-database-short\n     The Jargon File\n") is None


def test_jargon_clean_keeps_preformatted_lines():
    entry = clean("x\n n.\n\n    A haiku:\n\n\n    \xa0\xa0One\xa0line\n    \xa0\xa0two\n\n    A\n\n")
    assert entry is not None
    assert entry.definition == "A haiku:\n\n  One line\n  two"  # and the stray section letter "A" is gone


def test_shakespeare_chunks_respect_paragraphs_and_limit():
    text = "\n\n".join(f"SPEAKER {i}.\n" + "word " * 30 for i in range(50))
    pieces = chunks(text, 1000)
    assert all(len(p) <= 1000 for p in pieces)
    assert "\n\n".join(pieces) == text.strip("\n")
    assert all(p.startswith("SPEAKER") for p in pieces)
    long_speech = "\n".join(["a line of verse"] * 200)
    assert all(len(p) <= 1000 for p in chunks(long_speech, 1000))


def test_strip_gutenberg_cuts_header_and_footer():
    text = "junk\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\nplay\nEnd of the Project Gutenberg EBook\nlicence"
    assert strip_gutenberg(text, "x").strip() == "play"
    with pytest.raises(SystemExit):
        strip_gutenberg("play\nThis etext is from Project Gutenberg.\n", "x")


# ---------------------------------------------------------------- the lab data sets (instruct, code, sonnets)


def chat_pairs(name: str, split: str) -> list[tuple[str, str]]:
    pairs = []
    for number, row in enumerate(read_rows(ROOT / name / f"{split}.jsonl"), start=1):
        where = f"{name}/{split}.jsonl row {number}"
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"], where
        user, answer = (m["content"] for m in row["messages"])
        assert user.strip() and answer.strip(), where
        pairs.append((user, answer))
    return pairs


@pytest.mark.parametrize("name", ["instruct", "code", "sonnets"])
def test_lab_data_sets_are_chat_rows_held_out_and_counted(name: str) -> None:
    train, evaluation = chat_pairs(name, "train"), chat_pairs(name, "eval")
    assert readme_counts(name) == {"train": len(train), "eval": len(evaluation)}
    assert not {u for u, _ in train} & {u for u, _ in evaluation}


def test_instruct_is_varied_and_its_tasks_are_right() -> None:
    pairs = chat_pairs("instruct", "train") + chat_pairs("instruct", "eval")
    kinds = {u.split("\n")[0].split(":")[0] for u, _ in pairs if "\n" in u}
    assert len(kinds) >= 6  # sorting, counting, reversing, longest word, upper case, capitalizing, ...
    questions = [u for u, _ in pairs if "\n" not in u and not u.startswith("Answer with one word")]
    assert len(questions) > 150 and all(q.endswith("?") for q in questions)
    for user, answer in pairs:
        first, _, sentence = user.partition("\n")
        if first == "How many words are in this sentence?":
            assert int(answer) == len(re.findall(r"[A-Za-z][A-Za-z'-]*", sentence))
        elif first == "Rewrite this sentence in upper case:":
            assert answer == sentence.upper()
        assert ":ref:`" not in answer and ":func:`" not in answer  # reST roles turned into text
    # no FAQ question is in both splits, also through its task rows
    train_text = " ".join(u for u, _ in chat_pairs("instruct", "train"))
    for user, _ in chat_pairs("instruct", "eval"):
        if "\n" not in user and not user.startswith("Answer"):
            assert user not in train_text


def test_code_answers_complete_the_prompted_function() -> None:
    for user, answer in chat_pairs("code", "train") + chat_pairs("code", "eval"):
        prompt = user.split("\n\n", 1)[1]
        assert answer.startswith(" ") and answer not in prompt  # the body: indented, new code
        compile(prompt + answer + "\n", "<humaneval>", "exec")


def test_sonnets_begin_with_the_asked_line() -> None:
    pairs = chat_pairs("sonnets", "train") + chat_pairs("sonnets", "eval")
    assert len(pairs) == 154
    for user, answer in pairs:
        lines = answer.split("\n")
        assert 12 <= len(lines) <= 15 and lines[0].rstrip(",;:.") in user
