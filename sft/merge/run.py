"""Run a merge: stream every output tensor through the method into sharded safetensors, then publish.

The output is written into a hidden sibling folder (`.NAME.partial`) and moved into place (sft/publish.py)
once the weights, config, tokenizer and (optional) verification are done; on any error the partial folder
is removed, and an old output (overwrite) is replaced only once the new one is complete. So the output
folder is complete or absent, never half-written.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sft.errors import SftError
from sft.merge.config import MergeConfig
from sft.merge.params import Setting, resolve
from sft.merge.plan import TOKENIZER_FILES, Plan, build_plan, describe
from sft.publish import publishing
from sft.safetensors_io import ShardedWriter

if TYPE_CHECKING:
    import torch

PROVENANCE = "sft_merge.json"


@dataclass
class MergeResult:
    output: Path
    seconds: float = 0.0
    tensors: int = 0
    bytes_written: int = 0
    shards: int = 0
    peak_tensor_bytes: int = 0
    """Largest sum of bytes of the tensors alive while one output tensor was computed (inputs + result)."""
    writer_peak_bytes: int = 0
    """Largest tensor the writer was handed (it holds nothing between calls)."""
    report: dict[str, Any] = field(default_factory=dict)


def _log(line: str) -> None:
    print(f"[sft merge] {line}", flush=True)


def merge(cfg: MergeConfig, log: Callable[[str], None] = _log) -> MergeResult:
    """Check everything, print the plan, write the merged model (unless dry_run), return where it is."""
    plan = build_plan(cfg)
    try:
        for line in describe(plan):
            log(line)
        if cfg.dry_run:
            log("dry run: all inputs checked; nothing written")
            return MergeResult(plan.output)
        return _execute(plan, log)
    finally:
        plan.close()


def _execute(plan: Plan, log: Callable[[str], None]) -> MergeResult:
    import torch

    cfg = plan.cfg
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SftError("device: cuda, but torch sees no CUDA device; set device: cpu (or auto)")
    output = plan.output
    start = time.perf_counter()
    with publishing(output) as partial:
        result = _write_weights(plan, partial, device, log)
        _write_files(plan, partial)
        verify = cfg.verify if cfg.verify is not None else cfg.method == "lora"
        if verify:
            from sft.merge.verify import verify_merge

            result.report = verify_merge(plan, partial, device, log)
        result.seconds = time.perf_counter() - start
        _write_provenance(plan, partial, result)
    result.output = output
    log(
        f"done in {result.seconds:.1f} s: {result.tensors} tensors, {result.bytes_written / 1e9:.2f} GB in "
        f"{result.shards} file(s) -> {output}"
    )
    return result


def _write_weights(plan: Plan, folder: Path, device: str, log: Callable[[str], None]) -> MergeResult:
    import torch

    writer = ShardedWriter(folder, plan.specs, plan.cfg.max_shard_size)
    out_dtype = getattr(torch, plan.out_dtype)
    total = sum(s.nbytes for s in plan.specs)
    result = MergeResult(plan.output, tensors=len(plan.specs), shards=len(writer.files))
    t0 = last = time.perf_counter()
    try:
        with torch.no_grad():
            for spec in plan.specs:
                merged, held = compute_tensor(plan, spec.name, device)
                if merged.is_floating_point():
                    merged = merged.to(out_dtype)
                result.peak_tensor_bytes = max(result.peak_tensor_bytes, held + merged.nbytes)
                writer.write(spec.name, merged)
                del merged
                if time.perf_counter() - last > 10 and writer.bytes_written < total:
                    last = time.perf_counter()  # a progress line every 10 s on long merges
                    log(f"  {writer.bytes_written / total:4.0%} written ({last - t0:.0f} s)")
        writer.finish()
    finally:
        writer.abort()
    result.bytes_written = writer.bytes_written
    result.writer_peak_bytes = writer.peak_pending_bytes
    return result


def compute_tensor(plan: Plan, name: str, device: str) -> tuple[torch.Tensor, int]:
    """The merged value of one output tensor (float32 for floats), and the bytes of inputs it read."""
    import torch

    from sft.merge import methods

    cfg = plan.cfg
    if cfg.method == "lora":
        folded = plan.inputs[0].read(name, device)
        return folded, folded.nbytes
    tensors = [s.read(name, device) for s in plan.inputs]
    base = plan.base.read(name, device) if plan.base is not None else None
    held = sum(t.nbytes for t in tensors) + (base.nbytes if base is not None else 0)
    if not tensors[0].is_floating_point():
        return tensors[0], held  # integer buffers are not merged: taken from the first model
    rows = plan.vocab_rows.get(name)
    if rows is not None:
        tensors = [t[: rows[0]] for t in tensors]
        base = base[: rows[0]] if base is not None else None
    at = plan.layer_position(name)
    weights = [_value(m.weight, name, at, 1.0) for m in cfg.models]
    m = cfg.method
    if m == "linear":
        out = methods.linear(tensors, weights, cfg.normalize_default())
    elif m == "slerp":
        out = methods.slerp(tensors[0], tensors[1], _value(cfg.t, name, at, 0.5))
    else:
        assert base is not None
        out = _with_base(cfg, name, at, base, tensors, weights)
    if rows is not None and rows[1] > rows[0]:
        # vocab: extend: the rows only some models have come unmerged from copy_from.
        extra = plan.copy_source.read(name, device)[rows[0] :]
        out = torch.cat([out, extra], dim=0)
    return out, held


def _value(setting: Setting | None, name: str, at: float, default: float) -> float:
    value = resolve(setting, name, at)
    return default if value is None else value


def _with_base(
    cfg: MergeConfig,
    name: str,
    at: float,
    base: torch.Tensor,
    tensors: list[torch.Tensor],
    weights: list[float],
) -> torch.Tensor:
    """The methods that work on task vectors θᵢ − base."""
    from sft.merge import methods

    m, normalize = cfg.method, cfg.normalize_default()
    if m == "task_arithmetic":
        return methods.task_arithmetic(base, tensors, weights, cfg.scale, normalize)
    if m == "model_stock":
        return methods.model_stock(base, tensors, cfg.filter_wise)
    densities = [_value(cfg.density_setting(i), name, at, 1.0) for i in range(len(tensors))]
    if m == "ties":
        return methods.ties(base, tensors, weights, densities, cfg.scale, normalize, cfg.semantics)
    gens = [methods.seeded_generator(cfg.seed, i, name) for i in range(len(tensors))]
    consensus = m in ("dare_ties", "della")
    if m.startswith("dare"):
        return methods.dare(
            base,
            tensors,
            weights,
            densities,
            cfg.scale,
            normalize,
            gens,
            consensus,
            cfg.rescale,
            cfg.semantics,
        )
    epsilons = [_value(cfg.epsilon_setting(i), name, at, 0.15) for i in range(len(tensors))]
    return methods.della(
        base,
        tensors,
        weights,
        densities,
        epsilons,
        cfg.scale,
        normalize,
        gens,
        consensus,
        cfg.rescale,
        cfg.semantics,
    )


def _write_files(plan: Plan, folder: Path) -> None:
    """config.json (dtype and vocab updated), generation config, tokenizer and chat template."""
    (folder / "config.json").write_text(json.dumps(plan.out_config, indent=2, sort_keys=True) + "\n")
    config_folder = plan.copy_source.folder
    if (config_folder / "generation_config.json").is_file():
        shutil.copy2(config_folder / "generation_config.json", folder)
    for name in TOKENIZER_FILES:
        if (plan.tokenizer_folder / name).is_file():
            shutil.copy2(plan.tokenizer_folder / name, folder)
    extra_templates = plan.tokenizer_folder / "additional_chat_templates"
    if extra_templates.is_dir():
        shutil.copytree(extra_templates, folder / extra_templates.name)


def _write_provenance(plan: Plan, folder: Path, result: MergeResult) -> None:
    record = {
        "method": plan.cfg.method,
        "config": plan.cfg.model_dump(mode="json"),
        "inputs": [
            {"label": label, "folder": str(s.folder)}
            for label, s in zip(plan.labels, plan.inputs, strict=True)
        ],
        "base": str(plan.base.folder) if plan.base is not None else None,
        "seconds": round(result.seconds, 2),
        "report": result.report,
    }
    (folder / PROVENANCE).write_text(json.dumps(record, indent=2) + "\n")
