"""Runs a list of training jobs in one process group (launched by tests under torchrun, or as one process).

    torchrun --nproc_per_node 2 tests/distributed/run_jobs.py JOBS.json RESULTS.json

Each job is `sft train RECIPE OVERRIDES...` through the real loop (`sft.train.train`), optionally with a
fault injected: stop after k steps (preemption), kill a rank in the middle of a save, or raise on one
rank. A job may also check its export against the sharded model. Rank 0 appends one result per job to
RESULTS.json as it goes, so a launch that dies still reports what ran before.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import sft.train  # noqa: E402
from sft.checkpoint import latest_checkpoint  # noqa: E402
from sft.config import load_recipe  # noqa: E402
from sft.errors import SftError  # noqa: E402
from sft.signals import Preempted  # noqa: E402

RANK = int(os.environ.get("RANK", 0))


class StopAfter:
    """Stands in for the signal flag: asks to stop once `n` steps have run (deterministic preemption)."""

    def __init__(self, n: int) -> None:
        self.n, self.calls, self.signal_name = n, 0, "SIGUSR1"

    def install(self) -> None:
        pass

    @property
    def requested(self) -> bool:
        self.calls += 1
        return self.calls >= self.n


@contextmanager
def patched(name: str, value: Any) -> Any:
    old = getattr(sft.train, name)
    setattr(sft.train, name, value)
    try:
        yield
    finally:
        setattr(sft.train, name, old)


def kill_in_save(step: int, rank: int) -> Any:
    """save_checkpoint that SIGKILLs `rank` at `step` after its shards are written, before the commit."""
    original = sft.train.save_checkpoint

    def save(output_dir: Any, at: int, dist: Any, write_state: Any, *rest: Any) -> Any:
        def dying(folder: Path) -> None:
            write_state(folder)
            if at == step and dist.rank == rank:
                print(f"[run_jobs] rank {rank} killed during the save of step {step}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)

        return original(output_dir, at, dist, dying, *rest)

    return save


def raise_at(call: int, rank: int) -> Any:
    """loss_sum that raises on `rank` at its `call`-th micro-batch (1-based)."""
    original = sft.train.loss_sum
    calls = {"n": 0}

    def loss_sum(*args: Any) -> Any:
        calls["n"] += 1
        if rank == RANK and calls["n"] >= call:
            raise RuntimeError(f"injected failure on rank {rank}")
        return original(*args)

    return loss_sum


def measuring(result: dict[str, Any]) -> Any:
    """build_strategy whose strategy measures this rank's memory: the bytes its tensors hold between the last
    backward of step 2 and its optimizer step (parameters, gradients, optimizer state: the model state), and
    the allocation peak of steps 2 and 3 on top of what was allocated after step 1 (max over ranks)."""
    from sft import memory

    original = sft.train.build_strategy
    start = memory.live_bytes()  # what earlier jobs of this process left alive

    def build(recipe: Any, dist: Any) -> Any:
        strategy = original(recipe, dist)
        prepare, step = strategy.prepare, strategy.step
        held: dict[str, Any] = {"calls": 0}

        def prepare_and_keep(model: Any) -> Any:
            held["model"], held["optimizer"] = prepare(model)
            return held["model"], held["optimizer"]

        def measured_step(optimizer: Any, max_grad_norm: Any) -> Any:
            held["calls"] += 1
            n = held["calls"]
            if n == 2:
                result["state_bytes"] = gather(memory.state_bytes(held["model"], held["optimizer"]))
                result["start_bytes"] = gather(start)
            norm = step(optimizer, max_grad_norm)
            if n == 1:
                result["baseline_bytes"] = gather(memory.live_bytes())
                held["peak"] = memory.allocation_peak()
                held["peak_result"] = held["peak"].__enter__()
            if n == 3:
                held["peak"].__exit__(None, None, None)
                result["peak_bytes"] = gather(held["peak_result"]["bytes"] + result["baseline_bytes"][RANK])
            return norm

        strategy.prepare, strategy.step = prepare_and_keep, measured_step
        return strategy

    return build


def gather(value: Any) -> list[Any]:
    """Every rank's value, in rank order."""
    if not torch.distributed.is_initialized():
        return [value]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, value)
    return out


def check_export(recipe: Any) -> dict[str, Any]:
    """Max |logit difference| between the model restored from the last (sharded) checkpoint and the
    exported Hugging Face folder loaded with from_pretrained (peft for an adapter; on a 4-bit base for QLoRA).

    For an adapter also how much it moves the logits (so a zero difference is not a vacuous one), and the
    number of 4-bit layers the loaded base has."""
    from transformers import AutoModelForCausalLM

    from sft.dist import init_dist
    from sft.strategies import build_strategy

    out = Path(recipe.output_dir)
    dist = init_dist("cpu")
    strategy = build_strategy(recipe, dist)
    model, optimizer = strategy.prepare(strategy.build_model())
    ckpt = latest_checkpoint(out)
    assert ckpt is not None
    strategy.load_checkpoint(ckpt, model, optimizer)
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        sharded = model(input_ids=ids).logits.float()
    if not dist.is_main:
        return {}
    if recipe.method == "lora":
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(recipe.model.name, dtype=torch.float32)
        loaded: Any = PeftModel.from_pretrained(base, out / "final")
    elif recipe.method == "qlora":
        # The adapter on a 4-bit base loaded as its sft_adapter.json says, outside the harness (merge's loader).
        from sft.merge.verify import load_adapter_model

        quant = json.loads((out / "final" / "sft_adapter.json").read_text())["quantization"]
        loaded = load_adapter_model(Path(recipe.model.name), out / "final", quant, quant["dtype"], "cpu")
    else:
        loaded = AutoModelForCausalLM.from_pretrained(out / "final", dtype=torch.float32)
    loaded.eval()
    result: dict[str, Any] = {}
    with torch.no_grad():
        exported = loaded(input_ids=ids).logits.float()
        if recipe.method in ("lora", "qlora"):
            from sft.model.quant import linear4bit_layers

            with loaded.disable_adapter():
                base_only = loaded(input_ids=ids).logits.float()
            result["export_adapter_effect"] = float((exported - base_only).abs().max())
            result["export_4bit_layers"] = len(linear4bit_layers(loaded))
    result["export_max_logit_diff"] = float((sharded - exported).abs().max())
    return result


def run(job: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = {"name": job["name"]}
    recipe = load_recipe(job["recipe"], job.get("overrides", []))
    started = time.perf_counter()
    with ExitStack() as stack:
        if job.get("stop_after"):
            stack.enter_context(patched("StopFlag", lambda: StopAfter(job["stop_after"])))
        if job.get("kill_in_save"):
            step, rank = job["kill_in_save"]
            stack.enter_context(patched("save_checkpoint", kill_in_save(step, rank)))
        if job.get("measure"):
            stack.enter_context(patched("build_strategy", measuring(result)))
        if job.get("raise_at"):
            call, rank = job["raise_at"]
            stack.enter_context(patched("loss_sum", raise_at(call, rank)))
        try:
            sft.train.train(recipe)
        except Preempted as e:
            result["preempted_at"] = e.args[0]
        except SftError as e:
            if not job.get("expect_error"):
                raise
            result["error"] = str(e)
    if job.get("check_export"):
        result.update(check_export(load_recipe(job["recipe"], job.get("overrides", []))))
    result["seconds"] = round(time.perf_counter() - started, 2)
    return result


def main() -> None:
    jobs = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    results: list[dict[str, Any]] = []
    for job in jobs:
        results.append(run(job))
        if RANK == 0:
            out.write_text(json.dumps(results, indent=2) + "\n")
        if torch.distributed.is_initialized():
            torch.distributed.barrier()


if __name__ == "__main__":
    main()
