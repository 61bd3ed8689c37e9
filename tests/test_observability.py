"""What a run shows: the step metrics (MFU, throughput, padding, data wait, memory), run.json, plots/, `sft
report` on a finished and a running run, and the offline W&B run holding every metric (read back)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from sft.cli import main
from sft.train import train
from tests.conftest import tiny_recipe

STEP_METRICS = {
    "train/loss",
    "train/lr",
    "train/grad_norm",
    "train/trained_tokens",
    "train/tokens_per_s",
    "train/trained_tokens_per_s",
    "train/tokens_per_s_per_device",
    "train/samples_per_s",
    "train/tflops_per_device",
    "train/mfu",
    "train/padding_fraction",
    "train/data_wait_fraction",
    "train/optimizer_step_s",
    "train/step_time_s",
    "memory/peak_rss_gib",
}


def rows(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("observed") / "run"
    recipe = tiny_recipe(
        tiny_model_dir,
        out,
        train__max_steps=4,
        eval__every=2,
        logging__plots=True,
        logging__wandb__mode="offline",
        eval__prompts="['What is a kluge?']",
        eval__max_new_tokens=4,
    )
    train(recipe)
    return out


def test_every_step_logs_the_metrics_and_they_are_sane(run: Path) -> None:
    steps = [r for r in rows(run) if "train/loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        assert set(r) >= STEP_METRICS, STEP_METRICS - set(r)
        assert 0 < r["train/mfu"] < 1
        assert 0 <= r["train/padding_fraction"] < 1 and 0 <= r["train/data_wait_fraction"] < 1
        assert r["train/tokens_per_s"] >= r["train/trained_tokens_per_s"] > 0
        assert r["train/samples_per_s"] > 0 and 0 < r["train/optimizer_step_s"] < r["train/step_time_s"]
        assert 0.05 < r["memory/peak_rss_gib"] < 64
    # The loss of a step is what it logged as trained tokens: 4 padded samples (one per row, no packing).
    assert all(
        abs(
            r["train/tokens_per_s"] / r["train/samples_per_s"]
            - r["train/tokens_per_s"] / r["train/samples_per_s"]
        )
        == 0
        for r in steps
    )


def test_run_json_records_what_ran(run: Path) -> None:
    m = json.loads((run / "run.json").read_text())
    assert m["versions"]["torch"] == torch.__version__ and m["versions"]["python"]
    assert m["world_size"] == 1 and len(m["devices"]) == 1 and m["hosts"]
    assert len(m["recipe_hash"]) == 64 and m["seed"] == 0
    (key, fingerprint), *_ = m["data"].items()
    assert key.startswith("train[0] builtin:jargon/train") and len(fingerprint) == 64
    [attempt] = m["attempts"]
    assert attempt["status"] == "done" and attempt["to_step"] == 4 and attempt["ended"] >= attempt["started"]
    assert m["wandb"]["id"] and m["wandb"]["mode"] == "offline"


def test_plots_and_report_of_a_finished_run(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("overview.png", "loss.png"):
        png = run / "plots" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    assert "status      done; step 4 of 4" in out
    assert "eval loss" in out and "before training" in out and "MFU" in out and "host RSS" in out
    assert "[before] What is a kluge?" in out and "[after] What is a kluge?" in out


def test_report_of_a_running_run(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    live = tmp_path / "live"
    shutil.copytree(
        run, live, ignore=shutil.ignore_patterns("final", "checkpoints", "wandb", "plots", "results.json")
    )
    lines = (live / "metrics.jsonl").read_text().splitlines()
    (live / "metrics.jsonl").write_text(
        "\n".join(lines[:3]) + '\n{"step": 3, "train/lo'
    )  # a line being written
    manifest = json.loads((live / "run.json").read_text())
    attempt = manifest["attempts"][-1]
    attempt["status"] = "running"
    del attempt["ended"]
    (live / "run.json").write_text(json.dumps(manifest))
    assert main(["report", str(live)]) == 0
    out = capsys.readouterr().out
    assert "status      running; step 2 of 4" in out and "s in logged steps so far" in out
    assert (live / "plots" / "overview.png").is_file()


def test_offline_wandb_run_holds_every_logged_metric(run: Path) -> None:
    """Read the offline run's transaction log back with wandb's own reader (`wandb leet inspect --json`)."""
    wandb_cli = Path(sys.executable).with_name("wandb")
    [folder] = list((run / "wandb").glob("offline-run-*"))
    proc = subprocess.run(
        [str(wandb_cli), "leet", "inspect", "--json", str(folder)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    history: dict[int, dict[str, Any]] = {}
    for r in records:
        if r.get("type") == "history":
            h = r["history"]
            history.setdefault(int(h["step"]["num"]), {}).update(h["item"])
    logged = rows(run)
    assert logged
    for row in logged:
        held = history[row["step"]]
        for key, value in row.items():
            if key != "step":
                assert math.isclose(float(held[key]), value, rel_tol=1e-9), (row["step"], key)
    config = next(r["run"]["config"]["update"] for r in records if r.get("type") == "run")
    assert config["run"]["recipe_hash"] == json.loads((run / "run.json").read_text())["recipe_hash"]


def test_a_failed_run_records_its_error(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}
    real = __import__("sft.train", fromlist=["loss_sum"]).loss_sum

    def failing(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected failure")
        return real(*args, **kwargs)

    monkeypatch.setattr("sft.train.loss_sum", failing)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="injected failure"):
        train(tiny_recipe(tiny_model_dir, out))
    attempt = json.loads((out / "run.json").read_text())["attempts"][-1]
    assert attempt["status"] == "failed" and attempt["error"] == "RuntimeError: injected failure"


def test_batch_counts_and_model_flops() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from sft.config import LoraConfig
    from sft.model.load import add_lora
    from sft.throughput import attention_flops_per_pair, batch_counts, matmul_flops_per_token

    # Packed: two samples (3 and 2 tokens) and one padding token in a row of 6.
    packed = {
        "input_ids": torch.zeros(1, 6, dtype=torch.long),
        "labels": torch.tensor([[-100, 1, 1, -100, 1, -100]]),
        "position_ids": torch.tensor([[0, 1, 2, 0, 1, 0]]),
    }
    assert batch_counts(packed) == [3.0, 5.0, 6.0, 2.0, 1 + 2 + 3 + 1 + 2 + 1]
    padded = {
        "input_ids": torch.zeros(2, 4, dtype=torch.long),
        "labels": torch.tensor([[-100, 1, 1, 1], [-100, 1, -100, -100]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]),
    }
    assert batch_counts(padded) == [4.0, 6.0, 8.0, 2.0, 10 + 3]

    config = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(config)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert matmul_flops_per_token(model) == 6 * linear  # forward, input and weight gradients of every matmul
    assert attention_flops_per_pair(model) == 12 * 32 * 2
    lora = add_lora(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    adapters = sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n)
    assert matmul_flops_per_token(lora) == 4 * linear + 6 * adapters  # frozen weights: no weight gradient
