"""The single-process training loop on a tiny random model (fast) with the real tokenizer and data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from sft.checkpoint import latest_checkpoint
from sft.signals import Preempted
from sft.train import train
from tests.conftest import StopAfter, tiny_recipe


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model.safetensors"))


def test_accumulation_and_micro_batch_do_not_change_losses_or_weights(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    runs = {}
    for micro, accum in [(4, 1), (1, 4), (2, 2)]:
        out = tmp_path / f"m{micro}a{accum}"
        train(
            tiny_recipe(
                tiny_model_dir, out, method="full", train__micro_batch_size=micro, train__grad_accum=accum
            )
        )
        runs[(micro, accum)] = out
    ref = runs[(4, 1)]
    for key, out in runs.items():
        a, b = losses(ref), losses(out)
        assert a.keys() == b.keys() == {1, 2, 3}
        for step in a:
            assert abs(a[step] - b[step]) <= 1e-5 * abs(a[step]), (key, step, a[step], b[step])
        wa, wb = final_weights(ref), final_weights(out)
        for name in wa:
            assert torch.allclose(wa[name], wb[name], rtol=0, atol=1e-5), (key, name)
    # The weights really moved: the comparison above is not between untrained copies.
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    assert any(not torch.equal(base[n], final_weights(ref)[n]) for n in base)


def test_lora_step_changes_only_adapter_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    from sft.data.pipeline import DataPipeline
    from sft.dist import DistEnv
    from sft.loss import loss_sum
    from sft.model.load import add_lora, load_model, load_tokenizer
    from sft.strategies.single import SingleStrategy

    recipe = tiny_recipe(tiny_model_dir, tmp_path / "run", method="lora", lora__dropout=0.0)
    model = add_lora(load_model(recipe.model, torch.device("cpu")), recipe.lora)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    strategy = SingleStrategy(recipe, DistEnv(0, 0, 1, torch.device("cpu")))
    model, optimizer = strategy.prepare(model)
    batch = DataPipeline(recipe, load_tokenizer(recipe.model)).micro_batches(0)[0]
    for _ in range(2):  # lora_B starts at zero: the second step moves lora_A too
        loss_sum(model, batch, "fp32").backward()
        strategy.step(optimizer, 1.0)
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed and all("lora_" in n for n in changed)
    assert {n for n in before if "lora_" in n} == changed  # every adapter matrix trained
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters() if "lora_" not in n)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_preempt_then_resume_is_bit_exact(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    kw: dict[str, Any] = {
        "method": method,
        "train__max_steps": 6,
        "checkpoint__every": 4,
        "optim__warmup_steps": 2,
    }
    whole = tmp_path / "whole"
    train(tiny_recipe(tiny_model_dir, whole, **kw))

    cut = tmp_path / "cut"
    monkeypatch.setattr("sft.train.StopFlag", lambda: StopAfter(3))
    with pytest.raises(Preempted):
        train(tiny_recipe(tiny_model_dir, cut, **kw))
    assert latest_checkpoint(cut) is not None and latest_checkpoint(cut).name == "step-0000003"
    assert not (cut / "final").exists()
    monkeypatch.undo()
    train(tiny_recipe(tiny_model_dir, cut, resume=True, **kw))

    a, b = losses(whole), losses(cut)
    assert list(b) == [1, 2, 3, 4, 5, 6]  # no step trained twice or skipped
    assert a == b  # bit-exact on one process
    name = "model.safetensors" if method == "full" else "adapter_model.safetensors"
    wa, wb = load_file(str(whole / "final" / name)), load_file(str(cut / "final" / name))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_checkpoints_rotate_and_pointer_names_newest(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(tiny_recipe(tiny_model_dir, out, train__max_steps=5, checkpoint__every=1, checkpoint__keep=2))
    kept = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert kept == ["step-0000004", "step-0000005"]
    assert latest_checkpoint(out) == out / "checkpoints" / "step-0000005"
    assert not list((out / "checkpoints").glob(".*partial"))


def test_existing_run_is_not_overwritten_by_accident(tiny_model_dir: Path, tmp_path: Path) -> None:
    from sft.errors import SftError

    out = tmp_path / "run"
    train(tiny_recipe(tiny_model_dir, out, train__max_steps=1))
    with pytest.raises(SftError, match="already holds a run; add resume=true"):
        train(tiny_recipe(tiny_model_dir, out, train__max_steps=1))
    train(tiny_recipe(tiny_model_dir, out, train__max_steps=2, overwrite=True))
    assert list(losses(out)) == [1, 2]


def test_cli_runs_from_any_directory(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(tiny_recipe(tiny_model_dir, out, train__max_steps=1).to_yaml())
    env = {**os.environ, "PYTHONPATH": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "sft.cli", "train", str(recipe)], cwd=tmp_path, env=env, capture_output=True
    )
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert (out / "final" / "adapter_model.safetensors").is_file()
