"""Step options: train.compile (torch.compile of the decoder layers) and train.activation_offload give the
same losses as the plain step; where they cannot work the recipe says so before anything is loaded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sft.config import load_recipe
from sft.errors import SftError
from sft.train import train
from tests.conftest import tiny_recipe

REPO = Path(__file__).resolve().parents[1]


def losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if "train/loss" in r]


def close(a: list[float], b: list[float], rtol: float = 1e-5) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= rtol * abs(x) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(
    "overrides",
    [
        {"method": "lora", "lora__dropout": 0.0, "data__packing": "true"},
        {"method": "full", "model__gradient_checkpointing": "true"},
    ],
    ids=["lora packed", "full + gradient checkpointing"],
)
def test_compiled_layers_train_like_eager_ones(
    tiny_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    overrides: dict[str, Any],
) -> None:
    # aot_eager: dynamo's tracing and AOT autograd as with inductor, without generating C++ kernels (minutes
    # on CI's two cores); BENCHMARKS.md measures inductor itself.
    monkeypatch.setattr("sft.model.compile.BACKEND", "aot_eager")
    import torch

    torch._dynamo.reset()
    kw = {**overrides, "train__max_steps": 2}
    train(tiny_recipe(tiny_model_dir, tmp_path / "eager", **kw))
    result = train(tiny_recipe(tiny_model_dir, tmp_path / "compiled", train__compile="true", **kw))
    assert close(losses(tmp_path / "eager"), losses(tmp_path / "compiled"))
    assert result["steps"] == 2
    assert "[sft] train.compile: first step" in capsys.readouterr().out


def test_compile_is_refused_where_it_cannot_work(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SftError, match="train.compile=true is not supported under strategy.name=deepspeed"):
        load_recipe(REPO / "recipes" / "quickstart.yaml", ["train.compile=true", "strategy.name=deepspeed"])
    import torch

    from sft.model.compile import check_compile_toolchain

    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(SftError, match="needs a C.. compiler"):
        check_compile_toolchain(torch.device("cpu"))


def test_offload_hooks_move_saved_activations_but_not_parameters() -> None:
    """The hooks' logic, on CPU tensors (on a GPU the copies go to pinned CPU memory and back)."""
    import torch

    from sft.model.offload import OffloadActivations
    from tests.test_loss import batch, llama, loss_and_grads

    linear = torch.nn.Linear(64, 32)
    x = torch.randn(16, 64, requires_grad=True)
    hooks = OffloadActivations()
    with hooks:
        linear(x).sum().backward()
    assert hooks.moved_bytes == x.numel() * 4  # the input, not the weight (a parameter)

    reference_loss, reference = loss_and_grads(llama(), "chunked")
    model = llama()
    hooks = OffloadActivations()
    with hooks:
        loss = loss_sum_of(model, batch())
    loss.backward()
    assert hooks.moved_bytes > 0 and float(loss) == reference_loss
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, reference[name]), name


def loss_sum_of(model: Any, b: Any) -> Any:
    from sft.loss import loss_sum

    model.train()
    return loss_sum(model, b, "fp32")


def test_activation_offload_is_refused_on_a_cpu() -> None:
    import torch

    from sft.model.offload import offload_activations

    with pytest.raises(SftError, match="train.activation_offload=true moves activations from the GPU"):
        load_recipe(
            REPO / "recipes" / "quickstart.yaml", ["train.activation_offload=true", "train.device=cpu"]
        )
    with pytest.raises(SftError, match="this run is on the CPU"):
        offload_activations(torch.nn.Linear(2, 2), torch.device("cpu"))
