"""QLoRA on one process (issue 5): a 4-bit base that really is 4-bit, adapters that are the only thing
training changes, evaluation that does not corrupt training, exact resume with 8-bit optimizer state, the
adapter's record for the merge, and the memory report. Fast tests use the tiny random model (its dimensions
are multiples of bitsandbytes' 64-value blocks); the built-in model's test is marked slow."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from sft.checkpoint import latest_checkpoint
from sft.dist import DistEnv
from sft.loss import loss_sum
from sft.signals import Preempted
from sft.train import train
from tests.conftest import tiny_recipe
from tests.test_train import StopAfter, losses

bnb = pytest.importorskip("bitsandbytes")

CPU = torch.device("cpu")


def qlora_recipe(model_dir: Path, out: Path, **overrides: Any) -> Any:
    # float32 compute: the fast path on CPU, and exact comparisons stay meaningful.
    kw: dict[str, Any] = {"method": "qlora", "quant__compute_dtype": "float32", "lora__dropout": 0.0}
    return tiny_recipe(model_dir, out, **{**kw, **overrides})


def prepared(recipe: Any) -> tuple[Any, Any, Any]:
    """Model, optimizer and strategy as the training loop builds them."""
    from sft.model import build_model
    from sft.strategies.single import SingleStrategy

    strategy = SingleStrategy(recipe, DistEnv(0, 0, 1, CPU))
    model, optimizer = strategy.prepare(build_model(recipe, CPU))
    model.train()
    return model, optimizer, strategy


def first_batch(recipe: Any) -> dict[str, torch.Tensor]:
    from sft.data.pipeline import DataPipeline
    from sft.model.load import load_tokenizer

    return DataPipeline(recipe, load_tokenizer(recipe.model)).micro_batches(0)[0]


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's stored values (packed bytes for 4-bit weights) and every 4-bit scale."""
    out = {n: p.data.detach().clone() for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        if isinstance(p, bnb.nn.Params4bit):
            out[n + ".absmax"] = p.quant_state.absmax.clone()
    return out


def test_4bit_layers_hold_packed_uint8_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    from sft.model import build_model

    model = build_model(qlora_recipe(tiny_model_dir, tmp_path / "run"), CPU)
    original = load_file(str(tiny_model_dir / "model.safetensors"))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(layers) == 2 * 7  # q, k, v, o, gate, up, down in both decoder layers; not the output head
    for name, layer in layers.items():
        key = name.removeprefix("base_model.model.").removesuffix(".base_layer") + ".weight"
        w, ref = layer.weight, original[key]
        assert isinstance(w, bnb.nn.Params4bit) and w.dtype == torch.uint8 and not w.requires_grad
        assert w.numel() * 2 == ref.numel()  # two 4-bit values per byte
        state = w.quant_state
        assert (state.quant_type, state.blocksize, state.nested) == ("nf4", 64, True)  # nested: double quant
        restored = bnb.functional.dequantize_4bit(w.data, state).float()
        assert restored.shape == ref.shape and not torch.equal(restored, ref)
        # Really 4-bit: a block of 64 weights takes at most 16 values (scaled NF4 levels) ...
        assert restored.flatten()[:64].unique().numel() <= 16
        # ... and approximates the original weights closely.
        assert (restored - ref).abs().mean() < 0.1 * ref.abs().mean()
    # Weights that stay unquantized keep model.dtype.
    assert model.get_input_embeddings().weight.dtype == torch.float32


def test_qlora_step_changes_only_adapter_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    recipe = qlora_recipe(
        tiny_model_dir,
        tmp_path / "run",
        optim__name="paged_adamw_8bit",
        lora__r=64,
        model__gradient_checkpointing=True,
    )
    model, optimizer, strategy = prepared(recipe)
    assert type(optimizer).__name__ == "PagedAdamW8bit"
    before = snapshot(model)
    batch = first_batch(recipe)
    for _ in range(2):  # lora_B starts at zero: the second step moves lora_A too
        loss_sum(model, batch, "fp32").backward()
        strategy.step(optimizer, 1.0)
    after = snapshot(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    adapters = {n for n, p in model.named_parameters() if p.requires_grad}
    assert adapters and all("lora_" in n for n in adapters)
    assert changed == adapters  # every adapter matrix trained; no 4-bit byte, scale or other weight moved


def test_eval_and_generation_do_not_corrupt_gradients(tiny_model_dir: Path, tmp_path: Path) -> None:
    """bitsandbytes repacks 4-bit weights for an inference kernel without a backward on an eval-mode no-grad
    forward on AVX512-BF16 CPUs (FACTS.md). The harness's own eval and generation must leave the gradients
    exactly as they were."""
    from sft.data.pipeline import DataPipeline
    from sft.evaluate import eval_loss, generate_answers
    from sft.model.load import load_tokenizer
    from sft.model.quant import linear4bit_layers, repacked_layers

    recipe = qlora_recipe(tiny_model_dir, tmp_path / "run")
    model, optimizer, strategy = prepared(recipe)
    tokenizer = load_tokenizer(recipe.model)
    data = DataPipeline(recipe, tokenizer)
    batch = data.micro_batches(0)[0]
    loss_sum(model, batch, "fp32").backward()
    strategy.step(optimizer, 1.0)  # lora_B is no longer zero: every adapter matrix gets a gradient

    def gradients() -> dict[str, torch.Tensor]:
        model.train()
        model.zero_grad(set_to_none=True)
        loss_sum(model, batch, "fp32").backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    def evaluate() -> None:
        eval_loss(model, data.eval_batches(), "fp32", lambda t: t)
        generate_answers(model, tokenizer, ["What is a kluge?"], 4, "fp32")

    reference = gradients()
    assert reference and all(g.abs().sum() > 0 for g in reference.values())
    evaluate()
    assert repacked_layers(model) == []
    after = gradients()
    assert all(torch.equal(reference[n], after[n]) for n in reference)

    # The trap is real on this machine: without the fix the same evaluation corrupts them.
    if not bnb.functional.has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes has no inference repack to guard against")
    for layer in linear4bit_layers(model):
        layer.support_avx512bf16_for_cpu = True
    evaluate()
    assert repacked_layers(model)
    corrupted = gradients()
    assert any(not torch.allclose(reference[n], corrupted[n], atol=1e-5) for n in reference)


def test_adapter_save_then_load_gives_the_same_logits(tiny_model_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel

    from sft.model.load import load_model, load_tokenizer

    recipe = qlora_recipe(
        tiny_model_dir, tmp_path / "run", quant__quant_type="fp4", quant__double_quant=False
    )
    model, optimizer, strategy = prepared(recipe)
    batch = first_batch(recipe)
    for _ in range(2):
        loss_sum(model, batch, "fp32").backward()
        strategy.step(optimizer, 1.0)
    folder = tmp_path / "adapter"
    folder.mkdir()
    strategy.export(folder, model, load_tokenizer(recipe.model))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    model.eval()
    with torch.no_grad():
        trained = model(**inputs).logits

    assert (folder / "adapter_model.safetensors").is_file()
    assert json.loads((folder / "sft_adapter.json").read_text()) == {
        "base_model": str(tiny_model_dir),
        "quantization": {
            "quant_type": "fp4",
            "double_quant": False,
            "blocksize": 64,
            "compute_dtype": "float32",
            "quant_storage": "uint8",
            "dtype": "float32",  # the dtype the weights were quantized from (the base's load dtype)
        },
        "method": "qlora",
    }
    base = load_model(recipe.model, CPU, recipe.quant)
    reloaded = PeftModel.from_pretrained(base, folder).eval()
    with torch.no_grad():
        again = reloaded(**inputs).logits
    assert torch.equal(trained, again)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of per-parameter state tensors (the shared 8-bit code books and step counters left out)."""
    total = 0
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and key not in ("step", "qmap1", "qmap2"):
                total += value.numel() * value.element_size()
    return total


@pytest.mark.parametrize("optim_name", ["adamw", "adamw_8bit"])
def test_memory_report_is_measured_and_the_optimizer_plan_holds(
    tiny_model_dir: Path, tmp_path: Path, optim_name: str
) -> None:
    from sft.model.load import count_parameters
    from sft.model.quant import describe_memory, memory_report

    recipe = qlora_recipe(tiny_model_dir, tmp_path / "run", optim__name=optim_name, lora__r=64)
    model, optimizer, strategy = prepared(recipe)
    report = memory_report(model, optim_name)
    trainable, total = count_parameters(model)
    assert (report["params_trainable"], report["params_total"]) == (trainable, total)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    linear_values = sum(m.in_features * m.out_features for m in layers)
    assert report["params_4bit"] == linear_values
    # The base's bytes: the bf16 figure counts every frozen value at 2 bytes; 4-bit halves a byte per value
    # for the linear layers and adds their quantization state.
    frozen = total - trainable
    assert report["base_bf16_bytes"] == 2 * frozen
    assert report["quantized_bf16_bytes"] == 2 * linear_values
    # Half a byte per value, plus one 8-bit scale per 64 values (double quant) and small code books.
    overhead = report["quantized_bytes"] - linear_values // 2
    assert linear_values // 64 <= overhead < linear_values // 32 + 2048 * len(layers)
    # The rest (embeddings, norms) stays in model.dtype (float32 here).
    assert report["base_bytes"] == report["quantized_bytes"] + 4 * (frozen - linear_values)
    loss_sum(model, first_batch(recipe), "fp32").backward()
    strategy.step(optimizer, 1.0)
    assert report["optimizer_state_bytes"] == optimizer_state_bytes(
        optimizer
    )  # the plan is what it allocates
    text = describe_memory(report)
    assert "4-bit nf4 + double quant" in text and "in bf16" in text and optim_name in report["optimizer"]


def test_qlora_preempt_then_resume_is_bit_exact_with_8bit_optimizer_state(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    summaries: list[dict[str, Any]] = []
    monkeypatch.setattr("sft.metrics.Metrics.summary", lambda self, values: summaries.append(values))
    kw: dict[str, Any] = {
        "train__max_steps": 4,
        "checkpoint__every": 3,
        "optim__warmup_steps": 2,
        "optim__name": "paged_adamw_8bit",
        "lora__r": 64,  # adapter matrices of >= 4096 values get 8-bit state
    }
    whole = tmp_path / "whole"
    train(qlora_recipe(tiny_model_dir, whole, **kw))
    # The memory report is printed at start and logged (W&B summary).
    assert "[sft] memory, measured from the loaded tensors" in capsys.readouterr().out
    logged = summaries[0]
    assert logged["memory/quantized_bytes"] < logged["memory/quantized_bf16_bytes"] / 2

    cut = tmp_path / "cut"
    with monkeypatch.context() as m:
        m.setattr("sft.train.StopFlag", lambda: StopAfter(2))
        with pytest.raises(Preempted):
            train(qlora_recipe(tiny_model_dir, cut, **kw))
    ckpt = latest_checkpoint(cut)
    assert ckpt is not None and ckpt.name == "step-0000002"
    state = torch.load(ckpt / "optimizer.pt", weights_only=True)  # 8-bit state loads without pickle
    dtypes = {
        v.dtype
        for s in state["state"].values()
        for q in s.values()
        if isinstance(q, dict)
        for v in q.values()
    }
    assert torch.uint8 in dtypes
    train(qlora_recipe(tiny_model_dir, cut, resume=True, **kw))

    a, b = losses(whole), losses(cut)
    assert list(b) == [1, 2, 3, 4]
    assert a == b  # bit-exact on one process
    wa = load_file(str(whole / "final" / "adapter_model.safetensors"))
    wb = load_file(str(cut / "final" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    meta = json.loads((whole / "final" / "sft_adapter.json").read_text())
    assert meta["method"] == "qlora" and meta["quantization"]["quant_type"] == "nf4"


@pytest.mark.slow
def test_qlora_loss_falls_on_the_builtin_model(tmp_path: Path) -> None:
    from sft.config import load_recipe

    recipe = load_recipe(
        Path(__file__).resolve().parents[1] / "recipes" / "qlora_quickstart.yaml",
        [
            f"output_dir={tmp_path / 'run'}",
            "train.max_steps=6",
            "data.max_seq_len=96",
            "optim.warmup_steps=1",
            "eval.every=null",
            "eval.max_batches=1",
            "eval.batch_size=8",
            "eval.prompts=[]",
            "checkpoint.every=null",
            "logging.wandb.mode=disabled",
            "logging.progress=false",
            "logging.plots=false",
        ],
    )
    results = train(recipe)
    assert len(losses(tmp_path / "run")) == 6
    # The same held-out batch before and after (train losses are of different batches: too noisy).
    assert results["eval_after"]["eval/loss"] < results["eval_before"]["eval/loss"] - 0.1
