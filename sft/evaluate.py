"""Held-out loss and perplexity, and greedy answers to fixed prompts before and after training."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from sft.data.chat import trained_tokens
from sft.loss import autocast, loss_sum


@torch.no_grad()
def eval_loss(
    model: torch.nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    precision: str,
    sum_across_ranks: Callable[[torch.Tensor], torch.Tensor],
    loss_impl: str = "chunked",
) -> dict[str, float]:
    """Token-weighted mean loss over the eval batches (this rank's share, summed over ranks)."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64)
    for batch in batches:
        totals[0] += float(loss_sum(model, batch, precision, loss_impl))
        totals[1] += trained_tokens(batch["labels"])
    model.train(was_training)
    totals = sum_across_ranks(totals)
    loss = float(totals[0] / max(float(totals[1]), 1.0))
    return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0)), "eval/tokens": float(totals[1])}


@torch.no_grad()
def generate_answers(
    model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int, precision: str
) -> list[dict[str, str]]:
    """Greedy answers (deterministic) to each prompt, as a single user turn in the model's chat template."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for prompt in prompts:
        if getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}],
                add_generation_prompt=True,
                return_tensors="pt",
                return_dict=True,
            )
        else:  # a base model without a chat template: continue the prompt as plain text
            ids = tokenizer(prompt, return_tensors="pt")
        ids = {k: v.to(device) for k, v in ids.items()}
        with autocast(device, precision):
            gen = model.generate(
                **ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        answer = tokenizer.decode(gen[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        out.append({"prompt": prompt, "answer": answer.strip()})
    model.train(was_training)
    return out
