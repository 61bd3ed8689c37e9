"""Per-step throughput metrics: tokens and samples per second, model FLOPs utilization (MFU), padding, time
waiting for data, optimizer step time, peak memory (the largest rank's).

Model FLOPs count what the method computes, per token: every linear layer's forward (2 per weight value) and
the gradient of its input (2 more); the gradient of its weight (2 more) only when the weight trains (full
fine-tuning: all; LoRA/QLoRA: the adapters; a frozen 4-bit weight counts its logical values, the
dequantization is not model work). Attention adds 12 x (heads x head_dim) x layers per (token, attended
position) pair, counted causally from each sample's length (packed samples attend within themselves). Padding
and activation checkpointing's recomputation are not model FLOPs. MFU = model FLOP/s per device / peak FLOP/s.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import torch

from sft.config import Recipe
from sft.dist import DistEnv
from sft.memory import max_over_ranks, peak_memory

COUNTS = ("targets", "tokens", "slots", "samples", "pairs")


def matmul_flops_per_token(model: torch.nn.Module) -> float:
    """Forward + backward FLOPs of the model's linear layers for one token, as the method trains them."""
    from sft.model.quant import logical_numel

    total = 0.0
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            n = logical_numel(m.weight)
            total += (6 if m.weight.requires_grad else 4) * n
    return total


def attention_flops_per_pair(model: torch.nn.Module) -> float:
    """Forward + backward FLOPs of attention scores and weighted values for one (token, attended position)."""
    config = getattr(model, "config", None)
    if config is None:
        return 0.0
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(c, "num_attention_heads", 0)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // max(heads, 1)
    return 12.0 * heads * head_dim * getattr(c, "num_hidden_layers", 0)


def batch_counts(batch: dict[str, torch.Tensor]) -> list[float]:
    """[trained tokens, real tokens, token slots (real + padding), samples, causal attention pairs]."""
    from sft.data.chat import trained_tokens
    from sft.data.collate import real_tokens

    ids = batch["input_ids"]
    pos = batch.get("position_ids")
    mask = batch.get("attention_mask")
    if pos is not None:  # packed rows: a sample starts where the position restarts at 0 and goes on to 1
        following = torch.cat([pos[:, 1:], torch.full_like(pos[:, :1], -1)], dim=1)
        samples = int(((pos == 0) & (following == 1)).sum())
        pairs = float((pos + 1).sum())
    else:
        samples = ids.shape[0]
        positions = torch.arange(1, ids.shape[1] + 1).expand_as(ids)
        pairs = float((positions * (mask if mask is not None else 1)).sum())
    return [
        float(trained_tokens(batch["labels"])),
        float(real_tokens(batch)),
        float(ids.numel()),
        float(samples),
        pairs,
    ]


def cpu_peak_flops(precision: str, seconds: float = 0.3) -> float:
    """FLOP/s of this CPU on square matmuls (the best of repeated runs for about `seconds`): the ceiling MFU is
    measured against on a machine without a GPU."""
    n = 1024
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm up
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best


def peak_flops(recipe: Recipe, device: torch.device) -> tuple[float | None, str]:
    """Peak FLOP/s of one device for MFU, and where the number comes from."""
    if recipe.train.peak_tflops:
        return recipe.train.peak_tflops * 1e12, "train.peak_tflops"
    dtype = "bf16" if recipe.train.precision == "bf16" else "fp32"
    if device.type == "cuda":
        from sft.gpus import gpu_by_device_name

        name = torch.cuda.get_device_name(device)
        gpu = gpu_by_device_name(name)
        tflops = gpu.peak_tflops(dtype) if gpu else None
        if tflops is None:
            return None, f"{name} is not in sft/gpus.py: set train.peak_tflops for MFU"
        return tflops * 1e12, f"{gpu.name if gpu else name} {dtype} (sft/gpus.py)"
    flops = cpu_peak_flops(recipe.train.precision)
    return flops, f"{dtype} matmul probe of this CPU"


class StepMeter:
    """Times the parts of a step and turns the step's counts into the logged metrics (see the module doc)."""

    def __init__(self, recipe: Recipe, model: torch.nn.Module, dist: DistEnv) -> None:
        self.dist = dist
        self.matmul = matmul_flops_per_token(model)  # before a strategy shards the weights
        self.attention = attention_flops_per_pair(model)
        self.peak, self.peak_source = peak_flops(recipe, dist.device)
        self.started = self.data_s = self.optimizer_s = 0.0

    def describe(self) -> str:
        peak = (
            f"{self.peak / 1e12:.3g} TFLOP/s per device ({self.peak_source})"
            if self.peak
            else self.peak_source
        )
        return (
            f"[sft] model FLOPs: {self.matmul / 1e9:.3g} GFLOP per token in linear layers "
            f"+ {self.attention / 1e6:.3g} MFLOP per attended position; MFU against {peak}"
        )

    def start(self) -> None:
        self.started = time.perf_counter()

    def counts(self, micro_batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """This rank's counts (COUNTS) over the step's micro-batches; also marks the data as ready."""
        self.data_s = time.perf_counter() - self.started
        rows = [batch_counts(b) for b in micro_batches]
        return torch.tensor([sum(col) for col in zip(*rows, strict=True)], dtype=torch.float64)

    @contextlib.contextmanager
    def optimizer_step(self) -> Iterator[None]:
        t = time.perf_counter()
        yield
        self.optimizer_s = time.perf_counter() - t

    def metrics(self, totals: torch.Tensor) -> dict[str, Any]:
        """The step's metrics from the counts summed over ranks. Every rank calls this (a max over ranks)."""
        seconds = time.perf_counter() - self.started
        c = dict(zip(COUNTS, totals.tolist(), strict=True))
        world = self.dist.world_size
        flops = self.matmul * c["tokens"] + self.attention * c["pairs"]
        per_device = flops / seconds / world
        most = max_over_ranks(
            {"train/data_wait_fraction": self.data_s / seconds, **peak_memory(self.dist.device)},
            self.dist.device,
        )
        out = {
            "train/tokens_per_s": c["tokens"] / seconds,
            "train/trained_tokens_per_s": c["targets"] / seconds,
            "train/tokens_per_s_per_device": c["tokens"] / seconds / world,
            "train/samples_per_s": c["samples"] / seconds,
            "train/tflops_per_device": per_device / 1e12,
            "train/padding_fraction": 1.0 - c["tokens"] / max(c["slots"], 1.0),
            "train/optimizer_step_s": self.optimizer_s,
            "train/step_time_s": seconds,
            **most,
        }
        if self.peak:
            out["train/mfu"] = per_device / self.peak
        return out
