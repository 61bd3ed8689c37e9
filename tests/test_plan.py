"""The memory planner (sft/plan.py, `sft plan`) against measured memory, and the check before a run.

The model-state half (bytes each rank's tensors hold in 2-rank FSDP2 / ZeRO-1/2/3 runs) is in
tests/test_strategies_dist.py, next to the launches that measure it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sft.cli import main
from tests.conftest import random_llama, tiny_recipe

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> Path:
    """A 2-layer Llama wide enough that its layers' activations weigh next to the logits."""
    return random_llama(
        tmp_path_factory.mktemp("small-llama"), tokenizer, hidden_size=256, intermediate_size=1024
    )


# (name, overrides): full fine-tuning, LoRA and QLoRA at two sequence lengths.
CONFIGS = [
    ("full_64", ["method=full", "data.max_seq_len=64"]),
    ("full_256", ["method=full", "data.max_seq_len=256"]),
    ("lora_256", ["method=lora", "data.max_seq_len=256"]),
    ("qlora_128", ["method=qlora", "data.max_seq_len=128"]),
]


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory, small_model_dir: Path) -> dict[str, Any]:
    """Each config run for 3 steps in one process; the allocation peak of steps 2-3 (tests/distributed/run_jobs.py)."""
    root = tmp_path_factory.mktemp("plan")
    rows = (REPO / "sft" / "builtin_data" / "jargon" / "train.jsonl").read_text().splitlines()
    (root / "train.jsonl").write_text("\n".join(rows[:64]) + "\n")
    recipe = tiny_recipe(small_model_dir, root / "unused")
    raw = recipe.model_dump(mode="json")
    # Packed full rows, every token trained: the plan's worst case (micro_batch_size x max_seq_len tokens) is
    # what runs.
    raw["data"].update(train=[{"path": str(root / "train.jsonl")}], eval=[], packing=True, train_on="all")
    (root / "base.yaml").write_text(json.dumps(raw))
    jobs = [
        {
            "name": name,
            "recipe": str(root / "base.yaml"),
            "overrides": [f"output_dir={root / name}", *o],
            "measure": True,
        }
        for name, o in CONFIGS
    ]
    (root / "jobs.json").write_text(json.dumps(jobs))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("WORLD_SIZE", None)
    runner = REPO / "tests" / "distributed" / "run_jobs.py"
    proc = subprocess.run(
        [sys.executable, str(runner), str(root / "jobs.json"), str(root / "results.json")],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = {r["name"]: r for r in json.loads((root / "results.json").read_text())}
    return {"root": root, "results": results}


@pytest.mark.slow
@pytest.mark.parametrize("name", [name for name, _ in CONFIGS])
def test_planned_peak_is_within_15_percent_of_the_measured_peak(measured: dict[str, Any], name: str) -> None:
    from sft.config import load_recipe
    from sft.plan import make_plan

    overrides = dict(CONFIGS)[name]
    recipe = load_recipe(measured["root"] / "base.yaml", overrides)
    plan = make_plan(recipe, 1, "cpu", None, ["single"])
    row = plan.row("single")
    peak = measured["results"][name]["peak_bytes"][0]
    assert abs(row.peak - peak) <= 0.15 * peak, (name, row, peak)
    # The model state alone is exact (what the optimizer step sees).
    state = measured["results"][name]["state_bytes"][0]["all"] - measured["results"][name]["start_bytes"][0]
    assert row.state is not None and abs(row.state.total - state) <= 0.02 * state


def test_quantized_base_bytes_equal_the_loaded_4bit_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    import torch

    from sft.model import build_model
    from sft.model.quant import memory_report
    from sft.plan import meta_model, params_of

    recipe = tiny_recipe(tiny_model_dir, tmp_path / "run", method="qlora")
    loaded = memory_report(build_model(recipe, torch.device("cpu")), "adamw")
    planned = params_of(meta_model(recipe)[0], recipe.quant)
    quantized = sum(p.bytes + p.quant_state for p in planned if p.quant_state)
    assert abs(quantized - loaded["quantized_bytes"]) <= 0.01 * loaded["quantized_bytes"]
    trainable = sum(p.numel for p in planned if p.trainable)
    assert trainable == loaded["params_trainable"]


def test_sft_plan_prints_every_layout_and_a_recommendation(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(tiny_recipe(tiny_model_dir, tmp_path / "run", method="full").to_yaml())
    assert main(["plan", str(recipe), "--gpus", "2", "--gpu", "h100"]) == 0
    out = capsys.readouterr().out
    for layout in ("zero1", "zero2", "fsdp2", "zero3", "fsdp2+offload", "zero2+offload", "zero3+offload"):
        assert f"\n{layout} " in out, out
    assert "single *" in out and "one process, not 2" in out  # the recipe's own layout, first
    assert "recommended: zero1, the fastest layout that fits" in out
    assert main(["plan", str(recipe), "--gpu", "nosuchgpu"]) == 2


def test_train_refuses_a_recipe_that_cannot_fit_before_loading_anything(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(tiny_recipe(tiny_model_dir, out, method="full").to_yaml())
    # 512 x 4096 tokens with the full loss: ~1.1 TiB of logits alone, more than any machine here has (the
    # chunked loss would plan ~20 GiB, which a machine with more free memory can hold).
    overrides = ["train.micro_batch_size=512", "data.max_seq_len=4096", "train.loss_impl=full"]
    code = main(["train", str(recipe), *overrides])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("sft: error: plan: single needs") and "--force" in err and "host RAM" in err
    assert not out.exists()


# The hub's parameter counts of the bundled models (their model pages), to the digits the hub shows.
PUBLISHED_BILLIONS = {
    "meta-llama/Llama-3.1-8B": "8.03",
    "meta-llama/Llama-3.1-8B-Instruct": "8.03",
    "meta-llama/Llama-3.1-70B": "70.6",
    "meta-llama/Llama-3.1-70B-Instruct": "70.6",
    "meta-llama/Llama-3.2-1B": "1.24",
    "meta-llama/Llama-3.2-1B-Instruct": "1.24",
    "meta-llama/Llama-3.2-3B": "3.21",
    "meta-llama/Llama-3.2-3B-Instruct": "3.21",
    "Qwen/Qwen2.5-7B": "7.62",
    "Qwen/Qwen2.5-7B-Instruct": "7.62",
    "mistralai/Mistral-7B-v0.3": "7.25",
    "mistralai/Mistral-7B-Instruct-v0.3": "7.25",
    "google/gemma-2-9b": "9.24",
    "google/gemma-2-9b-it": "9.24",
    "microsoft/Phi-3-mini-4k-instruct": "3.82",
}
ARCHITECTURE_KEYS = {
    "architectures",
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "max_position_embeddings",
    "tie_word_embeddings",
    "attention_bias",
    "mlp_bias",
}


def test_bundled_configs_build_the_published_models() -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from sft.model.bundled import bundled_config_dir, bundled_models

    assert bundled_models() == sorted(PUBLISHED_BILLIONS)
    readme = (REPO / "sft" / "model" / "bundled_configs" / "README.md").read_text()
    for name, billions in PUBLISHED_BILLIONS.items():
        folder = bundled_config_dir(name.upper())  # hub ids match without regard to case
        assert folder is not None and f"https://huggingface.co/{name}/blob/main/config.json" in readme
        assert set(json.loads((folder / "config.json").read_text())) <= ARCHITECTURE_KEYS, name
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
        n = sum(p.numel() for p in model.parameters())
        assert f"{n / 1e9:.3g}" == billions, (name, n)
    assert bundled_config_dir("meta-llama/Llama-3.1-8B-Instruct-nosuch") is None


@pytest.fixture
def hub_unreachable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Offline, with an empty hub cache (whatever this machine has cached)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))


def test_sft_plan_offline_falls_back_to_the_bundled_config(
    hub_unreachable: None, capsys: pytest.CaptureFixture[str]
) -> None:
    from sft.config import load_recipe
    from sft.plan import GIB, make_plan

    recipe = str(REPO / "recipes" / "qlora_llama3_8b_24gb.yaml")
    assert main(["plan", recipe, "--gpu-memory", "24GB"]) == 0
    out = capsys.readouterr().out
    assert (
        "model config: bundled with sft (sft/model/bundled_configs/meta-llama/Llama-3.1-8B-Instruct/" in out
    )
    assert "32 layers, hidden 4096, vocabulary 128256" in out and "\nsingle *" in out
    # One 24 GB GPU, the recipe's 2 x 2048 tokens: QLoRA fits with room, LoRA on the bf16 base only just,
    # full fine-tuning not at all (its bf16 weights and their gradients alone are 30 GiB).
    peaks = {}
    for method in ("full", "lora", "qlora"):
        # (a lora section is refused with method=full)
        overrides = [f"method={method}", *(["lora={}"] if method == "full" else [])]
        plan = make_plan(load_recipe(recipe, overrides), 1, "24 GB", 24e9, ["single"])
        assert plan.config_source.startswith("bundled with sft")
        row = plan.row("single")
        peaks[method] = (row.peak / GIB, row.fits)
    assert peaks["qlora"][1] and peaks["qlora"][0] < 12
    assert peaks["lora"][1] and peaks["lora"][0] > 16
    assert not peaks["full"][1] and peaks["full"][0] > 40
    assert peaks["qlora"][0] < peaks["lora"][0] < peaks["full"][0]


def test_an_unknown_hub_id_offline_is_one_line_naming_the_bundled_models(
    hub_unreachable: None, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = str(REPO / "recipes" / "qlora_llama3_8b_24gb.yaml")
    assert main(["plan", recipe, "model.name=nosuch-org/nosuch-model"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "could not read the config of nosuch-org/nosuch-model" in err
    assert "meta-llama/Llama-3.1-8B-Instruct" in err and "folder with the model's config.json" in err
