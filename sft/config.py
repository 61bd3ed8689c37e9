"""The recipe: one YAML file, typed and validated before anything heavy is imported or launched.

A recipe is loaded from YAML, dotted `key=value` overrides are applied on top, and the result is validated
into `Recipe`. Every problem becomes one `SftError` line that names the key and the fix.
No torch import here (DESIGN invariant 8).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sft.errors import SftError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    name: str = "builtin:smollm2-135m-instruct"
    """`builtin:NAME`, a local Hugging Face folder, or a hub id (the only case that reaches the network)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """dtype of the weights as loaded; `train.precision` decides the compute."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    revision: str | None = None


class LoraConfig(Section):
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    use_rslora: bool = False
    use_dora: bool = False
    modules_to_save: list[str] = Field(default_factory=list)


class DataSource(Section):
    path: str
    """A JSONL file, or `builtin:NAME/SPLIT` for data shipped with sft."""
    format: Literal["messages"] = "messages"


class DataConfig(Section):
    train: list[DataSource] = Field(default_factory=lambda: [DataSource(path="builtin:jargon/train")])
    eval: list[DataSource] = Field(default_factory=lambda: [DataSource(path="builtin:jargon/eval")])
    max_seq_len: int = Field(512, gt=8)
    train_on: Literal["assistant"] = "assistant"
    on_overflow: Literal["truncate", "drop"] = "truncate"
    shuffle: bool = True

    @field_validator("train", "eval", mode="before")
    @classmethod
    def _paths_as_sources(cls, v: Any) -> Any:
        # `data.train=some.jsonl` on the command line is a convenience for one source.
        if isinstance(v, str):
            return [{"path": v}]
        if isinstance(v, list):
            return [{"path": x} if isinstance(x, str) else x for x in v]
        return v


class OptimConfig(Section):
    name: Literal["adamw"] = "adamw"
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    max_grad_norm: float | None = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _one_warmup(self) -> OptimConfig:
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError("set optim.warmup_steps or optim.warmup_ratio, not both")
        return self


class TrainConfig(Section):
    micro_batch_size: int = Field(4, gt=0)
    grad_accum: int = Field(1, gt=0)
    max_steps: int | None = Field(None, gt=0)
    """Optimizer steps to run; when unset, `epochs` passes over the training data."""
    epochs: int = Field(1, gt=0)
    precision: Literal["fp32", "bf16"] = "fp32"
    """fp32, or bf16 autocast over fp32 weights (mixed precision)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"


class EvalConfig(Section):
    every: int | None = Field(None, gt=0)
    """Evaluate every N optimizer steps (and always at the end); unset: only before and after training."""
    max_batches: int | None = Field(None, gt=0)
    batch_size: int = Field(8, gt=0)
    prompts: list[str] = Field(default_factory=list)
    """Fixed prompts answered before and after training (greedy), printed and saved."""
    max_new_tokens: int = Field(48, gt=0)


class CheckpointConfig(Section):
    every: int | None = Field(None, gt=0)
    """Save a resumable checkpoint every N optimizer steps (and at the end)."""
    keep: int = Field(2, gt=0)


class WandbConfig(Section):
    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "sft"
    entity: str | None = None
    name: str | None = None
    tags: list[str] = Field(default_factory=list)


class LoggingConfig(Section):
    every: int = Field(1, gt=0)
    progress: bool = True
    wandb: WandbConfig = Field(default_factory=WandbConfig)


class StrategyConfig(Section):
    name: Literal["single"] = "single"


class LaunchConfig(Section):
    """Where the job runs; only `sft launch` reads this, the training code never does."""

    nodes: int = Field(1, gt=0)
    procs_per_node: int = Field(1, gt=0)
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | None = None
    cpus_per_task: int | None = Field(None, gt=0)
    mem: str | None = None
    gpus_per_node: int | None = Field(None, ge=0)
    sbatch_extra: list[str] = Field(default_factory=list)
    setup: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    signal_seconds: int = Field(90, gt=0)
    requeue: bool = True


class Recipe(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    method: Literal["full", "lora"] = "lora"
    lora: LoraConfig = Field(default_factory=LoraConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    strategy: StrategyConfig = Field(default_factory=StrategyConfig)
    launch: LaunchConfig = Field(default_factory=LaunchConfig)
    seed: int = 0
    output_dir: str = "runs/default"
    resume: bool = False
    """Continue from `output_dir/checkpoints/latest` when it exists."""
    overwrite: bool = False
    """Replace an earlier run in `output_dir` (otherwise that is an error, unless resuming)."""

    @field_validator("model", mode="before")
    @classmethod
    def _model_as_name(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _combinations(self) -> Recipe:
        """Options that cannot work together, caught before anything is loaded or launched."""
        if self.model.attn_implementation == "flash_attention_2" and self.train.device == "cpu":
            raise ValueError("model.attn_implementation=flash_attention_2 needs a GPU; use sdpa on CPU")
        if self.train.precision == "bf16" and self.model.dtype == "float16":
            raise ValueError(
                "train.precision=bf16 with model.dtype=float16 mixes two half types; use float32"
            )
        if self.method == "full" and self.model.dtype != "float32" and self.train.precision == "fp32":
            raise ValueError(
                f"method=full with model.dtype={self.model.dtype} trains half-precision weights without mixed "
                "precision; set model.dtype=float32 (optionally with train.precision=bf16)"
            )
        if self.resume and self.overwrite:
            raise ValueError("resume=true and overwrite=true contradict each other; pick one")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ---------------------------------------------------------------- loading, overrides, errors


def load_recipe(path: str | Path | None, overrides: list[str] = ()) -> Recipe:  # type: ignore[assignment]
    """Read a YAML recipe (or start from defaults), apply `a.b=c` overrides, validate."""
    where = str(path) if path else "recipe"
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise SftError(f"{p}: recipe file not found")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f" line {mark.line + 1}" if mark else ""
            raise SftError(f"{p}:{line} is not valid YAML ({getattr(e, 'problem', e)})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise SftError(f"{p}: a recipe is a mapping of sections (model:, data:, train: ...)")
        raw = loaded or {}
    for item in overrides:
        apply_override(raw, item)
    return validate_recipe(raw, where)


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one `a.b.c=value` override; the value is parsed as YAML (so 3, 1e-4, true, [a, b] work)."""
    if "=" not in item:
        raise SftError(f"override '{item}': expected key=value, for example train.max_steps=20")
    key, _, text = item.partition("=")
    key = key.strip()
    if not key:
        raise SftError(f"override '{item}': the key is empty")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if isinstance(child, str) and part == "model":
            child = {"name": child}  # `model: NAME` shorthand, then model.dtype=...
        if child is None:
            child = {}
        if not isinstance(child, dict):
            raise SftError(f"override '{item}': '{part}' is a value, not a section")
        node[part] = child
        node = child
    node[parts[-1]] = value


def validate_recipe(raw: dict[str, Any], where: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        raise SftError(_describe(e, where)) from None


def _describe(e: ValidationError, where: str) -> str:
    """One line for the first problem: the dotted key, what is wrong, and the closest valid key."""
    err = e.errors()[0]
    loc = [str(x) for x in err["loc"]]
    key = ".".join(loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        model: type[BaseModel] = Recipe
        for part in loc[:-1]:
            field = model.model_fields.get(part)
            ann = getattr(field, "annotation", None)
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                model = ann
            else:
                break
        valid = list(model.model_fields)
        close = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.5)
        hint = (
            f"did you mean '{'.'.join([*loc[:-1], close[0]])}'?"
            if close
            else f"valid keys: {', '.join(valid)}"
        )
        return f"{where}: unknown key '{key}'; {hint}"
    msg = err["msg"].removeprefix("Value error, ")
    if not loc:  # a check across sections: the message names its keys
        return f"{where}: {msg}"
    got = err.get("input")
    shown = "" if isinstance(got, dict) or got is None else f" (got {got!r})"
    return f"{where}: {key}: {msg}{shown}"
