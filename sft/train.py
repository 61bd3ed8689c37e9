"""The training loop, top to bottom: check inputs, build data and model, train, evaluate, save, export.

Every rank runs this function. The strategy hides how the model is wrapped and stepped; everything else
(data order, loss normalization, schedule, eval, checkpoints, preemption) is here.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import torch

from sft.checkpoint import save_checkpoint
from sft.config import Recipe, warmup_warnings
from sft.data.pipeline import DataPipeline
from sft.dist import barrier, init_dist
from sft.divergence import check_step
from sft.evaluate import eval_loss, generate_answers
from sft.export import export_run
from sft.loss import describe_loss, loss_sum
from sft.manifest import RunManifest, records_outcome
from sft.metrics import Metrics
from sft.model.attention import FLASH, resolve_attention
from sft.model.load import count_parameters, load_tokenizer
from sft.model.quant import describe_memory, memory_report
from sft.optim import build_scheduler
from sft.plan import check_fits
from sft.preflight import preflight
from sft.resume import announce, plan_resume, restore
from sft.run_folder import prepare_run_folder
from sft.signals import Preempted, StopFlag, restores_signal_handlers
from sft.strategies import build_strategy
from sft.throughput import StepMeter


@records_outcome  # run.json says how the run ended: done, preempted, failed with which error
@restores_signal_handlers  # the stop flag's handlers end with the run, however it ends
def train(recipe: Recipe, check_memory: bool = True) -> dict[str, Any]:
    # ---- 1. Inputs first: a bad path, row or resume fails here, before anything is loaded or written.
    preflight(recipe)
    output_dir = Path(recipe.output_dir)
    resume = plan_resume(recipe)  # the checkpoint to continue from, checked against this recipe and data
    if resume.finished is not None:
        announce(f"the run in {output_dir} is complete (final/ and results.json); nothing to do")
        return resume.finished
    dist = init_dist(recipe.train.device)
    if check_memory:  # the memory plan, from the model config alone: stop before loading what cannot fit
        check_fits(recipe, dist.world_size)
    torch.manual_seed(recipe.seed)
    random.seed(recipe.seed)

    tokenizer = load_tokenizer(recipe.model)
    attention = resolve_attention(recipe.model, dist.device.type)  # from config.json; the model loads with it
    data = DataPipeline(recipe, tokenizer, dist.rank, dist.world_size, flat=attention in FLASH)
    t = recipe.train
    total_steps = t.max_steps or data.total_steps(t.epochs)

    # ---- 2. Model, strategy, optimizer, schedule.
    strategy = build_strategy(recipe, dist)
    model = strategy.build_model()  # whole, empty (FSDP2) or partitioned (ZeRO-3): never whole when sharded
    trainable, total = count_parameters(model)
    vocab_size = int(model.config.vocab_size)  # type: ignore[union-attr,arg-type]  # collapse: loss = ln(it)
    memory = memory_report(model, recipe.optim.name)  # the whole model's sizes, before it is sharded
    meter = StepMeter(recipe, model, dist)  # model FLOPs per token, likewise
    model, optimizer = strategy.prepare(model)
    scheduler = build_scheduler(optimizer, recipe.optim, total_steps)

    step, run_id = 0, None
    if resume.folder is not None:
        state = restore(resume, strategy, model, optimizer, scheduler, data, dist)
        step, run_id = state["step"], state.get("wandb_run_id")

    # ---- 3. The run folder: created only now that the inputs are known to be good.
    if dist.is_main:
        prepare_run_folder(recipe, fresh=resume.folder is None)
    barrier()

    manifest = RunManifest.start(
        recipe, dist, output_dir, step
    )  # run.json: versions, hosts, data fingerprints
    manifest.update(recipe_changes=resume.record()["recipe_changes"])  # what resume_changes=allow let through
    metrics = Metrics(
        recipe, output_dir, enabled=dist.is_main, run_id=run_id, start_step=step, manifest=manifest
    )
    metrics.print("[sft] recipe:\n" + recipe.to_yaml())
    auto = " (auto)" if recipe.model.attn_implementation == "auto" else ""
    metrics.print(
        f"[sft] {recipe.method} fine-tuning of {recipe.model.name} on {dist.device} x{dist.world_size}; "
        f"attention {attention or 'transformers default'}{auto}; "
        f"trainable parameters {trainable:,} of {total:,} ({trainable / total:.2%})"
    )
    metrics.print(describe_memory(memory))
    metrics.print(describe_loss(model, t.loss_impl))
    metrics.print(meter.describe())
    metrics.summary({f"memory/{k}": v for k, v in memory.items()})
    metrics.print(f"[sft] training {total_steps} steps; {data.describe()}")
    for note in [*warmup_warnings(recipe.optim, total_steps), *resume.notes]:
        metrics.print(f"[sft] {note}")
    if resume.folder is not None:
        metrics.print(f"[sft] resumed from {resume.folder} at step {step}")

    def to_device(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(dist.device) for k, v in batch.items()}

    def evaluate() -> dict[str, float]:
        batches = (to_device(b) for b in data.eval_batches())
        return eval_loss(model, batches, t.precision, strategy.sum_across_ranks, t.loss_impl)

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
        state.update(total_steps=total_steps, **resume.record())
        save_checkpoint(
            output_dir,
            step,
            dist,
            lambda folder: strategy.save_checkpoint(folder, model, optimizer),
            state,
            recipe.checkpoint.keep,
            recipe.to_yaml(),
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
        meter.start()
        host_batches = data.micro_batches(step)  # counted here: on a GPU, counting there would wait for it
        micro_batches = [to_device(b) for b in host_batches]
        # The step's loss is the mean over every trained token of the global batch: each micro-batch
        # contributes its token sum divided by the global count; the strategy turns these shares into the
        # gradient of their sum over micro-batches and ranks (strategies/base.py).
        totals = strategy.sum_across_ranks(meter.counts(host_batches))  # trained tokens first (COUNTS)
        global_targets = float(totals[0])
        loss_total = torch.zeros((), dtype=torch.float64, device=dist.device)  # read once, after the step
        for a, batch in enumerate(micro_batches):
            with strategy.accumulating(model, last_micro_batch=a == len(micro_batches) - 1):
                micro_loss = loss_sum(model, batch, t.precision, t.loss_impl)
                strategy.backward(micro_loss / global_targets)
            loss_total += micro_loss.detach()
        lr = scheduler.get_last_lr()[0]
        with meter.optimizer_step():
            grad_norm = strategy.step(optimizer, recipe.optim.max_grad_norm)
        scheduler.step()
        step += 1

        tokens_seen += int(totals[1])
        if t.compile and tokens_seen == int(totals[1]):  # this process's first step compiled the layers
            metrics.print(
                f"[sft] train.compile: first step {time.perf_counter() - started:.1f}s, compiling included"
            )
        # One sum over ranks for the loss and the stop flag: every rank must agree to stop, or the ranks that
        # stop would hang the others at the next collective.
        summed = strategy.sum_across_ranks(
            torch.tensor([float(loss_total), float(stop.requested)], dtype=torch.float64)
        )
        loss, stopping = float(summed[0]) / global_targets, bool(summed[1])
        check_step(output_dir, step, loss, grad_norm, vocab_size, dist.is_main)  # divergence: exit code 3
        if step % recipe.logging.every == 0 or step == total_steps:
            metrics.log(
                step,
                {
                    "train/loss": loss,
                    "train/lr": lr,
                    "train/grad_norm": grad_norm,
                    "train/trained_tokens": global_targets,
                    **meter.metrics(totals),
                },
            )
        if recipe.eval.every and step % recipe.eval.every == 0 and step < total_steps and data.eval_samples:
            metrics.log(step, evaluate(), console=True)

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
    final = export_run(output_dir, strategy, model, tokenizer, dist)
    results.update(steps=step, train_seconds=round(elapsed, 2), tokens_seen=tokens_seen, final=str(final))
    if dist.is_main:
        (output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        metrics.summary({k: v for k, v in results.items() if not k.startswith("answers")})
        metrics.print(f"[sft] done: {step} steps in {elapsed:.0f}s; model in {final}")
    metrics.close()
    barrier()
    return results
