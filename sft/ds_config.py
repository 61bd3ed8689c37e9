"""The DeepSpeed JSON config: pick the bundled file (or the user's), fill "auto" from the recipe, refuse
contradictions. The recipe stays the one source of truth for what both backends share.

It lives next to config.py because recipe validation needs it: `Recipe` calls `check_against_recipe`, so a
contradiction fails before launch, with no torch import (the DeepSpeed strategy calls `fill_config`).
Values that need the job (world size, device, model width) are filled later by `fill_config`.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sft.config import Recipe

AUTO = "auto"
# Package data (shipped in the wheel); the repository's top-level ds_configs/ is a link to it.
BUNDLED_DIR = Path(__file__).resolve().parent / "ds_configs"


def config_path(recipe: Recipe) -> Path:
    ds = recipe.strategy.deepspeed
    if ds.config:
        return Path(ds.config).expanduser()
    offload = ds.offload_optimizer or ds.offload_params
    name = "zero3_offload.json" if ds.zero_stage == 3 and offload else f"zero{ds.zero_stage}.json"
    return BUNDLED_DIR / name


def load_config(recipe: Recipe) -> tuple[Path, dict[str, Any]]:
    path = config_path(recipe)
    if not path.is_file():
        hint = "" if recipe.strategy.deepspeed.config else " (the bundled ds_configs/ folder is missing)"
        raise ValueError(f"strategy.deepspeed.config: {path} not found{hint}")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: a DeepSpeed config is a JSON object")
    return path, cfg


def recipe_values(recipe: Recipe) -> dict[str, tuple[Any, str]]:
    """JSON key path -> (value the recipe implies, the recipe key that decides it)."""
    t, o, ds = recipe.train, recipe.optim, recipe.strategy.deepspeed
    return {
        "train_micro_batch_size_per_gpu": (t.micro_batch_size, "train.micro_batch_size"),
        "gradient_accumulation_steps": (t.grad_accum, "train.grad_accum"),
        "gradient_clipping": (o.max_grad_norm or 0.0, "optim.max_grad_norm"),
        "bf16.enabled": (t.precision == "bf16", "train.precision"),
        "fp16.enabled": (False, "train.precision"),
        "zero_optimization.stage": (ds.zero_stage, "strategy.deepspeed.zero_stage"),
        "zero_optimization.offload_optimizer.device": (
            "cpu" if ds.offload_optimizer else "none",
            "strategy.deepspeed.offload_optimizer",
        ),
        "zero_optimization.offload_param.device": (
            "cpu" if ds.offload_params else "none",
            "strategy.deepspeed.offload_params",
        ),
        "optimizer.type": ("AdamW", "optim.name"),
        "optimizer.params.lr": (o.lr, "optim.lr"),
        "optimizer.params.betas": (list(o.betas), "optim.betas"),
        "optimizer.params.eps": (o.eps, "optim.eps"),
        "optimizer.params.weight_decay": (o.weight_decay, "optim.weight_decay"),
        # ZeRO-Offload refuses a torch optimizer; elsewhere torch's AdamW needs no compiled op.
        "optimizer.params.torch_adam": (not ds.offload_optimizer, "strategy.deepspeed.offload_optimizer"),
    }


def _get(cfg: dict[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _set(cfg: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = cfg
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, str) and isinstance(b, str):
        return a.lower() == b.lower()
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(a - b) <= 1e-12 * max(abs(a), abs(b), 1.0)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def check_against_recipe(recipe: Recipe) -> dict[str, Any]:
    """The config with every recipe-decided "auto" filled; ValueError naming both keys on a contradiction."""
    path, cfg = load_config(recipe)
    cfg = copy.deepcopy(cfg)
    if "scheduler" in cfg:
        raise ValueError(
            f"{path}: remove the 'scheduler' section; the recipe's optim.scheduler and warmup set the schedule"
        )
    for dotted, (want, key) in recipe_values(recipe).items():
        have = _get(cfg, dotted)
        if dotted == "zero_optimization.offload_param.device" and recipe.strategy.deepspeed.zero_stage != 3:
            if have not in (None, AUTO, "none"):
                raise ValueError(f"{path}: {dotted}={have!r} needs ZeRO stage 3")
            continue
        if dotted.startswith("fp16.") and have is None:
            continue  # absent means off; do not add the section
        if have is None or have == AUTO:
            _set(cfg, dotted, want)
        elif not _same(have, want):
            raise ValueError(
                f"{path}: {dotted}={json.dumps(have)} contradicts the recipe's {key} (which means "
                f'{json.dumps(want)}); set it to "auto" in the JSON or change the recipe'
            )
    return cfg


def persistence_threshold(hidden_size: int) -> int:
    """ZeRO-3 keeps tensors up to this many values whole on every rank (norms, biases): 10 x hidden."""
    return 10 * hidden_size


def fill_config(recipe: Recipe, world_size: int, on_gpu: bool, hidden_size: int | None) -> dict[str, Any]:
    """The complete config for `deepspeed.initialize`: recipe values plus the job's own."""
    path, _ = load_config(recipe)
    cfg = check_against_recipe(recipe)
    t = recipe.train
    global_batch = t.global_batch(world_size)
    have = cfg.get("train_batch_size")
    if have not in (None, AUTO) and have != global_batch:
        raise ValueError(
            f"{path}: train_batch_size={have} but micro_batch_size x grad_accum x processes = {global_batch}; "
            'set it to "auto"'
        )
    cfg["train_batch_size"] = global_batch
    zero = cfg.setdefault("zero_optimization", {})
    for section in ("offload_optimizer", "offload_param"):
        if isinstance(zero.get(section), dict) and zero[section].get("pin_memory") == AUTO:
            zero[section]["pin_memory"] = on_gpu  # pinned host memory needs a GPU
    # Bucket sizes scale with the model's width (the usual rule of thumb: hidden^2).
    h = hidden_size or 4096
    defaults = {
        "reduce_bucket_size": h * h,
        "allgather_bucket_size": h * h,
        "stage3_prefetch_bucket_size": int(0.9 * h * h),
        "stage3_param_persistence_threshold": persistence_threshold(h),
    }
    for key, value in defaults.items():
        if zero.get(key) == AUTO:
            zero[key] = value
    leftover = [k for k, v in _walk(cfg) if v == AUTO]
    if leftover:
        raise ValueError(
            f'{path}: no recipe value fills {", ".join(leftover)}; give a number instead of "auto"'
        )
    return cfg


def _walk(cfg: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in cfg.items():
        if isinstance(v, dict):
            out += _walk(v, f"{prefix}{k}.")
        else:
            out.append((prefix + k, v))
    return out
