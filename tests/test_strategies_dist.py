"""FSDP2 and DeepSpeed ZeRO 1/2/3 on CPU with gloo, 2 ranks, against one process (DESIGN invariants 2, 4, 5).

A torchrun launch costs ~10 s here, so the jobs are batched: one process runs the single-process references
(and two runs stopped at step 3 with one rank), two short launches inject failures (a rank killed during a
save, a rank that raises), and one launch runs every sharded job in sequence in one process group. Each job
is the real loop (`sft.train.train`, as `sft train` runs it); the tests below assert on what they wrote.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from sft.checkpoint import latest_checkpoint

pytestmark = [pytest.mark.dist, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
RUNNER = REPO / "tests" / "distributed" / "run_jobs.py"
STEPS = 6
FP32_RTOL = 1e-5
BF16_RTOL = 2e-3

FSDP = ["strategy.name=fsdp2"]
ZERO = {z: ["strategy.name=deepspeed", f"strategy.deepspeed.zero_stage={z}"] for z in (1, 2, 3)}
BF16 = ["train.precision=bf16"]
OFFLOAD = ["strategy.deepspeed.offload_optimizer=true", "strategy.deepspeed.offload_params=true"]
LORA = ["method=lora", "lora.dropout=0.0", "lora.r=4"]
# NF4 + double quant 4-bit base (the tiny model's linear layers are multiples of the 64-value blocks), packed in
# float32 storage (= model.dtype) so FSDP2 can shard it; float32 compute keeps the comparison exact.
QLORA = [*LORA, "method=qlora", "quant.compute_dtype=float32", "quant.storage_dtype=float32"]
PER_RANK = ["train.micro_batch_size=2", "train.grad_accum=2"]  # x2 ranks = 8 samples, as the reference
EVAL = ["data.eval=EVAL", "eval.prompts=['What is a kluge?']", "eval.max_new_tokens=4"]


class Env:
    def __init__(self, root: Path, model_dir: Path) -> None:
        self.root = root
        self.results: dict[str, dict[str, Any]] = {}
        self.jobs: dict[str, dict[str, Any]] = {}
        self.crash: tuple[int, str, float] = (0, "", 0.0)  # (exit code, output, seconds) of each launch
        self.raised: tuple[int, str, float] = (0, "", 0.0)
        self.after_crash: dict[str, Any] = {}
        rows = (REPO / "sft" / "builtin_data" / "jargon" / "train.jsonl").read_text().splitlines()
        (root / "train.jsonl").write_text("\n".join(rows[:64]) + "\n")
        # the shortest other entries: at max_seq_len 64 they keep their trained end-of-turn marker (a source
        # where no sample does is refused before training, sft/data/prepare.py)
        (root / "eval.jsonl").write_text("\n".join(sorted(rows[64:], key=len)[:8]) + "\n")
        recipe = {
            "model": str(model_dir),
            "method": "full",
            "data": {"train": str(root / "train.jsonl"), "eval": [], "max_seq_len": 64},
            "train": {"micro_batch_size": 4, "grad_accum": 2, "max_steps": STEPS, "device": "cpu"},
            "optim": {"lr": 1e-3, "warmup_steps": 2, "max_grad_norm": 1.0},
            "eval": {"batch_size": 4, "max_batches": 1},
            "logging": {"wandb": {"mode": "disabled"}, "progress": False, "plots": False},
        }
        self.recipe = root / "base.yaml"
        self.recipe.write_text(json.dumps(recipe))  # JSON is YAML

    def job(self, name: str, overrides: list[str], **extra: Any) -> dict[str, Any]:
        overrides = [o.replace("EVAL", str(self.root / "eval.jsonl")) for o in overrides]
        job = {
            "name": name,
            "recipe": str(self.recipe),
            "overrides": [f"output_dir={self.out(name)}", *overrides],
            **extra,
        }
        self.jobs[name] = job
        return job

    def out(self, name: str) -> Path:
        return self.root / "runs" / name

    def launch(self, jobs: list[dict[str, Any]], nproc: int, timeout: float = 600) -> tuple[int, str, float]:
        tag = jobs[0]["name"]
        jobs_file, results = self.root / f"{tag}.jobs.json", self.root / f"{tag}.results.json"
        jobs_file.write_text(json.dumps(jobs))
        if nproc == 1:
            cmd = [sys.executable, str(RUNNER)]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
            cmd += ["--standalone", str(RUNNER)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        env["SFT_COMPILE_BACKEND"] = (
            "aot_eager"  # compile's tracing without generating kernels (minutes here)
        )
        env.pop("WORLD_SIZE", None)
        start = time.perf_counter()
        proc = subprocess.run(
            [*cmd, str(jobs_file), str(results)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            cwd=REPO,
        )
        elapsed = time.perf_counter() - start
        output = proc.stdout + proc.stderr
        (self.root / f"{tag}.log").write_text(output)
        for r in json.loads(results.read_text()) if results.exists() else []:
            self.results[r["name"]] = r
        return proc.returncode, output, elapsed


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Env:
    """Every launch, in order; the tests below read what they left."""
    e = Env(tmp_path_factory.mktemp("strategies"), tiny_model_dir)
    # DeepSpeed's C++ ops (CPU collectives, CPU Adam for offload) compile once into the project cache (minutes,
    # the first time on a machine); later runs load them in a second.
    cmd = [sys.executable, "-m", "sft.strategies.deepspeed"]
    built = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-3000:]

    # 1. One process: the references, and runs stopped at step 3 to resume with 2 ranks.
    rc, out, _ = e.launch(
        [
            e.job("single", [], measure=True),
            e.job("single_bf16", BF16),
            e.job("single_lora", LORA, measure=True),
            e.job("single_qlora", QLORA, measure=True),
            e.job("single_qlora_bf16", [*QLORA, *BF16]),
            e.job("fsdp2_qlora_w1_cut", [*FSDP, *QLORA], stop_after=3),
            e.job("fsdp2_w1_cut", FSDP, stop_after=3),
            e.job("zero3_w1_cut", ZERO[3], stop_after=3),
        ],
        nproc=1,
    )
    assert rc == 0, out[-4000:]

    # 2. A rank killed in the middle of the save of step 4 (after its shards, before the commit).
    e.crash = e.launch(
        [e.job("fsdp2_crash", [*FSDP, *PER_RANK, "checkpoint.every=1"], kill_in_save=[4, 0])], nproc=2
    )
    ckpts = e.out("fsdp2_crash") / "checkpoints"
    e.after_crash = {
        "latest": latest_checkpoint(e.out("fsdp2_crash")),
        "folders": sorted(p.name for p in ckpts.iterdir()),
    }
    # 3. A rank that raises at its third micro-batch (step 2).
    e.raised = e.launch([e.job("zero3_raise", [*ZERO[3], *PER_RANK], raise_at=[3, 1])], nproc=2, timeout=300)

    # 4. Everything else, in one process group.
    jobs = [
        e.job("fsdp2", [*FSDP, *PER_RANK, *EVAL], check_export=True, measure=True),
        e.job("zero1", [*ZERO[1], *PER_RANK], measure=True),
        e.job("zero2", [*ZERO[2], *PER_RANK], measure=True),
        e.job("zero3", [*ZERO[3], *PER_RANK, *EVAL], check_export=True, measure=True),
        e.job("zero3_offload", [*ZERO[3], *PER_RANK, *OFFLOAD]),
        # Same global batch of 8, split differently.
        e.job("fsdp2_m1a4", [*FSDP, "train.micro_batch_size=1", "train.grad_accum=4"]),
        e.job("zero3_m4a1", [*ZERO[3], "train.micro_batch_size=4", "train.grad_accum=1"]),
        e.job(
            "fsdp2_ac",
            [
                *FSDP,
                *PER_RANK,
                "strategy.fsdp.activation_checkpointing=true",
                "strategy.fsdp.reshard_after_forward=false",
                "strategy.fsdp.sync_every_micro_batch=true",
            ],
        ),
        e.job("fsdp2_bf16", [*FSDP, *PER_RANK, *BF16]),
        # torch.compile of each decoder layer before sharding (aot_eager backend: see Env.launch).
        e.job("fsdp2_compile", [*FSDP, *PER_RANK, "train.compile=true"]),
        e.job("zero2_bf16", [*ZERO[2], *PER_RANK, *BF16]),
        e.job("fsdp2_lora", [*FSDP, *PER_RANK, *LORA], check_export=True, measure=True),
        e.job("zero3_lora", [*ZERO[3], *PER_RANK, *LORA], check_export=True, measure=True),
        # FSDP-QLoRA: packed 4-bit weights sharded, their quantization state whole on every rank.
        e.job("fsdp2_qlora", [*FSDP, *PER_RANK, *QLORA, *EVAL], check_export=True, measure=True),
        # bf16 autocast over a float32 model: the packed weights must still be gathered as float32, uncast.
        e.job("fsdp2_qlora_bf16", [*FSDP, *PER_RANK, *QLORA, *BF16, "model.gradient_checkpointing=true"]),
        e.job("fsdp2_qlora_cut", [*FSDP, *PER_RANK, *QLORA], stop_after=3),
        e.job("fsdp2_qlora_cut", [*FSDP, *PER_RANK, *QLORA, "resume=true"]),
        e.job("fsdp2_qlora_w1_cut", [*FSDP, *PER_RANK, *QLORA, "resume=true"]),
        # Resume: stop at 3, continue.
        e.job("fsdp2_cut", [*FSDP, *PER_RANK], stop_after=3),
        e.job("fsdp2_cut", [*FSDP, *PER_RANK, "resume=true"]),
        e.job("zero3_cut", [*ZERO[3], *PER_RANK], stop_after=3),
        e.job("zero3_cut", [*ZERO[3], *PER_RANK, "resume=true"]),
        # Resume with another world size: DCP reshards; DeepSpeed refuses clearly.
        e.job("fsdp2_w1_cut", [*FSDP, *PER_RANK, "resume=true"]),
        e.job("zero3_w1_cut", [*ZERO[3], *PER_RANK, "resume=true"], expect_error=True),
        # Resume after the crash.
        e.job("fsdp2_crash", [*FSDP, *PER_RANK, "checkpoint.every=1", "resume=true"]),
    ]
    rc, out, _ = e.launch(jobs, nproc=2, timeout=900)
    assert rc == 0, out[-6000:]
    return e


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def grad_norms(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["train/grad_norm"] for r in rows if "train/grad_norm" in r]


def assert_close(ref: dict[int, float], got: dict[int, float], rtol: float, what: str) -> None:
    assert list(got) == list(ref), (what, list(ref), list(got))
    for step, a in ref.items():
        assert abs(got[step] - a) <= rtol * abs(a), (what, step, a, got[step], abs(got[step] - a) / abs(a))


@pytest.mark.parametrize("name", ["fsdp2", "zero1", "zero2", "zero3", "zero3_offload", "fsdp2_ac"])
def test_fp32_losses_and_exported_weights_match_one_process(env: Env, name: str) -> None:
    ref = losses(env.out("single"))
    assert len(ref) == STEPS and ref[STEPS] < ref[1]
    assert max(grad_norms(env.out("single"))) > 1.0  # clipping was exercised, not only the plain step
    assert_close(ref, losses(env.out(name)), FP32_RTOL, name)
    wa = load_file(str(env.out("single") / "final" / "model.safetensors"))
    wb = load_file(str(env.out(name) / "final" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.allclose(wa[key], wb[key], rtol=0, atol=1e-5), (
            name,
            key,
            (wa[key] - wb[key]).abs().max(),
        )


@pytest.mark.parametrize("name", ["fsdp2_m1a4", "zero3_m4a1"])
def test_micro_batch_accumulation_world_size_split_does_not_change_losses(env: Env, name: str) -> None:
    assert_close(losses(env.out("single")), losses(env.out(name)), FP32_RTOL, name)


def test_fsdp2_with_compiled_decoder_layers_matches_one_process(env: Env) -> None:
    assert_close(losses(env.out("single")), losses(env.out("fsdp2_compile")), FP32_RTOL, "fsdp2_compile")


@pytest.mark.parametrize("name", ["fsdp2_bf16", "zero2_bf16"])
def test_bf16_mixed_precision_losses_match_one_process(env: Env, name: str) -> None:
    assert_close(losses(env.out("single_bf16")), losses(env.out(name)), BF16_RTOL, name)


@pytest.mark.parametrize("name", ["fsdp2_lora", "zero3_lora"])
def test_lora_losses_match_and_adapter_exports(env: Env, name: str) -> None:
    assert_close(losses(env.out("single_lora")), losses(env.out(name)), FP32_RTOL, name)
    final = env.out(name) / "final"
    assert (final / "adapter_model.safetensors").is_file() and not (final / "model.safetensors").exists()
    saved = load_file(str(final / "adapter_model.safetensors"))
    assert saved and all("lora_" in k for k in saved)  # only the adapter was gathered and written


@pytest.mark.parametrize("name", ["fsdp2", "zero3", "fsdp2_lora", "zero3_lora", "fsdp2_qlora"])
def test_export_loads_and_gives_the_sharded_models_logits(env: Env, name: str) -> None:
    result = env.results[name]
    assert result["export_max_logit_diff"] <= 1e-4, result
    if "lora" in name:  # the adapter moves the logits far more than the export could have missed
        assert result["export_adapter_effect"] > 100 * max(result["export_max_logit_diff"], 1e-7), result
    if name == "fsdp2_qlora":
        assert result["export_4bit_layers"] == 2 * 7, result  # loaded onto a 4-bit base


@pytest.mark.parametrize(
    ("name", "ref", "rtol"),
    [
        ("fsdp2_qlora", "single_qlora", FP32_RTOL),
        ("fsdp2_qlora_cut", "fsdp2_qlora", FP32_RTOL),  # stopped at step 3, resumed: as uninterrupted
        ("fsdp2_qlora_w1_cut", "single_qlora", FP32_RTOL),  # steps 1-3 on one process, 4-6 on two
        ("fsdp2_qlora_bf16", "single_qlora_bf16", BF16_RTOL),
    ],
)
def test_fsdp2_qlora_matches_one_process(env: Env, name: str, ref: str, rtol: float) -> None:
    got = losses(env.out(name))
    assert list(got) == list(range(1, STEPS + 1))  # no step trained twice or skipped
    assert_close(losses(env.out(ref)), got, rtol, name)
    final = env.out(name) / "final"
    assert (final / "adapter_model.safetensors").is_file() and not (final / "model.safetensors").exists()
    saved = load_file(str(final / "adapter_model.safetensors"))
    reference = load_file(str(env.out(ref) / "final" / "adapter_model.safetensors"))
    assert saved.keys() == reference.keys() and all("lora_" in k for k in saved)  # never the 4-bit base
    meta = json.loads((final / "sft_adapter.json").read_text())
    assert meta["method"] == "qlora" and meta["quantization"] == {
        "quant_type": "nf4",
        "double_quant": True,
        "blocksize": 64,
        "compute_dtype": "float32",
        "quant_storage": "float32",
        "dtype": "float32",
    }
    if rtol == FP32_RTOL:
        for key in saved:
            assert torch.allclose(saved[key], reference[key], rtol=0, atol=1e-5), key
    # The checkpoints hold the adapter and its optimizer state, not the frozen 4-bit weights.
    ckpt = latest_checkpoint(env.out(name))
    assert ckpt is not None
    from torch.distributed.checkpoint import FileSystemReader

    keys = list(FileSystemReader(str(ckpt / "dcp")).read_metadata().state_dict_metadata)
    model_keys = [k for k in keys if k.startswith("model.")]
    assert model_keys and all("lora_" in k for k in model_keys), model_keys[:4]


def test_sharded_eval_and_generation_run_on_every_rank(env: Env) -> None:
    for name in ("fsdp2", "zero3"):
        results = json.loads((env.out(name) / "results.json").read_text())
        assert results["eval_after"]["eval/tokens"] > 0
        assert len(results["answers_after"]) == 1


@pytest.mark.parametrize("name", ["fsdp2_cut", "zero3_cut"])
def test_resume_matches_the_uninterrupted_run(env: Env, name: str) -> None:
    whole = losses(env.out(name.removesuffix("_cut")))
    got = losses(env.out(name))
    assert list(got) == list(range(1, STEPS + 1))  # no step trained twice or skipped
    assert_close(whole, got, FP32_RTOL, name)


def test_fsdp2_resumes_with_another_world_size(env: Env) -> None:
    # Steps 1-3 ran in one process (micro 4 x accum 2), 4-6 on two ranks (micro 2 x accum 2 x 2).
    got = losses(env.out("fsdp2_w1_cut"))
    assert list(got) == list(range(1, STEPS + 1))
    assert_close(losses(env.out("single")), got, FP32_RTOL, "fsdp2 1 -> 2 ranks")


def test_deepspeed_refuses_another_world_size_clearly(env: Env) -> None:
    error = env.results["zero3_w1_cut"]["error"]
    assert "written by 1 processes" in error and "resume with 1 processes" in error, error


def test_rank_killed_during_save_leaves_a_complete_checkpoint(env: Env) -> None:
    rc, output, elapsed = env.crash
    assert rc != 0 and "killed during the save of step 4" in output
    assert elapsed < 120, f"the job took {elapsed:.0f}s to end after a rank was killed"
    latest = env.after_crash["latest"]
    assert latest is not None and latest.name == "step-0000003", env.after_crash
    assert ".step-0000004.partial" in env.after_crash["folders"]  # the interrupted save, never committed
    # The resume (main launch) started from step 3 and trained 4-6 like the uninterrupted run.
    got = losses(env.out("fsdp2_crash"))
    assert list(got) == [1, 2, 3, 4, 5, 6]
    assert_close(losses(env.out("fsdp2")), got, FP32_RTOL, "resume after crash")
    assert (
        latest_checkpoint(env.out("fsdp2_crash")) == env.out("fsdp2_crash") / "checkpoints" / "step-0000006"
    )


def test_a_rank_that_raises_ends_the_job_promptly(env: Env) -> None:
    rc, output, elapsed = env.raised
    assert rc != 0 and "injected failure on rank 1" in output
    assert elapsed < 90, f"the job took {elapsed:.0f}s to end after one rank raised"


@pytest.mark.parametrize(
    "name",
    [
        "single",
        "single_lora",
        "single_qlora",
        "fsdp2",
        "zero1",
        "zero2",
        "zero3",
        "fsdp2_lora",
        "zero3_lora",
        "fsdp2_qlora",
    ],
)
def test_plan_model_state_equals_the_bytes_each_rank_holds(env: Env, name: str) -> None:
    """`sft plan`'s model state (parameters, gradients, optimizer state, master weights, 4-bit base) against
    every live tensor of each rank between the backward and the optimizer step of step 2 (sft/plan.py)."""
    from sft.config import load_recipe
    from sft.plan import layout_of, meta_model, model_shape, model_state, params_of

    job = env.jobs[name]
    recipe = load_recipe(job["recipe"], job["overrides"])
    model, config = meta_model(recipe)
    params = params_of(model, recipe.quant if recipe.method == "qlora" else None)
    threshold = (
        10 * model_shape(config).hidden
    )  # ZeRO-3 keeps tensors this small whole (ds_config.fill_config)
    measured = env.results[name]
    world = len(measured["state_bytes"])
    assert world == (1 if name.startswith("single") else 2)
    for rank, (held, before) in enumerate(zip(measured["state_bytes"], measured["start_bytes"], strict=True)):
        planned = model_state(params, layout_of(recipe), world, rank, persistence_threshold=threshold).total
        got = held["all"] - before  # less what earlier jobs of the same processes left alive
        assert abs(got - planned) <= 0.02 * planned, (name, rank, got, planned, held)
