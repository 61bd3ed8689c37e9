"""Strategy pieces that need no process group: the DeepSpeed config filling, recipe checks, checkpoint
metadata, the sharded export format. The distributed behaviour is in test_strategies_dist.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from sft.cli import main
from sft.config import load_recipe
from sft.errors import SftError
from tests.conftest import tiny_recipe

REPO = Path(__file__).resolve().parents[1]
DS = ["strategy.name=deepspeed"]


@pytest.mark.parametrize(
    ("overrides", "stage", "offload"),
    [
        (["strategy.deepspeed.zero_stage=1"], 1, False),
        (["strategy.deepspeed.zero_stage=2", "train.precision=bf16"], 2, False),
        (["strategy.deepspeed.zero_stage=3"], 3, False),
        (["strategy.deepspeed.zero_stage=3", "strategy.deepspeed.offload_optimizer=true"], 3, True),
        (["strategy.deepspeed.zero_stage=2", "strategy.deepspeed.offload_optimizer=true"], 2, True),
    ],
)
def test_bundled_ds_configs_fill_every_auto_from_the_recipe(
    overrides: list[str], stage: int, offload: bool
) -> None:
    from sft.ds_config import config_path, fill_config

    recipe = load_recipe(
        REPO / "recipes" / "quickstart.yaml",
        [*DS, *overrides, "train.micro_batch_size=3", "train.grad_accum=5", "optim.lr=3e-4"],
    )
    cfg = fill_config(recipe, world_size=4, on_gpu=False, hidden_size=64)
    expected_file = "zero3_offload.json" if stage == 3 and offload else f"zero{stage}.json"
    assert config_path(recipe).name == expected_file
    assert "auto" not in json.dumps(cfg)
    assert cfg["train_micro_batch_size_per_gpu"] == 3 and cfg["gradient_accumulation_steps"] == 5
    assert cfg["train_batch_size"] == 3 * 5 * 4
    assert cfg["gradient_clipping"] == 1.0
    assert cfg["bf16"]["enabled"] is (recipe.train.precision == "bf16")
    assert cfg["zero_optimization"]["stage"] == stage
    assert cfg["zero_optimization"]["offload_optimizer"]["device"] == ("cpu" if offload else "none")
    assert cfg["optimizer"]["params"]["lr"] == 3e-4
    assert cfg["optimizer"]["params"]["torch_adam"] is (not offload)  # no compiled op unless offloading
    assert "scheduler" not in cfg  # the recipe's schedule runs in the loop


def _user_json(tmp_path: Path, **changes: Any) -> str:
    cfg = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    for dotted, value in changes.items():
        node = cfg
        *parents, last = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path = tmp_path / "my_ds.json"
    path.write_text(json.dumps(cfg))
    return str(path)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        (
            {"train_micro_batch_size_per_gpu": 8},
            "train_micro_batch_size_per_gpu=8 contradicts the recipe's train.micro_batch_size",
        ),
        ({"gradient_accumulation_steps": 3}, "contradicts the recipe's train.grad_accum"),
        ({"gradient_clipping": 0.5}, "contradicts the recipe's optim.max_grad_norm"),
        ({"bf16__enabled": True}, "bf16.enabled=true contradicts the recipe's train.precision"),
        ({"fp16__enabled": True}, "fp16.enabled=true contradicts the recipe's train.precision"),
        ({"zero_optimization__stage": 3}, "contradicts the recipe's strategy.deepspeed.zero_stage"),
        ({"optimizer__params__lr": 0.1}, "optimizer.params.lr=0.1 contradicts the recipe's optim.lr"),
        ({"optimizer__type": "Lamb"}, "contradicts the recipe's optim.name"),
        (
            {"zero_optimization__offload_optimizer": {"device": "cpu"}},
            "contradicts the recipe's strategy.deepspeed.offload_optimizer",
        ),
        ({"scheduler": {"type": "WarmupLR"}}, "remove the 'scheduler' section"),
    ],
)
def test_user_ds_json_contradicting_the_recipe_fails_before_launch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], changes: dict[str, Any], expected: str
) -> None:
    overrides = [*DS, f"strategy.deepspeed.config={_user_json(tmp_path, **changes)}"]
    with pytest.raises(SftError) as err:
        load_recipe(REPO / "recipes" / "quickstart.yaml", overrides)
    assert expected in str(err.value) and "my_ds.json" in str(err.value)
    # Through the CLI's --check (what `sft launch` runs first): one line, exit 2.
    assert main(["train", str(REPO / "recipes" / "quickstart.yaml"), *overrides, "--check"]) == 2
    assert expected in capsys.readouterr().err


def test_user_ds_json_agreeing_with_the_recipe_is_accepted(tmp_path: Path) -> None:
    from sft.ds_config import fill_config

    path = _user_json(
        tmp_path, train_micro_batch_size_per_gpu=8, gradient_clipping=1.0, zero_optimization__stage=2
    )
    recipe = load_recipe(
        REPO / "recipes" / "quickstart.yaml",
        [*DS, f"strategy.deepspeed.config={path}", "train.micro_batch_size=8"],
    )
    assert fill_config(recipe, 2, False, 64)["train_micro_batch_size_per_gpu"] == 8
    # train_batch_size needs the world size: checked when the job starts.
    path = _user_json(tmp_path, train_batch_size=16)
    recipe = load_recipe(
        REPO / "recipes" / "quickstart.yaml",
        [*DS, f"strategy.deepspeed.config={path}", "train.micro_batch_size=4", "train.grad_accum=2"],
    )
    with pytest.raises(
        ValueError, match="train_batch_size=16 but micro_batch_size x grad_accum x processes = 24"
    ):
        fill_config(recipe, 3, False, 64)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            [*DS, "strategy.deepspeed.zero_stage=2", "strategy.deepspeed.offload_params=true"],
            "offload_params needs zero_stage=3",
        ),
        (
            [
                "strategy.name=fsdp2",
                "strategy.fsdp.activation_checkpointing=true",
                "model.gradient_checkpointing=true",
            ],
            "both recompute activations",
        ),
        (["strategy.name=fsdp2", "strategy.fsdp.param_dtype=bfloat16"], "set train.precision=bf16"),
        ([*DS, "strategy.deepspeed.config=/nonexistent/ds.json"], "/nonexistent/ds.json not found"),
        (["strategy.name=megatron"], "strategy.name: Input should be 'single', 'fsdp2' or 'deepspeed'"),
    ],
)
def test_bad_strategy_combinations_name_the_keys(overrides: list[str], expected: str) -> None:
    with pytest.raises(SftError, match=None) as err:
        load_recipe(REPO / "recipes" / "quickstart.yaml", overrides)
    assert expected in str(err.value)


def test_validating_a_deepspeed_recipe_does_not_import_torch() -> None:
    code = (
        "import sys; from sft.config import load_recipe\n"
        "load_recipe('recipes/full_zero3_offload.yaml'); load_recipe('recipes/full_fsdp2.yaml')\n"
        "heavy = [m for m in ('torch', 'deepspeed', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_checkpoint_meta_refuses_another_backend_or_world_size(tmp_path: Path) -> None:
    from sft.dist import DistEnv
    from sft.strategies.base import check_meta, write_meta

    cpu = torch.device("cpu")
    write_meta(tmp_path, DistEnv(0, 0, 4, cpu), "deepspeed", zero_stage=3)
    with pytest.raises(SftError, match="written by 4 processes and deepspeed cannot reshard it for 2"):
        check_meta(tmp_path, DistEnv(0, 0, 2, cpu), "deepspeed", reshardable=False)
    with pytest.raises(
        SftError, match="written by strategy deepspeed; resume it with strategy.name=deepspeed"
    ):
        check_meta(tmp_path, DistEnv(0, 0, 4, cpu), "fsdp2", reshardable=True)
    assert check_meta(tmp_path, DistEnv(0, 0, 4, cpu), "deepspeed", reshardable=False)["zero_stage"] == 3
    write_meta(tmp_path, DistEnv(0, 0, 4, cpu), "fsdp2")
    check_meta(tmp_path, DistEnv(0, 0, 2, cpu), "fsdp2", reshardable=True)  # DCP reshards


def test_single_strategy_refuses_several_processes(tiny_model_dir: Path, tmp_path: Path) -> None:
    from sft.dist import DistEnv
    from sft.strategies.single import SingleStrategy

    with pytest.raises(SftError, match="set strategy.name=fsdp2 or deepspeed"):
        SingleStrategy(tiny_recipe(tiny_model_dir, tmp_path), DistEnv(1, 1, 2, torch.device("cpu")))


def test_large_export_is_sharded_with_an_index_and_loads(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sft.export import save_hf_folder

    recipe = tiny_recipe(tiny_model_dir, tmp_path / "run", method="full")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out = tmp_path / "export"
    out.mkdir()
    save_hf_folder(
        recipe, out, model, state, AutoTokenizer.from_pretrained(tiny_model_dir), max_shard_size="2MB"
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, state[name]), name

    # The merge stage reads sharded exports: the average of this one and a second, shifted by 1.
    from sft.merge.config import load_merge_config
    from sft.merge.run import merge

    other = tmp_path / "export2"
    other.mkdir()
    shifted = {k: v + 1 for k, v in state.items()}
    save_hf_folder(
        recipe, other, model, shifted, AutoTokenizer.from_pretrained(tiny_model_dir), max_shard_size="2MB"
    )
    merged = tmp_path / "merged"
    merge(load_merge_config(None, ["method=linear", f"models=[{out}, {other}]", f"output={merged}"]))
    averaged = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).state_dict()
    for name, tensor in averaged.items():
        torch.testing.assert_close(tensor, state[name] + 0.5, rtol=0, atol=1e-6, msg=name)


def test_fsdp_shards_each_decoder_layer(tiny_model_dir: Path, tmp_path: Path) -> None:
    from sft.model.layers import decoder_layers
    from sft.model.load import add_lora, load_model

    recipe = tiny_recipe(tiny_model_dir, tmp_path, method="lora")
    model = load_model(recipe.model, torch.device("cpu"))
    assert [type(m).__name__ for m in decoder_layers(model)] == ["LlamaDecoderLayer"] * 2
    assert len(decoder_layers(add_lora(model, recipe.lora))) == 2  # also inside a peft wrapper
    with pytest.raises(SftError, match="found no decoder layers"):
        decoder_layers(torch.nn.Linear(2, 2))
