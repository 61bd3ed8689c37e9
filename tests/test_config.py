"""Recipe loading, overrides and validation; the CLI's error contract (one line, exit 2); no torch import."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sft.cli import main
from sft.config import load_recipe, warmup_warnings
from sft.errors import SftError

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "recipes" / "quickstart.yaml"


def test_quickstart_recipe_loads_with_overrides() -> None:
    r = load_recipe(QUICKSTART, ["train.max_steps=20", "lora.r=8", "optim.lr=3e-4", "data.train=x.jsonl"])
    assert r.train.max_steps == 20 and r.lora.r == 8 and r.optim.lr == 3e-4
    assert r.model.name == "builtin:smollm2-135m-instruct"
    assert [s.path for s in r.data.train] == ["x.jsonl"]
    # `model: NAME` shorthand still takes nested overrides
    assert load_recipe(QUICKSTART, ["model.dtype=bfloat16"]).model.dtype == "bfloat16"


def test_warmup_longer_than_the_run_is_said_not_refused() -> None:
    # A short trial of a longer recipe (the README's train.max_steps=4 on a recipe with 5 warmup steps) runs.
    r = load_recipe(QUICKSTART, ["train.max_steps=2"])
    assert r.optim.warmup_steps == 5
    (line,) = warmup_warnings(r.optim, 2)
    assert "optim.warmup_steps=5 is not below the run's 2 steps" in line and "never reaches optim.lr" in line
    assert warmup_warnings(r.optim, 6) == []


def test_every_shipped_recipe_is_valid() -> None:
    for path in sorted((REPO / "recipes").glob("*.yaml")):
        if not path.name.startswith("merge"):
            load_recipe(path)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("trian.max_steps=3", "unknown key 'trian'; did you mean 'train'?"),
        ("train.max_stepz=3", "unknown key 'train.max_stepz'; did you mean 'train.max_steps'?"),
        ("lora.alpah=3", "did you mean 'lora.alpha'?"),
        ("train.max_steps=abc", "train.max_steps: Input should be a valid integer"),
        ("train.micro_batch_size=0", "train.micro_batch_size: Input should be greater than 0"),
        ("method=qlorra", "method: Input should be 'full', 'lora' or 'qlora'"),
        ("model.attn_implementation=flash_attention_2 train.device=cpu", "flash_attention_2 needs a GPU"),
        (
            "optim.warmup_steps=3 optim.warmup_ratio=0.1",
            "optim: set optim.warmup_steps or optim.warmup_ratio",
        ),
        ("resume=true overwrite=true", "resume=true and overwrite=true contradict"),
        ("train.max_steps", "expected key=value"),
    ],
)
def test_bad_recipes_name_the_key(override: str, expected: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SftError, match=None) as err:
        load_recipe(QUICKSTART, override.split())
    assert expected in str(err.value)
    assert "\n" not in str(err.value)
    # Through the CLI: one line on stderr, exit code 2, no traceback.
    code = main(["train", str(QUICKSTART), *override.split(), "--check"])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.count("\n") == 1 and expected in captured.err and "Traceback" not in captured.err


def test_broken_yaml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_steps: [1,\n")
    with pytest.raises(SftError, match=r"bad.yaml: line \d+ is not valid YAML"):
        load_recipe(bad)
    with pytest.raises(SftError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    not_mapping = tmp_path / "list.yaml"
    not_mapping.write_text("- a\n- b\n")
    with pytest.raises(SftError, match="a recipe is a mapping"):
        load_recipe(not_mapping)


def test_help_and_validation_do_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from sft.cli import main\n"
        f"assert main(['train', {str(QUICKSTART)!r}, '--check']) == 0\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "try:\n    main(['train', '--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'deepspeed') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "usage: sft" in out.stdout and "train" in out.stdout


def test_resolved_recipe_round_trips(tmp_path: Path) -> None:
    r = load_recipe(QUICKSTART, ["train.max_steps=7"])
    saved = tmp_path / "r.yaml"
    saved.write_text(r.to_yaml())
    assert load_recipe(saved) == r
