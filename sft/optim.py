"""Optimizer and learning-rate schedule from the recipe (the schedules are transformers')."""

from __future__ import annotations

import math
from typing import Any

import torch

from sft.config import OptimConfig

# optim.name -> bitsandbytes class: 8-bit moments (blockwise quantized) and/or paged state (CUDA unified
# memory that the driver moves to host RAM when the GPU runs short, instead of failing with out-of-memory).
BNB_OPTIMIZERS = {
    "adamw_8bit": "AdamW8bit",
    "paged_adamw": "PagedAdamW",
    "paged_adamw_8bit": "PagedAdamW8bit",
}


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW (torch's, or bitsandbytes' 8-bit / paged one) with weight decay on matrices only (not on biases
    and norm weights)."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    import bitsandbytes as bnb

    cls = getattr(bnb.optim, BNB_OPTIMIZERS[cfg.name])
    optimizer: torch.optim.Optimizer = cls(
        groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay
    )
    return optimizer


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int) -> Any:
    from transformers import get_scheduler

    warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total_steps)
    name = "constant_with_warmup" if cfg.scheduler == "constant" else cfg.scheduler
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
