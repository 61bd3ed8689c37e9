"""Check a merged model before it is published.

lora: run the adapter model (its base loaded as in training, 4-bit for QLoRA, with the peft adapter on top)
and the merged model on a few prompts; report the largest absolute logit difference and the KL divergence
KL(adapter ‖ merged) per token. Other methods: load the merged model and generate a few tokens per prompt.
Both load whole models, so turn `verify` off for models that do not fit in memory.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sft.merge.plan import Plan
from sft.merge.sources import FolderSource
from sft.model.quant import disable_cpu_repack as disable_cpu_repack  # re-exported: tests import it from here

if TYPE_CHECKING:
    import torch


def verify_merge(plan: Plan, merged: Path, device: str, log: Callable[[str], None]) -> dict[str, Any]:
    if plan.cfg.method == "lora":
        return compare_with_adapter(plan, merged, device, log)
    return generate_check(merged, plan.cfg.prompts, device, log)


def _encode(folder: Path, prompts: list[str], device: str) -> list[torch.Tensor]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    return [tok(p, return_tensors="pt").input_ids.to(device) for p in prompts]


def compare_with_adapter(plan: Plan, merged: Path, device: str, log: Callable[[str], None]) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    assert plan.lora is not None
    adapter = plan.lora.adapter
    base_folder = plan.lora.base.folder
    ids = _encode(merged, plan.cfg.prompts, device)

    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32, device_map={"": device}).eval()
    with torch.inference_mode():
        merged_logits = [model(x, use_cache=False).logits.float() for x in ids]
    del model

    load_dtype = (adapter.quantization or {}).get("dtype") or _stored_dtype(plan.lora.base)
    trained = load_adapter_model(base_folder, adapter.folder, adapter.quantization, load_dtype, device)
    max_diff, kl_sum, kl_max, tokens = 0.0, 0.0, 0.0, 0
    with torch.inference_mode():
        for x, m_logits in zip(ids, merged_logits, strict=True):
            a_logits = trained(input_ids=x, use_cache=False).logits.float()
            max_diff = max(max_diff, float((a_logits - m_logits).abs().max()))
            kl = F.kl_div(
                F.log_softmax(m_logits, -1), F.log_softmax(a_logits, -1), log_target=True, reduction="none"
            )
            per_token = kl.sum(-1).flatten().clamp_min(0)  # rounding can make a ~0 KL slightly negative
            kl_sum += float(per_token.sum())
            kl_max = max(kl_max, float(per_token.max()))
            tokens += per_token.numel()
    del trained
    report = {
        "prompts": len(ids),
        "tokens": tokens,
        "max_abs_logit_diff": max_diff,
        "mean_kl": kl_sum / tokens,
    }
    report["max_kl"] = kl_max
    what = "4-bit base + adapter" if adapter.quantization else "base + adapter"
    log(
        f"verify: {what} vs merged on {len(ids)} prompts ({tokens} tokens): max |Δlogit| {max_diff:.3g}, "
        f"KL per token mean {report['mean_kl']:.3g}, max {kl_max:.3g}"
    )
    return report


def _stored_dtype(base: FolderSource) -> str:
    # Without a recorded load dtype, the base is taken to be loaded as stored (our trainer's default); the
    # round trip assumes the same.
    counts: dict[str, int] = {}
    for spec in base.specs().values():
        counts[spec.dtype] = counts.get(spec.dtype, 0) + spec.nbytes
    return {"BF16": "bfloat16", "F16": "float16"}.get(max(counts, key=lambda k: counts[k]), "float32")


def load_adapter_model(
    base_folder: Path, adapter_folder: Path, quant: dict[str, Any] | None, dtype: str, device: str
) -> torch.nn.Module:
    """The model as trained: base (4-bit when the adapter records quantization) with the adapter on top."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype), "device_map": {"": device}}
    if quant is not None:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant.get("quant_type", "nf4"),
            bnb_4bit_use_double_quant=bool(quant.get("double_quant", False)),
            bnb_4bit_compute_dtype=getattr(torch, quant.get("compute_dtype", "float32")),
            bnb_4bit_quant_storage=getattr(torch, quant.get("quant_storage", "uint8")),
        )
    base = AutoModelForCausalLM.from_pretrained(base_folder, **kwargs)
    if quant is not None:
        disable_cpu_repack(base)
    return PeftModel.from_pretrained(base, adapter_folder).eval()


def generate_check(
    merged: Path, prompts: list[str], device: str, log: Callable[[str], None]
) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32, device_map={"": device}).eval()
    outputs = []
    with torch.inference_mode():
        for p in prompts:
            x = tok(p, return_tensors="pt").to(device)
            y = model.generate(
                **x, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id
            )
            text = tok.decode(y[0, x.input_ids.shape[1] :], skip_special_tokens=True)
            outputs.append(text)
            log(f"verify: {p!r} -> {text!r}")
    return {"generations": dict(zip(prompts, outputs, strict=True))}
