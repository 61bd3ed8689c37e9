"""`sft data preview` and the domain adaptation recipe (raw Shakespeare, packed, every token trained)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sft.cli import main
from sft.config import load_recipe
from sft.data.pipeline import DataPipeline
from sft.data.preview import highlight
from tests.conftest import REPO, tiny_recipe


def test_preview_prints_trained_tokens_and_statistics(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(tiny_recipe(tiny_model_dir, tmp_path / "run").to_yaml())
    assert main(["data", "preview", str(recipe), "data.packing=true", "data.max_seq_len=256", "-n", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("---- sample ") == 2 and "[[" in out and "<|im_end|>]]" in out
    assert "micro-batch 1: " in out and "packed rows" in out and "% padding" in out
    assert "1787 rows -> 1787 samples" in out and "eval data: 100 rows" in out
    assert not (tmp_path / "run").exists()  # a preview writes no run folder


def test_highlight_marks_trained_spans(tokenizer: Any) -> None:
    import numpy as np

    ids = np.array(tokenizer("one two three four")["input_ids"])
    trained = np.array([False, True, True, False])
    assert highlight(tokenizer, ids, trained, color=False) == "one[[ two three]] four"
    assert "\x1b[32m two three\x1b[0m" in highlight(tokenizer, ids, trained, color=True)


def test_domain_adaptation_recipe_trains_every_token_packed(tiny_model_dir: Path, tokenizer: Any) -> None:
    recipe = load_recipe(REPO / "recipes" / "domain_adaptation.yaml", [f"model.name={tiny_model_dir}"])
    assert recipe.data.packing and recipe.data.train[0].path == "builtin:shakespeare/train"
    data = DataPipeline(recipe, tokenizer)
    st = data.train_stats.total
    # every token of the corpus is trained exactly once: all but each row's first, and the overlap
    # tokens a continuation chunk repeats as context (trained in the chunk before)
    overlap = recipe.data.split_overlap * (st.split_chunks - st.split_rows)
    assert st.trained_tokens == st.tokens - overlap - st.rows
    assert st.skipped == st.truncated == st.dropped_too_long == 0
    batch = data.micro_batches(0)[0]
    assert "position_ids" in batch and "attention_mask" not in batch and batch["input_ids"].shape[1] <= 512
