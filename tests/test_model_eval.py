"""`sft eval` on the tiny model: the loss the training loop reports, for model folders and adapter folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sft.cli import main
from tests.conftest import tiny_recipe


def test_eval_of_an_adapter_equals_the_runs_own_held_out_loss(tiny_model_dir: Path, tmp_path: Path) -> None:
    from sft.train import train

    recipe = tiny_recipe(
        tiny_model_dir,
        tmp_path / "run",
        data__eval="[builtin:code/eval]",
        eval__batch_size=4,
        eval__max_batches=2,
        train__max_steps=2,
        data__max_seq_len=512,
    )
    results = train(recipe)
    out = tmp_path / "eval.json"
    code = main(
        [
            "eval",
            str(tmp_path / "run" / "final"),
            "--data",
            "builtin:code/eval",
            "--max-seq-len",
            "512",
            "--batch-size",
            "4",
            "--max-batches",
            "2",
            "--prompt",
            "def add(a, b):",
            "--max-new-tokens",
            "3",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    got = json.loads(out.read_text())
    row = got["sources"]["builtin:code/eval"]
    assert row["samples"] == 8 and row["tokens"] == results["eval_after"]["eval/tokens"]
    assert row["loss"] == pytest.approx(results["eval_after"]["eval/loss"], abs=1e-5)
    assert len(got["answers"]) == 1 and got["answers"][0]["prompt"] == "def add(a, b):"

    # the base folder: the run's loss before training
    assert main(["eval", str(tiny_model_dir), "--data", "builtin:code/eval", "--max-seq-len", "512",
                 "--batch-size", "4", "--max-batches", "2", "--json", str(out)]) == 0  # fmt: skip
    before = json.loads(out.read_text())["sources"]["builtin:code/eval"]["loss"]
    assert before == pytest.approx(results["eval_before"]["eval/loss"], abs=1e-5)


def test_eval_bad_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", str(tmp_path), "--data", "nope.jsonl"]) == 2
    assert "data: file not found: nope.jsonl" in capsys.readouterr().err
    assert main(["eval", "builtin:smollm2-135m-instruct"]) == 2
    assert "nothing to do" in capsys.readouterr().err
