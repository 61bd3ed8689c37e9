"""Build the built-in `instruct` data set: varied instructions, from the Python documentation's FAQ.

    apt-get download python3.11-doc && dpkg-deb -x python3.11-doc_*_all.deb /tmp/python-doc
    python -m sft.builtin_data.make_instruct --doc-dir /tmp/python-doc --out sft/builtin_data/instruct

Two kinds of rows, both chat (`{"messages": [user, assistant]}`):
- the FAQ's own questions and answers (how do I..., why does..., what is...), reST markup turned into
  plain text, code examples kept;
- text tasks with one right answer, made from the FAQ's question sentences: sort the words, count them,
  reverse their order, pick the longest, upper-case, title-case, list those longer than six letters, and
  answer the question in one word (yes/no questions whose FAQ answer starts with Yes or No).
A seeded shuffle holds out the eval rows (FAQ questions and task sentences never appear in both splits).
Standard library only, deterministic: the same package gives byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

FAQ_FILES = ("general", "programming", "design", "library", "extending", "windows", "gui", "installed")
MAX_ANSWER = 1200
EVAL_QUESTIONS = 24

_ROLE = re.compile(r":[a-z:]+:`!?~?([^`<]*?)(?:\s*<[^>]*>)?`")
_LINK = re.compile(r"`([^`<]+?)\s*<[^>]+>`_+")
_REF = re.compile(r"`([^`]+)`_+")
_LITERAL = re.compile(r"``([^`]+)``")


def plain(text: str) -> str:
    """reST inline markup to plain text: roles, links and literals lose their markup."""
    text = _ROLE.sub(lambda m: m.group(1).strip(), text)
    text = _LINK.sub(r"\1", text)
    text = _REF.sub(r"\1", text)
    text = _LITERAL.sub(r"`\1`", text)
    text = re.sub(r"\s+::(?=\s|$)", "", text)  # "write ::" introduces a code block: nothing to show
    return re.sub(r"(\S)::(?=\s|$)", r"\1:", text)  # "like this::" reads "like this:"


def faq_pairs(path: Path) -> list[tuple[str, str]]:
    """(question, answer) per FAQ entry: a heading underlined with '-', up to the next heading."""
    lines = path.read_text(encoding="utf-8").splitlines()
    pairs = []
    i = 0
    while i < len(lines) - 1:
        head, rule = lines[i], lines[i + 1]
        if head.strip() and re.fullmatch(r"-{3,}", rule) and len(rule) >= len(head.strip()):
            j = i + 2
            body: list[str] = []
            while j < len(lines) - 1 and not (
                lines[j].strip()
                and re.fullmatch(r"[-=]{3,}", lines[j + 1])
                and len(lines[j + 1]) >= len(lines[j].strip())
            ):
                body.append(lines[j])
                j += 1
            pairs.append((plain(head.strip()), answer_text(body)))
            i = j
        else:
            i += 1
    return pairs


def answer_text(body: list[str]) -> str:
    """Paragraphs of the answer, directives dropped, cut at a paragraph boundary below MAX_ANSWER."""
    paragraphs: list[str] = []
    block: list[str] = []
    skipping = False
    for line in [*body, ""]:
        if line.startswith(".. "):
            skipping = not line.startswith((".. code-block::", ".. note::", ".. seealso::"))
            continue
        if skipping and (not line.strip() or line.startswith(" ")):
            continue
        skipping = False
        if line.strip():
            block.append(line.rstrip())
            continue
        if block:
            indented = all(x.startswith(" ") for x in block)
            text = "\n".join(block) if indented else " ".join(x.strip() for x in block)
            paragraphs.append(plain(text))
            block = []
    out = ""
    for p in paragraphs:
        if out and len(out) + len(p) + 2 > MAX_ANSWER:
            break
        out = f"{out}\n\n{p}" if out else p
    return out.strip()


def words(sentence: str) -> list[str]:
    return re.findall(r"[A-Za-z][A-Za-z'-]*", sentence)


def text_tasks(sentence: str, rng: random.Random) -> list[tuple[str, str]]:
    """Instructions with one right answer about one sentence."""
    w = words(sentence)
    longest = max(w, key=len)
    long_words = [x for x in w if len(x) > 6]
    tasks = [
        (
            f"Sort the words of this sentence alphabetically (ignoring case), comma-separated:\n{sentence}",
            ", ".join(sorted(w, key=str.lower)),
        ),
        (f"How many words are in this sentence?\n{sentence}", f"{len(w)}"),
        (f"Write the words of this sentence in reverse order:\n{sentence}", " ".join(reversed(w))),
        (f"Which is the longest word in this sentence?\n{sentence}", longest),
        (f"Rewrite this sentence in upper case:\n{sentence}", sentence.upper()),
        (
            f"Capitalize the first letter of every word:\n{sentence}",
            " ".join(x[:1].upper() + x[1:] for x in sentence.split()),
        ),
    ]
    if long_words:
        tasks.append(
            (
                f"List the words longer than six letters in this sentence, in order:\n{sentence}",
                ", ".join(long_words),
            )
        )
    return rng.sample(tasks, 2)


def build(doc_dir: Path) -> tuple[list[dict], list[dict], dict[str, int]]:
    root = next((p for p in doc_dir.rglob("faq") if (p / "general.rst.txt").is_file()), None)
    if root is None:
        sys.exit(
            f"error: no faq/ folder below {doc_dir}; pass the folder `dpkg-deb -x python3.11-doc_*.deb` made"
        )
    pairs: list[tuple[str, str]] = []
    for name in FAQ_FILES:
        pairs += faq_pairs(root / f"{name}.rst.txt")
    pairs = [(q, a) for q, a in pairs if len(a) >= 60 and q.endswith("?")]
    rng = random.Random(0)
    order = list(range(len(pairs)))
    rng.shuffle(order)
    held = set(order[:EVAL_QUESTIONS])
    splits: dict[str, list[dict]] = {"train": [], "eval": []}
    counts = {"faq_train": 0, "faq_eval": 0, "tasks_train": 0, "tasks_eval": 0, "yes_no": 0}

    def row(q: str, a: str) -> dict:
        return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}

    for i, (q, a) in enumerate(pairs):
        split = "eval" if i in held else "train"
        splits[split].append(row(q, a))
        counts[f"faq_{split}"] += 1
        for task in text_tasks(q, rng):
            splits[split].append(row(*task))
            counts[f"tasks_{split}"] += 1
        first = a.split()[0].strip(".,!").lower()
        if first in ("yes", "no"):
            splits[split].append(row(f"Answer with one word, yes or no: {q}", first.capitalize()))
            counts["yes_no"] += 1
    for rows in splits.values():
        rng.shuffle(rows)
    return splits["train"], splits["eval"], counts


README = """# instruct: varied instructions from the Python FAQ

Chat rows (`{{"messages": [user, assistant]}}`) of several kinds, so instruction tuning sees more than one
shape of request:

- **questions and answers** from the Python documentation's FAQ ("How do I make a Python script executable
  on Unix?", "Why are default values shared between objects?"): {faq_train} train, {faq_eval} eval;
- **text tasks with one right answer** about a FAQ question sentence: sort its words, count them, reverse
  them, find the longest, upper-case it, capitalize every word, list the words longer than six letters
  (two tasks per sentence, chosen at random): {tasks_train} train, {tasks_eval} eval;
- **one-word answers**: "Answer with one word, yes or no: ..." for the {yes_no} questions whose FAQ answer
  starts with Yes or No.

Definitions (what a term means) are in the `jargon` data set; Lab 1 mixes the two.

## Provenance

- Source: Debian package `python3.11-doc` (`apt-get download python3.11-doc`), the reST sources of the
  FAQ in `usr/share/doc/python3.11/html/_sources/faq/*.rst.txt` (Python 3.11 documentation).

## Licence

The Python documentation is under the Python Software Foundation License Version 2 (Debian's copyright
file for python3.11-doc; "Copyright © 2001-2023 Python Software Foundation. All rights reserved."), which
permits copying and derived works with the licence and copyright notice retained. This data set is a
derived work: text extracted and reformatted, the task rows generated from it.

## What was done

1. Every FAQ entry (a question heading underlined with `-`) from {files}; answers are the paragraphs up to
   the next heading, reST roles, links and literals turned into plain text, directives other than code
   blocks dropped, code examples kept with their indentation, cut at a paragraph boundary below {max}
   characters. Entries whose heading is not a question or whose answer is shorter than 60 characters were
   left out.
2. `random.Random(0)` holds out {eval_q} questions: their answers, their text tasks and their yes/no row
   are all in eval, none in train; then both splits are shuffled with the same generator.

## Counts

| file | rows |
| --- | --- |
| train.jsonl | {train} |
| eval.jsonl | {eval} |

## Regenerate

```
apt-get download python3.11-doc && dpkg-deb -x python3.11-doc_*_all.deb /tmp/python-doc
python -m sft.builtin_data.make_instruct --doc-dir /tmp/python-doc --out sft/builtin_data/instruct
```
"""


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--doc-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    train, evals, counts = build(args.doc_dir)
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "train.jsonl", train)
    write_jsonl(args.out / "eval.jsonl", evals)
    (args.out / "README.md").write_text(
        README.format(
            **counts,
            train=len(train),
            eval=len(evals),
            files=", ".join(f"`{f}.rst.txt`" for f in FAQ_FILES),
            max=MAX_ANSWER,
            eval_q=EVAL_QUESTIONS,
        )
    )
    print(f"train {len(train)} rows, eval {len(evals)} rows -> {args.out}")


if __name__ == "__main__":
    main()
