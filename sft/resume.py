"""Resume: which checkpoint to continue from, and whether the new recipe and data still fit it (invariant 11).

`resume: true` continues from `checkpoints/latest`, falling back to the newest complete `step-*` folder when the
pointer is broken (and saying so); with nothing to continue it is an error. `resume: auto` (what `sft launch`
and requeued jobs use) starts from step 0 in that case. The new recipe is compared with the one saved in the
checkpoint, and the training data's content with the fingerprints saved there. Changes that keep the run
exact pass (evaluation, logging, checkpoint cadence, where it runs); the others are refused unless
`resume_changes: allow`, and then the run continues with the new values and records what changed. Changes
the saved weights cannot take (method, base model, LoRA shape) are refused always.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sft.checkpoint import (
    RECIPE_FILE,
    STATE_FILE,
    checkpoints_dir,
    damage,
    load_trainer_state,
    read_pointer,
    step_folders,
)
from sft.config import DataConfig, Recipe, validate_recipe
from sft.errors import SftError

# Keys whose change keeps a resumed run exact: they decide what is evaluated, logged, saved, or where it runs.
EXACT_SAFE = (
    "eval", "logging", "checkpoint", "launch", "data.eval", "data.cache",
    "output_dir", "resume", "resume_changes", "overwrite",
)  # fmt: skip
# Keys the saved weights cannot follow: a checkpoint of another shape or kind of model.
STRUCTURAL = (
    "method", "model.name", "model.revision", "lora.r", "lora.target_modules", "lora.use_dora",
    "lora.modules_to_save", "quant", "strategy.name",
)  # fmt: skip
LENGTH_KEYS = ("train.max_steps", "train.epochs")
# Keys that only split the global batch (micro-batch size x accumulation x ranks): the same global batch trains
# the same samples per step, so a new split (e.g. resuming on more ranks) keeps the run exact.
BATCH_SPLIT = ("train.micro_batch_size", "train.grad_accum")


@dataclass
class ResumePlan:
    folder: Path | None = None
    """The checkpoint to continue from; None: start at step 0."""
    notes: list[str] = field(default_factory=list)
    """What the user must hear: a broken pointer skipped, changes allowed."""
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    """Allowed changes: key -> (the checkpoint's value, the new value)."""
    fingerprints: dict[str, str] = field(default_factory=dict)
    """The training sources' content hashes (saved with every checkpoint)."""
    history: list[dict[str, Any]] = field(default_factory=list)
    global_batch: int = 0
    """Samples per optimizer step over every rank (saved: a new split of the same global batch is exact)."""
    finished: dict[str, Any] | None = None
    """The results of a run that is already complete (nothing to redo)."""

    def record(self) -> dict[str, Any]:
        """What a checkpoint stores for the next resume: fingerprints and every change allowed so far."""
        history = self.history
        if self.changes and self.folder is not None:
            history = [*history, {"at_step": _saved_step(self.folder), "changes": _shown(self.changes)}]
        return {
            "data_fingerprints": self.fingerprints,
            "recipe_changes": history,
            "global_batch": self.global_batch,
        }


def plan_resume(recipe: Recipe) -> ResumePlan:
    """Decide, before anything is loaded: the checkpoint, and whether the recipe and data may continue it."""
    out = Path(recipe.output_dir)
    ranks = int(os.environ.get("WORLD_SIZE", 1))  # before the process group starts: as init_dist reads it
    plan = ResumePlan(
        fingerprints=training_fingerprints(recipe.data),
        global_batch=recipe.train.micro_batch_size * recipe.train.grad_accum * ranks,
    )
    if recipe.resume is False:
        return plan
    folder, notes = find_checkpoint(out)
    plan.notes = notes
    if folder is None:
        if recipe.resume is True:
            why = "; ".join(notes) or f"{checkpoints_dir(out)} does not exist"
            raise SftError(
                f"resume=true, but output_dir {out} has no checkpoint to continue ({why}); use resume=auto to "
                "start from step 0 when there is none, or check output_dir"
            )
        if (out / "final").exists():
            raise SftError(
                f"resume=auto: output_dir {out} holds a finished run's final/ but no checkpoint to continue; "
                "overwrite=true replaces it, or choose another output_dir"
            )
        plan.notes.append(f"resume=auto: no checkpoint in {out}; starting from step 0")
        return plan
    state = json.loads((folder / STATE_FILE).read_text())
    changes = compare(recipe, saved_recipe(folder), folder)
    changes.update(compare_data(state.get("data_fingerprints", {}), plan.fingerprints))
    if state.get("global_batch") == plan.global_batch:  # another split of the same global batch
        changes = {k: v for k, v in changes.items() if k not in BATCH_SPLIT}
    refused = {k: v for k, v in changes.items() if not _exact_safe(k, recipe)}
    structural = {k: v for k, v in refused.items() if _matches(k, STRUCTURAL)}
    if structural:
        raise SftError(
            f"resume: the recipe changes {_listed(structural)}, which the saved weights of {folder} cannot "
            "follow; restore the old values, or start a new output_dir (overwrite=true replaces this run)"
        )
    if refused and recipe.resume_changes == "refuse":
        raise SftError(
            f"resume: the recipe or data differ from checkpoint {folder.name}'s in ways that change the run: "
            f"{_listed(refused)}; restore them, or set resume_changes=allow to continue with the new values "
            "(the change is recorded)"
        )
    plan.folder, plan.changes, plan.history = folder, refused, state.get("recipe_changes", [])
    if refused:
        plan.notes.append(
            f"resume_changes=allow: continuing with {_listed(refused)} (recorded in checkpoints)"
        )
    results = out / "results.json"
    if (
        not refused
        and state.get("step") == state.get("total_steps")
        and (out / "final").is_dir()
        and results.is_file()
    ):
        plan.finished = json.loads(results.read_text())
    return plan


def find_checkpoint(output_dir: Path) -> tuple[Path | None, list[str]]:
    """The checkpoint `latest` names, or else the newest complete `step-*` folder (with a note saying why)."""
    folder, why = read_pointer(output_dir)
    if folder is not None:
        return folder, []
    if not checkpoints_dir(output_dir).is_dir():
        return None, []
    notes: list[str] = []
    for candidate in step_folders(output_dir):
        problem = damage(candidate)
        if problem is None:
            return candidate, [
                f"{why}; resuming from the newest complete checkpoint, {candidate.name}",
                *notes,
            ]
        notes.append(f"{candidate.name} is not complete ({problem})")
    return None, [f"{why}", *notes]


def saved_recipe(folder: Path) -> dict[str, Any] | None:
    """The recipe the checkpoint was written with (older checkpoints: the run folder's recipe.yaml)."""
    for path in (folder / RECIPE_FILE, folder.parents[1] / RECIPE_FILE):
        if path.is_file():
            loaded = yaml.safe_load(path.read_text())
            return loaded if isinstance(loaded, dict) else None
    return None


def compare(recipe: Recipe, saved: dict[str, Any] | None, folder: Path) -> dict[str, tuple[Any, Any]]:
    """key -> (saved value, new value) for every recipe key that differs."""
    if saved is None:
        return {}
    with contextlib.suppress(
        SftError
    ):  # through today's schema: its defaults fill keys the saved one predates
        saved = validate_recipe(saved, str(folder / RECIPE_FILE)).model_dump(mode="json")
    old, new = _flat(saved), _flat(recipe.model_dump(mode="json"))
    return {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)}


def compare_data(saved: dict[str, str], now: dict[str, str]) -> dict[str, tuple[Any, Any]]:
    """The training sources whose content changed since the checkpoint (same place in the recipe)."""
    return {
        f"data.{key} content": ("as saved", "changed")
        for key, fp in now.items()
        if key in saved and saved[key] != fp
    }


def training_fingerprints(data: DataConfig) -> dict[str, str]:
    """The training sources' content hashes, as run.json records them (eval data does not change the run;
    a hub data set read as a stream is not hashed)."""
    from sft.manifest import data_fingerprints

    return {k: v for k, v in data_fingerprints(data).items() if k.startswith("train[") and v is not None}


def restore(
    plan: ResumePlan, strategy: Any, model: Any, optimizer: Any, scheduler: Any, data: Any, dist: Any
) -> dict[str, Any]:
    """Load the checkpoint into model, optimizer, schedule and data; returns the trainer state."""
    folder = plan.folder
    assert folder is not None
    new_values = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    try:
        strategy.load_checkpoint(folder, model, optimizer)
        state = load_trainer_state(folder, dist)
    except SftError:
        raise
    except Exception as e:  # a file that reads wrong although its size is right: name it and the way out
        older = next((f for f in step_folders(folder.parents[1]) if f != folder and damage(f) is None), None)
        way_out = (
            f"the older complete checkpoint {older.name} can continue the run: move {folder.name} aside "
            f"(mv {folder} {folder.parent / ('bad-' + folder.name)}) and resume again"
            if older
            else "there is no older complete checkpoint; overwrite=true starts the run over"
        )
        first = str(e).splitlines()[0] if str(e) else ""
        raise SftError(
            f"checkpoint {folder} cannot be loaded ({type(e).__name__}: {first}); {way_out}"
        ) from None
    data.load_state_dict(state.get("data"))
    if plan.changes:  # allowed changes apply from here: the new hyperparameters and the new schedule
        for group, values in zip(optimizer.param_groups, new_values, strict=True):
            group.update(values)
        _fast_forward(scheduler, state["step"])
    else:
        scheduler.load_state_dict(state["scheduler"])
    return state


def announce(text: str) -> None:
    """Print on rank 0 (before the run's console exists)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"[sft] {text}", flush=True)


def _fast_forward(scheduler: Any, step: int) -> None:
    """Put a LambdaLR schedule (transformers' schedules) at `step` with its own base rates and length."""
    scheduler.last_epoch = step
    lrs = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = lrs


def _exact_safe(key: str, recipe: Recipe) -> bool:
    if _matches(key, EXACT_SAFE):
        return True
    # A constant schedule without a warmup share does not depend on the run's length.
    o = recipe.optim
    return key in LENGTH_KEYS and o.scheduler == "constant" and o.warmup_ratio == 0


def _matches(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _short(v: Any) -> str:
    text = json.dumps(v) if not isinstance(v, str) else v
    return text if len(text) <= 40 else text[:37] + "..."


def _shown(changes: dict[str, tuple[Any, Any]]) -> dict[str, list[Any]]:
    return {k: [a, b] for k, (a, b) in changes.items()}


def _listed(changes: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(
        f"{k} {_short(a)} -> {_short(b)}"
        if not k.endswith(" content")
        else f"the content of {k.removesuffix(' content')}"
        for k, (a, b) in changes.items()
    )


def _saved_step(folder: Path) -> int:
    return int(json.loads((folder / STATE_FILE).read_text()).get("step", 0))
