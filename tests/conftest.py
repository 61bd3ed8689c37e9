"""Shared fixtures: the built-in model folder, a tiny random model with the real tokenizer, recipes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

# Tests never reach the network (DESIGN invariant 7).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def builtin_dir() -> Path:
    from sft.model.builtin import builtin_model_dir

    return builtin_model_dir("builtin:smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tokenizer(builtin_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(builtin_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, builtin_dir: Path, tokenizer: Any) -> Path:
    """A 2-layer Llama with random weights and the built-in tokenizer: real code paths, fast steps."""
    return random_llama(
        tmp_path_factory.mktemp("tiny-llama"), tokenizer, hidden_size=64, intermediate_size=128
    )


def random_llama(out: Path, tokenizer: Any, hidden_size: int, intermediate_size: int) -> Path:
    """Save a 2-layer Llama of this width with random weights (seed 0) and the tokenizer into `out`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


TEMPLATES = REPO / "tests" / "fixtures" / "templates"


def swap_template(tokenizer: Any, name: str) -> Any:
    """A copy of `tokenizer` with another model family's chat template and special tokens (fixtures)."""
    import copy
    import json

    tok = copy.deepcopy(tokenizer)
    spec = json.loads((TEMPLATES / f"{name}.json").read_text())
    tok.add_special_tokens({k: spec[k] for k in ("bos_token", "eos_token", "pad_token") if spec.get(k)})
    tok.add_tokens(spec["special_tokens"], special_tokens=True)
    tok.add_tokens(spec["tokens"])
    tok.chat_template = (TEMPLATES / f"{name}.jinja").read_text()
    return tok


def tiny_recipe(model_dir: Path, output_dir: Path, **overrides: Any) -> Any:
    """A fast recipe on the tiny model and the built-in data (short sequences, no W&B)."""
    from sft.config import apply_override, validate_recipe

    raw: dict[str, Any] = {
        "model": {"name": str(model_dir)},
        "data": {"max_seq_len": 64},
        "train": {"micro_batch_size": 4, "grad_accum": 1, "max_steps": 3, "device": "cpu"},
        "optim": {"lr": 1e-3, "warmup_steps": 0},
        "eval": {"max_batches": 1, "batch_size": 4},
        "logging": {"wandb": {"mode": "disabled"}, "progress": False, "plots": False},
        "output_dir": str(output_dir),
    }
    for key, value in overrides.items():
        apply_override(raw, f"{key.replace('__', '.')}={value}")
    return validate_recipe(raw)


class StopAfter:
    """Stands in for the signal flag: asks to stop once `n` steps have run (deterministic preemption)."""

    calls = 0

    def __init__(self, n: int) -> None:
        self.n = n
        self.signal_name = "SIGUSR1"

    def install(self) -> None:
        StopAfter.calls = 0

    @property
    def requested(self) -> bool:
        StopAfter.calls += 1
        return StopAfter.calls >= self.n


# The quantization record of an NF4 + double quant base with float32 compute (sft_adapter.json's "quantization").
QUANT = {
    "quant_type": "nf4",
    "double_quant": True,
    "blocksize": 64,
    "compute_dtype": "float32",
    "quant_storage": "uint8",
}
