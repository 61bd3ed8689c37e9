"""Build the built-in `jargon` instruction data set from the Jargon File, as packaged by Debian (`dict-jargon`).

    apt-get download dict-jargon && dpkg-deb -x dict-jargon_*_all.deb /tmp/dict-jargon
    python -m sft.builtin_data.make_jargon --dict-dir /tmp/dict-jargon --out sft/builtin_data/jargon

`--dict-dir` is the folder `dpkg-deb -x` extracted into (or any folder below which `jargon.index` lies).
Writes train.jsonl, eval.jsonl (chat rows) and README.md (provenance, licence, counts). Standard library only,
and deterministic: the same package and options give byte-identical files.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

BODY_INDENT = "    "  # definition lines are indented by four spaces
# dictd writes offsets and lengths in base 64 with this alphabet, most significant digit first.
B64_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

QUESTIONS = (
    "What does the hacker jargon term '{term}' mean?",
    'Explain the jargon word "{term}".',
    "In hacker slang, what is {term}?",
    'What is meant by "{term}" in hacker jargon?',
    "Define the hacker term '{term}'.",
    'I came across the word "{term}" among programmers. What does it mean?',
)

# A definition that is nothing but a pointer elsewhere ("See {boot}.", "[SI] See {quantifiers}.") teaches nothing.
XREF_WORDS = (
    r"(?:see(?: also)?|same as|compare|syn\.?|synonym for|variant of|abbrev\.? for|abbreviation for|and|or)"
)
XREF_ONLY = re.compile(rf"^(?:\[[^\]]*\]\s*)*(?:{XREF_WORDS}|\{{[^}}]*\}}|[\s,.;:()])*$", re.IGNORECASE)


@dataclass(frozen=True)
class Entry:
    term: str
    definition: str


def b64_number(text: str) -> int:
    value = 0
    for char in text:
        value = value * 64 + B64_ALPHABET.index(char)
    return value


def find_one(root: Path, name: str) -> Path:
    matches = sorted(root.rglob(name))
    if not matches:
        sys.exit(f"error: no {name} below {root}; pass the folder that `dpkg-deb -x dict-jargon_*.deb` made")
    return matches[0]


def read_dictd(index_path: Path, dict_path: Path) -> list[str]:
    """Raw entry texts in index order; the index may point several headwords at one entry, keep it once."""
    # .dict.dz is gzip with an extra random-access header field, which plain gzip ignores.
    data = gzip.decompress(dict_path.read_bytes())
    seen: set[tuple[int, int]] = set()
    texts = []
    for line in index_path.read_text(encoding="utf-8").splitlines():
        _headword, offset, length = line.split("\t")
        span = (b64_number(offset), b64_number(length))
        if span not in seen:
            seen.add(span)
            # Offsets count bytes of the decompressed file, so slice bytes before decoding.
            texts.append(data[span[0] : span[0] + span[1]].decode("utf-8"))
    return texts


def join_lines(lines: list[str]) -> str:
    """Join the wrapped lines of one prose paragraph. The wrapper broke lines inside quotes and before punctuation
    ("“\\n 1506 nix", "Language\\n , compiled"), so no space goes after an opening mark or before a closing one."""
    out = ""
    for line in (line.strip() for line in lines):
        if (
            out
            and not out.endswith(("“", "‘", "(", "{", "/"))
            and not line.startswith((",", ".", ";", ":", ")", "”", "}"))
        ):
            out += " "
        out += line
    out = re.sub(r"\{\s*([^{}]*?)\s*\}", r"\1", out)  # {word} links to another entry: keep the word
    out = re.sub(r"“\s+", "“", re.sub(r"\s+”", "”", out))  # the wrapper also left "“ The Story"
    return re.sub(r"\s+", " ", out).strip()


def keep_lines(lines: list[str]) -> str:
    """A preformatted paragraph (verse, code, a table): the source spells its spaces as no-break spaces.
    Keep its line breaks and indentation; unlink only one-line {word} so C braces survive."""
    out = "\n".join(line.removeprefix(BODY_INDENT).replace("\xa0", " ").rstrip() for line in lines)
    return re.sub(r"\{([^{}\n]+)\}", r"\1", out)


def is_preformatted(lines: list[str]) -> bool:
    return any("\xa0" in line for line in lines) or all(line.startswith(BODY_INDENT + "  ") for line in lines)


def clean(text: str) -> Entry | None:
    """One raw dictd entry -> (headword, definition), or None for metadata and cross-reference-only entries."""
    lines = text.replace("\xad", "").rstrip("\n").split("\n")  # soft hyphens from the HTML source: drop
    term = lines[0].strip()
    if not term or term.startswith("00-database-"):
        return None
    # Line 1 holds the pronunciation and part of speech ("/dev·nuhl/, n."); the body starts after the first blank line.
    start = next((i for i, line in enumerate(lines) if i > 0 and not line.strip()), len(lines))
    paragraphs: list[list[str]] = [[]]
    for line in lines[start:]:
        if line.strip():
            paragraphs[-1].append(line)
        elif paragraphs[-1]:
            paragraphs.append([])
    paragraphs = [p for p in paragraphs if p]
    # The converter left debris: the next section's letter ("A") after the last entry of a letter, "()" for images.
    while paragraphs and re.fullmatch(r"[A-Z]|\(\)", paragraphs[-1][0].strip()) and len(paragraphs[-1]) == 1:
        paragraphs.pop()
    raw = "\n\n".join(" ".join(line.strip() for line in p) for p in paragraphs)
    if not raw or XREF_ONLY.match(raw):
        return None
    definition = "\n\n".join(keep_lines(p) if is_preformatted(p) else join_lines(p) for p in paragraphs)
    return Entry(term, definition)


def jargon_version(texts: list[str]) -> str:
    for text in texts:
        if text.startswith("00-database-short"):
            return text.split("\n", 1)[1].strip()  # "The Jargon File (version 4.4.7, 29 Dec 2003)"
    return "unknown"


def debian_version(root: Path) -> str:
    changelogs = sorted(root.rglob("changelog.Debian.gz"))
    if not changelogs:
        return "unknown"
    # The first line reads "dict-jargon (4.4.7-3.1) unstable; urgency=medium".
    first = gzip.decompress(changelogs[0].read_bytes()).decode("utf-8").split("\n", 1)[0]
    match = re.match(r"(\S+) \(([^)]+)\)", first)
    return f"{match[1]} {match[2]}" if match else "unknown"


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def chat_row(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dict-dir", type=Path, required=True, help="folder dict-jargon was extracted into")
    parser.add_argument(
        "--out", type=Path, required=True, help="output folder (e.g. sft/builtin_data/jargon)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-rows", type=int, default=100)
    parser.add_argument("--min-chars", type=int, default=80)
    parser.add_argument("--max-chars", type=int, default=1200)
    args = parser.parse_args(argv)

    texts = read_dictd(find_one(args.dict_dir, "jargon.index"), find_one(args.dict_dir, "jargon.dict.dz"))
    entries = [e for e in map(clean, texts) if e is not None]
    kept = [e for e in entries if args.min_chars <= len(e.definition) <= args.max_chars]
    # Questions must be unique, or "held out" would leak. ("OP" and "op" are two entries: distinct questions.)
    if len({e.term for e in kept}) != len(kept):
        sys.exit("error: duplicate headwords after cleaning; the split would leak questions")

    rng = random.Random(args.seed)
    rows = [chat_row(rng.choice(QUESTIONS).format(term=e.term), e.definition) for e in kept]
    order = list(range(len(rows)))
    rng.shuffle(order)
    held_out = set(order[: args.eval_rows])
    # Each file stays in dictionary order, so regenerating after a change gives a readable diff.
    train = [row for i, row in enumerate(rows) if i not in held_out]
    evaluation = [row for i, row in enumerate(rows) if i in held_out]

    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "train.jsonl", train)
    write_jsonl(args.out / "eval.jsonl", evaluation)
    options = "".join(
        f" --{name.replace('_', '-')} {getattr(args, name)}"
        for name in ("seed", "eval_rows", "min_chars", "max_chars")
        if getattr(args, name) != parser.get_default(name)
    )
    readme = README.format(
        debian=debian_version(args.dict_dir),
        jargon=jargon_version(texts),
        n_entries=len(texts),
        n_clean=len(entries),
        n_kept=len(kept),
        n_train=len(train),
        n_eval=len(evaluation),
        min_chars=args.min_chars,
        max_chars=args.max_chars,
        seed=args.seed,
        options=options,
        questions="\n".join(f"   - {q.format(term='X')}" for q in QUESTIONS),
    )
    (args.out / "README.md").write_text(readme, encoding="utf-8")
    print(
        f"{len(texts)} entries, {len(entries)} with a definition, {len(kept)} kept: "
        f"{len(train)} train, {len(evaluation)} eval -> {args.out}"
    )


README = """\
# jargon: questions and answers from the Jargon File

Chat rows (`{{"messages": [user, assistant]}}`): the user asks what a hacker-jargon term means, the assistant
answers with the Jargon File's definition. Small, clean, and public domain: good for instruction tuning tests.

## Provenance

- Source: Debian package `{debian}` (`apt-get download dict-jargon`), dictd files `jargon.index` and
  `jargon.dict.dz`. It holds the Lexicon part of the Jargon File only.
- Text: {jargon}.

## Licence

Public domain. The Jargon File says: "This document (the Jargon File) is in the public domain, to be freely
used, shared, and modified." Please cite it as "Jargon File 4.4.7". (The Debian packaging scripts are GPL-2+,
but none of them is included here.)

## What was done

1. Read all {n_entries} dictd entries; dropped the `00-database-*` metadata entries and entries whose definition
   is only a cross reference ("See {{boot}}."): {n_clean} left.
2. Dropped the headword and pronunciation/part-of-speech lines, joined wrapped lines into paragraphs
   (blank line between paragraphs, numbered senses kept), and turned `{{link}}` markup into plain words.
   Preformatted blocks (verse, code, tables; spaced with no-break spaces in the source) keep their line
   breaks and indentation with plain spaces. Soft hyphens and converter debris (a lone section letter
   such as "A" after the last entry of a letter, "()" image stubs) were removed.
3. Kept definitions of {min_chars} to {max_chars} characters: {n_kept} entries.
4. Asked each question in one of these phrasings, chosen with `random.Random({seed})`:
{questions}
5. A seeded shuffle held out the eval rows; both files are in dictionary order.

## Counts

| file | rows |
| --- | --- |
| train.jsonl | {n_train} |
| eval.jsonl | {n_eval} |

No question appears twice, so no eval question is seen in training.

## Regenerate

```
apt-get download dict-jargon && dpkg-deb -x dict-jargon_*_all.deb /tmp/dict-jargon
python -m sft.builtin_data.make_jargon --dict-dir /tmp/dict-jargon --out sft/builtin_data/jargon{options}
```
"""


if __name__ == "__main__":
    main()
