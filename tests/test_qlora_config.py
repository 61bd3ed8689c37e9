"""QLoRA recipe validation (issue 5): impossible combinations fail before any model loads, naming the reason.

No torch here: config validation must not import it (DESIGN invariant 8).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sft.config import load_recipe
from sft.errors import SftError

REPO = Path(__file__).resolve().parents[1]
QLORA_QUICKSTART = REPO / "recipes" / "qlora_quickstart.yaml"
QLORA_8B = REPO / "recipes" / "qlora_llama3_8b_24gb.yaml"


def test_qlora_recipes_load() -> None:
    quick = load_recipe(QLORA_QUICKSTART)
    assert quick.method == "qlora" and quick.model.name.startswith("builtin:") and quick.train.device == "cpu"
    big = load_recipe(QLORA_8B)
    assert big.method == "qlora" and big.model.name == "meta-llama/Llama-3.1-8B-Instruct"
    assert (big.quant.quant_type, big.quant.double_quant, big.quant.compute_dtype) == (
        "nf4",
        True,
        "bfloat16",
    )
    assert big.optim.name == "paged_adamw_8bit" and big.model.gradient_checkpointing
    assert big.model.dtype == "bfloat16" and big.train.precision == "bf16"
    assert (big.data.max_seq_len, big.train.micro_batch_size) == (2048, 2)


def test_validating_a_qlora_recipe_does_not_import_torch() -> None:
    code = (
        "import sys; from sft.config import load_recipe; "
        f"load_recipe({str(QLORA_8B)!r}, ['optim.name=adamw_8bit', 'quant.quant_type=fp4']); "
        "assert 'torch' not in sys.modules and 'bitsandbytes' not in sys.modules, 'torch imported'"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr


def test_quant_and_optimizer_keys_are_typed() -> None:
    r = load_recipe(
        QLORA_QUICKSTART,
        [
            "quant.quant_type=fp4",
            "quant.double_quant=false",
            "quant.storage_dtype=bfloat16",
            "optim.name=adamw_8bit",
        ],
    )
    assert (r.quant.quant_type, r.quant.double_quant, r.quant.storage_dtype) == ("fp4", False, "bfloat16")
    with pytest.raises(SftError, match="quant.quant_type: Input should be 'nf4' or 'fp4'"):
        load_recipe(QLORA_QUICKSTART, ["quant.quant_type=int4"])
    with pytest.raises(SftError, match="optim.name: Input should be 'adamw', 'adamw_8bit', 'paged_adamw'"):
        load_recipe(QLORA_QUICKSTART, ["optim.name=sgd"])
    with pytest.raises(SftError, match="did you mean 'quant.double_quant'"):
        load_recipe(QLORA_QUICKSTART, ["quant.double_quantization=true"])


def _strategies() -> set[str]:
    from typing import get_args

    from sft.config import StrategyConfig

    return set(get_args(StrategyConfig.model_fields["name"].annotation))


needs_sharded = pytest.mark.skipif(
    not {"fsdp2", "deepspeed"} <= _strategies(), reason="strategy.name has no fsdp2/deepspeed yet"
)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            ["method=lora", "quant.quant_type=fp4"],
            "the quant section applies to method=qlora (got method=lora)",
        ),
        (
            ["model.dtype=float16", "quant.compute_dtype=bfloat16"],
            "model.dtype=float16 and quant.compute_dtype=bfloat16 mixes two half types",
        ),
        (
            ["model.dtype=bfloat16", "quant.compute_dtype=float16"],
            "model.dtype=bfloat16 and quant.compute_dtype=float16 mixes two half types",
        ),
        (
            ["quant.compute_dtype=float16", "train.precision=bf16"],
            "quant.compute_dtype=float16 and train.precision=bf16 mixes two half types",
        ),
        (
            ["model.dtype=bfloat16", "quant.compute_dtype=bfloat16", "lora.modules_to_save=[lm_head]"],
            "lora.modules_to_save trains full copies of ['lm_head'] in float32 while model.dtype=bfloat16",
        ),
    ],
)
def test_impossible_qlora_combinations_are_rejected(overrides: list[str], expected: str) -> None:
    with pytest.raises(SftError) as err:
        load_recipe(QLORA_QUICKSTART, overrides)
    assert expected in str(err.value) and "\n" not in str(err.value)


@needs_sharded
@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            ["strategy.name=deepspeed", "strategy.deepspeed.zero_stage=3"],
            "method=qlora is not supported under strategy.name=deepspeed: ZeRO-3 partitions every parameter",
        ),
        (
            ["strategy.name=deepspeed", "strategy.deepspeed.zero_stage=2"],
            "method=qlora is not supported under strategy.name=deepspeed",
        ),
        (
            ["quickstart", "strategy.name=deepspeed", "optim.name=paged_adamw_8bit"],
            "optim.name=paged_adamw_8bit is a bitsandbytes optimizer, but DeepSpeed builds",
        ),
        (
            ["quickstart", "strategy.name=fsdp2", "optim.name=adamw_8bit"],
            "optim.name=adamw_8bit is a bitsandbytes optimizer; its kernels update plain tensors",
        ),
        (
            ["strategy.name=fsdp2", "model.dtype=bfloat16", "train.precision=bf16"],
            "method=qlora under fsdp2 needs quant.storage_dtype=bfloat16",
        ),
        (
            [
                "strategy.name=fsdp2",
                "model.dtype=bfloat16",
                "train.precision=bf16",
                "quant.storage_dtype=bfloat16",
                "lora.use_dora=true",
            ],
            "lora.use_dora with method=qlora under fsdp2",
        ),
        (
            [
                "strategy.name=fsdp2",
                "quant.storage_dtype=float32",
                "train.precision=bf16",
                "strategy.fsdp.param_dtype=bfloat16",
            ],
            "strategy.fsdp.param_dtype=bfloat16 would cast their bytes into other numbers",
        ),
    ],
)
def test_qlora_combinations_with_sharded_strategies(overrides: list[str], expected: str) -> None:
    recipe = QLORA_QUICKSTART
    if overrides[0] == "quickstart":  # the LoRA quickstart: bitsandbytes optimizers without QLoRA
        recipe, overrides = REPO / "recipes" / "quickstart.yaml", overrides[1:]
    with pytest.raises(SftError) as err:
        load_recipe(recipe, overrides)
    assert expected in str(err.value), str(err.value)


@needs_sharded
def test_fsdp_qlora_with_float_storage_validates() -> None:
    r = load_recipe(
        QLORA_QUICKSTART,
        [
            "strategy.name=fsdp2",
            "model.dtype=bfloat16",
            "train.precision=bf16",
            "quant.storage_dtype=bfloat16",
            "optim.name=adamw",
        ],
    )
    assert r.method == "qlora" and r.quant.storage_dtype == "bfloat16"


@needs_sharded
def test_qlora_fsdp2_recipe_validates() -> None:
    r = load_recipe(REPO / "recipes" / "qlora_fsdp2.yaml")
    assert (r.method, r.strategy.name, r.optim.name) == ("qlora", "fsdp2", "adamw")
    assert r.quant.storage_dtype == r.model.dtype
    # bf16 autocast over float32 storage: allowed, the packed weights are gathered as float32 (param_dtype auto).
    assert (
        load_recipe(REPO / "recipes" / "qlora_fsdp2.yaml", ["train.precision=bf16"]).train.precision == "bf16"
    )


def test_dora_on_4bit_is_allowed_on_one_device() -> None:
    # peft 0.21 applies DoRA to bitsandbytes 4-bit layers (it dequantizes the weight for the norm).
    assert load_recipe(QLORA_QUICKSTART, ["lora.use_dora=true"]).lora.use_dora


def test_a_lora_recipe_dumped_and_reloaded_keeps_validating(tmp_path: Path) -> None:
    # The saved recipe.yaml holds every section with its defaults, quant included: that is not "setting" it.
    r = load_recipe(REPO / "recipes" / "quickstart.yaml")
    path = tmp_path / "r.yaml"
    path.write_text(r.to_yaml())
    assert load_recipe(path).method == "lora"
