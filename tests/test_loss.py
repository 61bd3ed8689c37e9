"""The chunked loss (train.loss_impl=chunked) against the full-logits loss: same sums, same gradients, for
every kind of output head; logits memory bounded by the chunk size; models that change their logits after
the head. The strategies' parity tests (test_strategies_dist.py) run with the chunked loss as the default."""

from __future__ import annotations

import functools
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from sft.errors import SftError
from sft.loss import LOGITS_CHUNK_BYTES, describe_loss, loss_sum

REPO = Path(__file__).resolve().parents[1]
VOCAB = 1000


def llama(tie: bool = True, vocab: int = VOCAB, **kw: Any) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
        use_cache=False,
        **kw,
    )
    return LlamaForCausalLM(config)


def lora(target: Any, save: list[str] | None = None, tie: bool = True) -> Callable[[], Any]:
    def make() -> Any:
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(
            r=4,
            lora_alpha=8,
            lora_dropout=0.0,
            target_modules=target,
            modules_to_save=save,
            init_lora_weights=False,  # nonzero B: the adapters' own gradients are compared too
        )
        return get_peft_model(llama(tie), cfg)

    return make


def batch() -> dict[str, torch.Tensor]:
    """Two padded rows and a packed one (position ids restart), labels partly ignored."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (3, 48), generator=g)
    labels = ids.clone()
    labels[:, :12] = -100  # a prompt
    labels[1, 30:] = -100  # padding
    labels[2, 20:24] = -100  # the next packed sample's prompt
    position_ids = torch.arange(48).repeat(3, 1)
    position_ids[2, 20:] = torch.arange(28)
    return {"input_ids": ids, "labels": labels, "position_ids": position_ids}


def loss_and_grads(model: Any, impl: str, precision: str = "fp32") -> tuple[float, dict[str, torch.Tensor]]:
    model.train()
    loss = loss_sum(model, batch(), precision, impl)
    loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


HEADS: dict[str, Callable[[], Any]] = {
    "full, tied embeddings": lambda: llama(tie=True),
    "full, separate head": lambda: llama(tie=False),
    "lora all-linear (frozen head)": lora("all-linear"),
    "lora on lm_head": lora(["q_proj", "v_proj", "lm_head"], tie=False),
    "lora modules_to_save lm_head": lora(["q_proj"], ["lm_head"], tie=False),
}


@pytest.mark.parametrize("name", list(HEADS))
def test_chunked_loss_and_gradients_equal_the_full_logits_path(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sft.loss.LOGITS_CHUNK_BYTES", 4 * VOCAB * 16)  # 16 tokens a chunk: 6 chunks
    full_loss, full = loss_and_grads(HEADS[name](), "full")
    loss, grads = loss_and_grads(HEADS[name](), "chunked")
    assert abs(loss - full_loss) <= 1e-6 * abs(full_loss), (loss, full_loss)
    assert grads.keys() == full.keys() and grads
    for key, g in full.items():
        assert float((grads[key] - g).norm()) <= 1e-6 * float(g.norm()), key


def test_bf16_autocast_and_evaluation_match(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sft.loss.LOGITS_CHUNK_BYTES", 4 * VOCAB * 16)
    for make in (HEADS["full, tied embeddings"], HEADS["lora on lm_head"]):
        full_loss, full = loss_and_grads(make(), "full", "bf16")
        loss, grads = loss_and_grads(make(), "chunked", "bf16")
        assert abs(loss - full_loss) <= 1e-3 * abs(full_loss)
        for key, g in full.items():  # the full path rounds the head's gradient to bf16 once more
            assert float((grads[key] - g).norm()) <= 1e-2 * float(g.norm()), key
    model = llama().eval()
    with torch.no_grad():
        full_loss = float(loss_sum(model, batch(), "fp32", "full"))
        assert abs(float(loss_sum(model, batch(), "fp32")) - full_loss) <= 1e-6 * full_loss


def test_the_head_still_gives_logits_outside_the_loss() -> None:
    model = llama().eval()
    ids = batch()["input_ids"]
    with torch.no_grad():
        before = model(input_ids=ids).logits
        loss_sum(model, batch(), "fp32")
        after = model(input_ids=ids).logits
    assert after.shape == (3, 48, VOCAB) and torch.equal(before, after)
    assert "chunked cross entropy" in describe_loss(model, "chunked")


def test_a_model_that_changes_its_logits_after_the_head() -> None:
    """Softcapping (a config key we know) gets the logits at trained positions only; an unknown change is
    caught at the first forward, before any backward."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    gemma = Gemma2ForCausalLM(
        Gemma2Config(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            final_logit_softcapping=5.0,
            attn_implementation="eager",
            use_cache=False,
        )
    )
    full = float(loss_sum(gemma, batch(), "fp32", "full"))
    assert abs(float(loss_sum(gemma, batch(), "fp32")) - full) <= 1e-6 * full
    assert "trained positions only" in describe_loss(gemma, "chunked")

    model = llama()
    original = type(model).forward

    @functools.wraps(original)  # keeps the signature (logits_to_keep)
    def doubled(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = original(self, *args, **kwargs)
        out.logits = out.logits * 2
        return out

    model.forward = doubled.__get__(model)
    with pytest.raises(SftError, match="set train.loss_impl=full"):
        loss_sum(model, batch(), "fp32")


MEMORY_SCRIPT = """
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from sft.loss import loss_sum
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=128256, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
    num_attention_heads=1, num_key_value_heads=1, head_dim=8, tie_word_embeddings=False, use_cache=False))
model.lm_head.requires_grad_(False)  # as under LoRA: the gradient reaches the hidden states, not the head
def kib(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key))
def peak(impl, rows, width):
    ids = torch.randint(0, 128256, (rows, width))
    open("/proc/self/clear_refs", "w").write("5")  # resets the peak resident size (VmHWM)
    start = kib("VmRSS:")
    loss_sum(model, {"input_ids": ids, "labels": ids}, "fp32", impl).backward()
    return (kib("VmHWM:") - start) * 1024
peak("chunked", 1, 16), peak("full", 1, 16)  # one-time allocations
print(peak("chunked", 8, 1024), peak("full", 1, 512))
"""


def peak_bytes() -> tuple[int, int]:
    """Peak resident memory added by one forward+backward: chunked on 8 x 1024 tokens, full on 1 x 512."""
    proc = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    chunked, full = proc.stdout.split()[-2:]
    return int(chunked), int(full)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
def test_logits_memory_of_a_128k_vocabulary_8k_token_micro_batch_is_bounded_by_the_chunk() -> None:
    full_logits = 8 * 1024 * 128256 * 4  # 3.9 GiB of fp32 logits, before their copy and their gradient
    chunked, full = peak_bytes()
    assert chunked <= 4 * LOGITS_CHUNK_BYTES, (chunked, LOGITS_CHUNK_BYTES)
    # The measurement sees logits: the full path's peak on 1/16 of the tokens is above that many logits.
    assert full >= full_logits // 16, full


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora"])
def test_on_the_builtin_model_chunked_is_as_exact_as_float64(
    builtin_dir: Path, tokenizer: Any, method: str
) -> None:
    """The real model (full fine-tuning: every parameter, the tied head too; or LoRA r=16 on every linear
    layer with nonzero B), a packed batch of the built-in data, fp32, against the same step in float64. With
    a 49,152-word vocabulary the full path's fp32 loss is itself off by ~4e-6 and its gradients by ~1e-4
    (measured); the chunked loss is within 1e-6 and its gradients within 1e-5."""
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from sft.config import validate_recipe
    from sft.data.pipeline import DataPipeline

    recipe = validate_recipe({"data": {"max_seq_len": 96, "packing": True}, "train": {"micro_batch_size": 2}})
    b = DataPipeline(recipe, tokenizer).micro_batches(0)[0]
    runs = {}
    for impl, dtype in (("full", torch.float32), ("chunked", torch.float32), ("float64", torch.float64)):
        model = AutoModelForCausalLM.from_pretrained(builtin_dir, dtype=torch.float32)
        if method == "lora":  # the same adapters each time: made in fp32, then cast
            torch.manual_seed(0)
            cfg = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
            model = get_peft_model(model, cfg)
        model = model.to(dtype).train()
        if impl == "float64":
            logits = model(**{k: v for k, v in b.items() if k != "labels"}).logits[:, :-1]
            loss = F.cross_entropy(logits.flatten(0, 1), b["labels"][:, 1:].flatten(), reduction="sum")
        else:
            loss = loss_sum(model, b, "fp32", impl)
        loss.backward()
        grads = {n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None}
        runs[impl] = (float(loss.detach()), grads)
    exact_loss, exact = runs["float64"]
    norm = sum(float((g**2).sum()) for g in exact.values()) ** 0.5

    def errors(impl: str) -> tuple[float, float]:
        loss, grads = runs[impl]
        assert grads.keys() == exact.keys()
        diff = sum(float(((grads[k] - g) ** 2).sum()) for k, g in exact.items()) ** 0.5
        return abs(loss - exact_loss) / exact_loss, diff / norm

    (loss_err, grad_err), (full_loss_err, full_grad_err) = errors("chunked"), errors("full")
    assert loss_err <= 1e-6 and grad_err <= 1e-5, (loss_err, grad_err)
    assert loss_err <= full_loss_err and grad_err <= full_grad_err, (full_loss_err, full_grad_err)
