"""Token-level loss. Sums, not means: the loop divides by the global count of trained tokens so a step's
loss is the mean over every trained token of the global batch (DESIGN invariant 2).

Two ways to get the sum, chosen by `train.loss_impl`:

- `chunked` (default): the full logits tensor (rows x positions x vocabulary) never exists. The model is
  asked, through transformers' `logits_to_keep`, for the output head at trained positions only, and the
  head's own forward is replaced, for that call, by the cross entropy of its output computed a chunk of
  tokens at a time (`LOGITS_CHUNK_BYTES` of fp32 logits each). The head's forward is where sharding
  backends make its weight whole (FSDP2's root, DeepSpeed ZeRO-3's per-module hooks), so the loss is
  computed where the weight is there. A plain `nn.Linear` head (also inside peft's `modules_to_save`
  wrapper) takes the fused path: each chunk's gradient is computed in the forward and only the gradients
  are kept for the backward (no second pass). Any other head (peft LoRA on the head) is called chunk by
  chunk under activation checkpointing: its chunk of logits is recomputed in the backward.
- `full`: the model's logits at every position, then cross entropy (the path before issue 13; kept to
  compare against).

A model that changes its logits after the head (softcapping, logit scales) cannot return the loss from its
head: it gets the logits at trained positions only (`logits_to_keep`), materialized, then cross entropy.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from sft.data.chat import IGNORE_INDEX
from sft.errors import SftError

LOGITS_CHUNK_BYTES = 128 * 2**20
"""fp32 logits of one chunk of tokens: the loss's extra memory is a few of these, whatever the batch."""

# Config keys of transformers models whose forward changes the logits after the output head.
LOGIT_TRANSFORM_KEYS = (
    "final_logit_softcapping",
    "logits_soft_cap",
    "logit_scale",
    "logits_scaling",
    "output_multiplier",
    "lm_head_multiplier",
    "unpadded_vocab_size",
)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def chunk_tokens(vocab_size: int) -> int:
    """Tokens per chunk of the chunked loss."""
    return max(1, LOGITS_CHUNK_BYTES // (4 * vocab_size))


def loss_sum(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], precision: str, impl: str = "chunked"
) -> torch.Tensor:
    """Sum of next-token cross entropy over the trained tokens of one micro-batch (fp32 accumulation)."""
    device = batch["input_ids"].device
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if impl == "full":
        with autocast(device, precision):
            logits = model(**inputs, use_cache=False).logits
        labels = batch["labels"][:, 1:]
        return F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
    # Position t predicts the label at t+1; the last position predicts nothing.
    labels = batch["labels"]
    shifted = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1)
    keep = shifted != IGNORE_INDEX
    targets = shifted[keep]  # row-major, the order in which transformers hands the head the kept positions
    lm = causal_lm(model)
    head, reason = loss_head(lm)
    with autocast(device, precision):
        if head is None:  # logits at trained positions only, then cross entropy
            logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits
            return F.cross_entropy(logits.float(), targets, reduction="sum")
        armed = _Armed(targets, chunk_tokens(lm.config.get_text_config().vocab_size))
        token = _ARMED.set(armed)
        try:
            out = model(**inputs, use_cache=False, logits_to_keep=keep)
        finally:
            _ARMED.reset(token)
    return _checked(out.logits, armed, head, lm)


def describe_loss(model: torch.nn.Module, impl: str) -> str:
    """One line for the run's log: how the loss is computed for this model."""
    if impl == "full":
        return "[sft] loss: full logits at every position, then cross entropy (train.loss_impl=full)"
    lm = causal_lm(model)
    head, reason = loss_head(lm)
    if head is None:
        return f"[sft] loss: logits at trained positions only, then cross entropy ({reason})"
    chunk = chunk_tokens(lm.config.get_text_config().vocab_size)
    how = "fused with the output head" if _fused_heads(head) else "head recomputed in the backward"
    return f"[sft] loss: chunked cross entropy at trained positions, {chunk} tokens per chunk ({how})"


# ---------------------------------------------------------------- finding and arming the output head


@dataclass
class _Armed:
    targets: torch.Tensor  # (trained tokens,) next-token ids, in the order the head receives the positions
    chunk: int
    returned: torch.Tensor | None = None  # what the head returned, to check the model passed it on unchanged


# Per output head: "" once its forward can return the loss, or why it cannot; and whether the model was seen
# to pass the head's result on unchanged.
_HEADS: weakref.WeakKeyDictionary[torch.nn.Module, str] = weakref.WeakKeyDictionary()
_CHECKED: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()
_ARMED: contextvars.ContextVar[_Armed | None] = contextvars.ContextVar("sft_loss_armed", default=None)


def causal_lm(model: torch.nn.Module) -> Any:
    """The transformers model inside the wrappers (DeepSpeed's engine; peft forwards attribute lookups)."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, torch.nn.Module) else model


def loss_head(lm: Any) -> tuple[torch.nn.Module | None, str]:
    """The model's output head, with its forward able to return the chunked loss; or None and why not."""
    head = lm.get_output_embeddings()
    cached = _HEADS.get(head)
    if cached is not None:
        return (head if cached == "" else None), cached
    reason = _cannot_chunk(lm)
    if not reason:
        fused = _fused_heads(head)
        for module in fused or [head]:
            _install(module, fused=bool(fused))
    _HEADS[head] = reason
    return (None if reason else head), reason


def _cannot_chunk(lm: Any) -> str:
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm  # under peft's wrapper
    config = lm.config.get_text_config()
    for key in LOGIT_TRANSFORM_KEYS:
        if getattr(config, key, None) is not None:
            return f"{type(base).__name__} changes its logits after the output head ({key})"
    if "logits_to_keep" not in inspect.signature(base.forward).parameters:
        return f"{type(base).__name__}'s forward takes no logits_to_keep"
    return ""


def _plain_linear(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear) and type(module).forward is torch.nn.Linear.forward


def _fused_heads(head: torch.nn.Module) -> list[torch.nn.Module]:
    """The plain Linear layers that compute the head's output and return it unchanged: the head itself, or
    every copy inside peft's `modules_to_save` wrapper (it calls one of them and passes its output on).
    Empty when the head is something else (peft LoRA on the head)."""
    if _plain_linear(head):
        return [head]
    inner = [getattr(head, "original_module", None), *getattr(head, "modules_to_save", {}).values()]
    if inner[0] is not None and all(m is not None and _plain_linear(m) for m in inner):
        return inner
    return []


def _install(module: torch.nn.Module, fused: bool) -> None:
    """Replace `module`'s forward by one that, while a loss is armed, returns the loss sum of its output
    instead of the output (generation and any other call see the original forward). The module's hooks
    still run around it: that is where sharded weights are gathered."""
    original: Callable[..., torch.Tensor] = module.forward

    def forward(hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        armed = _ARMED.get()
        if armed is None:
            return original(hidden, *args, **kwargs)
        if hidden.shape[:-1] != armed.targets.shape:
            raise SftError(
                f"train.loss_impl=chunked: the output head got hidden states of shape {tuple(hidden.shape)} for "
                f"{armed.targets.numel()} trained tokens (the model ignores logits_to_keep); set train.loss_impl=full"
            )
        if fused:
            loss = LinearCrossEntropy.apply(hidden, module.weight, module.bias, armed.targets, armed.chunk)
        else:
            loss = _checkpointed_cross_entropy(original, hidden, armed.targets, armed.chunk)
        armed.returned = loss
        return loss

    module.forward = forward  # type: ignore[method-assign]


def _checked(logits: torch.Tensor, armed: _Armed, head: torch.nn.Module, lm: Any) -> torch.Tensor:
    """The model's `logits` output is the loss its head returned; check it came through unchanged (once)."""
    if head in _CHECKED:
        return logits
    returned = armed.returned
    if returned is None or logits.ndim != 0 or not torch.equal(logits.detach(), returned.detach()):
        raise SftError(
            f"train.loss_impl=chunked: {type(lm).__name__} does not return its output head's result as the "
            "logits (it changes them after the head); set train.loss_impl=full"
        )
    _CHECKED.add(head)
    return logits


# ---------------------------------------------------------------- the chunked cross entropy


def _compute_dtype(device: torch.device, weight: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return weight.dtype


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T + bias, targets_i), a chunk of tokens at a time.

    Forward computes each chunk's logits (in the compute dtype, as the head would), its loss in fp32, and,
    when gradients are wanted, its gradient (softmax - one-hot) straight into the gradients of hidden,
    weight and bias; the chunk's logits are then freed. Backward only scales the kept gradients. The
    arithmetic is that of `F.linear` + `F.cross_entropy(reduction="sum")` on the same dtypes."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        chunk: int,
    ) -> torch.Tensor:
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dtype = _compute_dtype(hidden.device, weight)
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk].to(dtype)
            y = targets[start : start + chunk]
            logits = F.linear(h, w, b).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
            if not (need_h or need_w or need_b):
                continue
            # d(sum of CE)/d logits = softmax - one-hot, in place of the logits.
            grad = logits.sub_(lse[:, None]).exp_()
            grad[torch.arange(y.shape[0], device=y.device), y] -= 1.0
            g = grad.to(dtype)
            if grad_h is not None:
                grad_h[start : start + chunk] = g @ w
            if grad_w is not None:  # summed over chunks in fp32, not rounded to the compute dtype each time
                grad_w.addmm_(grad.t(), h.float())
            if grad_b is not None:
                grad_b += grad.sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        return (
            None if grad_h is None else grad_h * grad_total.to(grad_h.dtype),
            None if grad_w is None else (grad_w * grad_total).to(w_dtype),
            None if grad_b is None else (grad_b * grad_total).to(b_dtype),
            None,
            None,
        )


def _chunk_cross_entropy(
    forward: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    return F.cross_entropy(forward(hidden).float(), targets, reduction="sum")


def _checkpointed_cross_entropy(
    forward: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, targets: torch.Tensor, chunk: int
) -> torch.Tensor:
    """Any head: one chunk of logits at a time; in training each chunk is recomputed in the backward."""
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk):
        h, y = hidden[start : start + chunk], targets[start : start + chunk]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_cross_entropy, forward, h, y, use_reentrant=False)
        else:
            total = total + _chunk_cross_entropy(forward, h, y)
    return total
