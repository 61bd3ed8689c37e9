"""The training loop, top to bottom: check inputs, build data and model, train, evaluate, save, export.

Every rank runs this function. The strategy hides how the model is wrapped and stepped; everything else
(data order, loss normalization, schedule, eval, checkpoints, preemption) is here.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from sft.checkpoint import latest_checkpoint, load_trainer_state, save_checkpoint
from sft.config import Recipe
from sft.data import check_sources
from sft.data.pipeline import DataPipeline
from sft.dist import barrier, init_dist
from sft.errors import SftError
from sft.evaluate import eval_loss, generate_answers
from sft.loss import count_targets, count_tokens, loss_sum
from sft.metrics import Metrics
from sft.model import build_model
from sft.model.load import check_model_name, count_parameters, load_tokenizer
from sft.model.quant import describe_memory, memory_report
from sft.optim import build_scheduler
from sft.signals import Preempted, StopFlag
from sft.strategies import build_strategy


def train(recipe: Recipe) -> dict[str, Any]:
    # ---- 1. Inputs first: a bad path or row fails here, before anything is written.
    check_model_name(recipe.model.name)
    check_sources(recipe.data)
    output_dir = Path(recipe.output_dir)
    resume_from = latest_checkpoint(output_dir) if recipe.resume else None
    if (output_dir / "recipe.yaml").exists() and not (recipe.resume or recipe.overwrite):
        raise SftError(
            f"output_dir {output_dir} already holds a run; add resume=true to continue it, "
            "overwrite=true to replace it, or choose another output_dir"
        )
    dist = init_dist(recipe.train.device)
    torch.manual_seed(recipe.seed)
    random.seed(recipe.seed)

    tokenizer = load_tokenizer(recipe.model)
    data = DataPipeline(recipe, tokenizer, dist.rank, dist.world_size)
    t = recipe.train
    total_steps = t.max_steps or data.total_steps(t.epochs)

    # ---- 2. Model, strategy, optimizer, schedule.
    model = build_model(recipe, dist.device)
    trainable, total = count_parameters(model)
    memory = memory_report(model, recipe.optim.name)  # measured before a strategy shards anything
    strategy = build_strategy(recipe, dist)
    model, optimizer = strategy.prepare(model)
    scheduler = build_scheduler(optimizer, recipe.optim, total_steps)

    # ---- 3. The run folder: created only now that the inputs are known to be good.
    if dist.is_main:
        if recipe.overwrite and (output_dir / "recipe.yaml").exists():
            shutil.rmtree(output_dir)  # only ever a folder we made: it has our recipe.yaml
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "recipe.yaml").write_text(recipe.to_yaml())
    barrier()

    step, run_id = 0, None
    if resume_from is not None:
        strategy.load_checkpoint(resume_from, model, optimizer)
        state = load_trainer_state(resume_from, dist)
        step, run_id = state["step"], state.get("wandb_run_id")
        data.load_state_dict(state.get("data"))  # a stream's read position (in-memory data needs none)
        scheduler.load_state_dict(state["scheduler"])

    metrics = Metrics(recipe, output_dir, enabled=dist.is_main, run_id=run_id, start_step=step)
    metrics.print("[sft] recipe:\n" + recipe.to_yaml())
    metrics.print(
        f"[sft] {recipe.method} fine-tuning of {recipe.model.name} on {dist.device} x{dist.world_size}; "
        f"trainable parameters {trainable:,} of {total:,} ({trainable / total:.2%})"
    )
    metrics.print(describe_memory(memory))
    metrics.summary({f"memory/{k}": v for k, v in memory.items()})
    metrics.print(f"[sft] training {total_steps} steps; {data.describe()}")
    if resume_from is not None:
        metrics.print(f"[sft] resumed from {resume_from} at step {step}")

    def to_device(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(dist.device) for k, v in batch.items()}

    def evaluate() -> dict[str, float]:
        batches = (to_device(b) for b in data.eval_batches())
        return eval_loss(model, batches, t.precision, strategy.sum_across_ranks)

    def answers() -> list[dict[str, str]]:
        # With sharded weights every forward is a collective: all ranks generate, rank 0 reports.
        if not (recipe.eval.prompts and (dist.is_main or strategy.collective_forward)):
            return []
        gen_model = strategy.unwrapped(model)
        out = generate_answers(
            gen_model, tokenizer, recipe.eval.prompts, recipe.eval.max_new_tokens, t.precision
        )
        return out if dist.is_main else []

    def checkpoint() -> None:
        state = {"step": step, "scheduler": scheduler.state_dict(), "wandb_run_id": metrics.run_id}
        state["data"] = data.state_dict()  # every rank: gathers the stream positions when streaming
        save_checkpoint(
            output_dir,
            step,
            dist,
            lambda folder: strategy.save_checkpoint(folder, model, optimizer),
            state,
            recipe.checkpoint.keep,
        )

    # ---- 4. Before training: the baseline to compare against.
    results: dict[str, Any] = {}
    if step == 0:
        if data.eval_samples:
            results["eval_before"] = evaluate()
            metrics.log(0, results["eval_before"], console=True)
        results["answers_before"] = answers()
        for a in results["answers_before"]:
            metrics.print(f"[before] {a['prompt']}\n  -> {a['answer']}")

    # ---- 5. Train.
    stop = StopFlag()
    stop.install()
    model.train()
    metrics.start_progress(total_steps, step)
    tokens_seen = 0
    started = time.perf_counter()
    while step < total_steps:
        step_start = time.perf_counter()
        micro_batches = [to_device(b) for b in data.micro_batches(step)]
        # The step's loss is the mean over every trained token of the global batch: each micro-batch
        # contributes its token sum divided by the global count; the strategy turns these shares into the
        # gradient of their sum over micro-batches and ranks (strategies/base.py).
        counts = torch.tensor([float(sum(count_targets(b) for b in micro_batches))], dtype=torch.float64)
        global_targets = float(strategy.sum_across_ranks(counts)[0])
        loss_total = torch.zeros((), dtype=torch.float64)
        for a, batch in enumerate(micro_batches):
            with strategy.accumulating(model, last_micro_batch=a == len(micro_batches) - 1):
                micro_loss = loss_sum(model, batch, t.precision)
                strategy.backward(micro_loss / global_targets)
            loss_total += micro_loss.detach().double().cpu()
        lr = scheduler.get_last_lr()[0]
        grad_norm = strategy.step(optimizer, recipe.optim.max_grad_norm)
        scheduler.step()
        step += 1

        step_tokens = sum(count_tokens(b) for b in micro_batches) * dist.world_size
        tokens_seen += step_tokens
        loss = float(strategy.sum_across_ranks(loss_total.reshape(1))[0]) / global_targets
        if not math.isfinite(loss):
            raise RuntimeError(f"loss became {loss} at step {step}; lower optim.lr or check the data")
        if step % recipe.logging.every == 0 or step == total_steps:
            metrics.log(
                step,
                {
                    "train/loss": loss,
                    "train/lr": lr,
                    "train/grad_norm": grad_norm,
                    "train/trained_tokens": global_targets,
                    "train/tokens_per_s": step_tokens / (time.perf_counter() - step_start),
                    "train/step_time_s": time.perf_counter() - step_start,
                },
            )
        if recipe.eval.every and step % recipe.eval.every == 0 and step < total_steps and data.eval_samples:
            metrics.log(step, evaluate(), console=True)

        # Every rank must agree to stop, or the ranks that stop would hang the others at the next collective.
        stopping = bool(
            strategy.sum_across_ranks(torch.tensor([float(stop.requested)], dtype=torch.float64))[0]
        )
        if stopping or (
            recipe.checkpoint.every and step % recipe.checkpoint.every == 0 and step < total_steps
        ):
            checkpoint()
        if stopping and step < total_steps:
            metrics.print(
                f"[sft] {stop.signal_name or 'stop'} received: checkpoint at step {step} written, exiting"
            )
            metrics.close()
            raise Preempted(step)

    # ---- 6. After training: evaluate, answer the prompts again, save, export.
    elapsed = time.perf_counter() - started
    if data.eval_samples:
        results["eval_after"] = evaluate()
        metrics.log(step, results["eval_after"], console=True)
    results["answers_after"] = answers()
    for a in results["answers_after"]:
        metrics.print(f"[after] {a['prompt']}\n  -> {a['answer']}")
    checkpoint()
    final = output_dir / "final"
    partial = output_dir / "final.partial"
    if dist.is_main:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
    barrier()
    strategy.export(partial, model, tokenizer)
    barrier()
    results.update(steps=step, train_seconds=round(elapsed, 2), tokens_seen=tokens_seen, final=str(final))
    if dist.is_main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        (output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        metrics.summary({k: v for k, v in results.items() if not k.startswith("answers")})
        metrics.print(f"[sft] done: {step} steps in {elapsed:.0f}s; model in {final}")
    metrics.close()
    barrier()
    return results
