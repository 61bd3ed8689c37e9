"""The recipe: one YAML file, typed and validated before anything heavy is imported or launched.

A recipe is loaded from YAML, dotted `key=value` overrides are applied on top, and the result is validated
into `Recipe`. Every problem becomes one `SftError` line that names the key and the fix.
No torch import here (DESIGN invariant 8).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sft.errors import SftError

T = TypeVar("T")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    name: str = Field("builtin:smollm2-135m-instruct", min_length=1)
    """`builtin:NAME`, a local Hugging Face folder, or a hub id (the only case that reaches the network)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """dtype of the weights as loaded; `train.precision` decides the compute."""
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2", "flash_attention_3"] = "auto"
    """auto: flash attention 3 or 2 on a GPU where installed and supported, else sdpa, else eager (Gemma 2);
    the choice is printed at the start of training. An explicit one the model refuses is an error."""
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    revision: str | None = None


class LoraConfig(Section):
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    """0 (peft's default): dropout > 0 draws a mask and keeps a dropped copy of the input for every adapted
    layer, a third of a LoRA step's time on CPU (BENCHMARKS.md, issue 13); set it where the data is small."""
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    use_rslora: bool = False
    use_dora: bool = False
    modules_to_save: list[str] = Field(default_factory=list)


class QuantConfig(Section):
    """4-bit base weights for method=qlora (bitsandbytes); the LoRA adapters stay in float32."""

    quant_type: Literal["nf4", "fp4"] = "nf4"
    """nf4 (NormalFloat, the QLoRA paper's choice for normally distributed weights) or fp4."""
    double_quant: bool = True
    """Quantize the per-block scales too (about 0.4 bits per weight saved)."""
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """dtype the 4-bit weights are dequantized to for each matmul."""
    storage_dtype: Literal["uint8", "bfloat16", "float16", "float32"] = "uint8"
    """Tensor dtype the packed 4-bit values are stored in; FSDP2 can shard only float storage (set it to
    model.dtype there), the values and the memory are the same."""


TrainOn = Literal["assistant", "last_assistant", "all"]
DATA_FIELDS = (
    "messages", "role", "content", "conversations", "from", "value",
    "instruction", "input", "output", "prompt", "completion", "text", "system", "reasoning_content",
)  # fmt: skip


class DataSource(Section):
    path: str = Field(min_length=1)
    """A local file or glob (.jsonl, .json, .parquet, .csv), a folder written by `datasets`' save_to_disk,
    `hub:ORG/NAME` (a hub data set: reaches the network), or `builtin:NAME/SPLIT` (data shipped with sft)."""
    format: Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text"] = "auto"
    """`auto` picks the format from the first row's fields."""
    columns: dict[str, str] = Field(default_factory=dict)
    """Our field name -> the data's field name, e.g. {messages: dialog, role: speaker, text: body}."""
    system_prompt: str | None = None
    """Put first in every conversation that has no system turn of its own."""
    train_on: TrainOn | None = None
    """Overrides data.train_on for this source."""
    weight: float | None = Field(None, gt=0)
    """Mixture weight: set it on every train source (proportional sampling) or on none (concatenation)."""
    split: str = "train"
    """The split of a hub data set or of a saved DatasetDict."""
    subset: str | None = None
    """The configuration name of a hub data set."""
    revision: str | None = None
    """A hub data set's revision (branch, tag or commit)."""

    @field_validator("columns")
    @classmethod
    def _known_fields(cls, v: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(v) - set(DATA_FIELDS))
        if unknown:
            raise ValueError(f"unknown field {unknown[0]!r} in columns; map one of: {', '.join(DATA_FIELDS)}")
        return v

    @model_validator(mode="after")
    def _system_prompt_needs_chat(self) -> DataSource:
        if self.system_prompt is not None and self.format == "text":
            raise ValueError("system_prompt applies to conversations, not to format=text")
        return self


class DataConfig(Section):
    train: list[DataSource] = Field(default_factory=lambda: [DataSource(path="builtin:jargon/train")])
    eval: list[DataSource] = Field(default_factory=lambda: [DataSource(path="builtin:jargon/eval")])
    max_seq_len: int = Field(512, gt=8)
    train_on: TrainOn = "assistant"
    """Which tokens of a conversation carry the loss; raw text always trains every token."""
    on_overflow: Literal["truncate", "drop", "split"] = "truncate"
    """A sample longer than max_seq_len is cut, dropped, or split into chunks (counted in the statistics)."""
    split_overlap: int = Field(0, ge=0)
    """With on_overflow=split: tokens each chunk repeats from the previous one as context (not trained twice)."""
    on_bad_row: Literal["error", "skip"] = "error"
    """A malformed row stops the run naming file and row, or is skipped and counted."""
    packing: bool = False
    """Put several samples in each row of up to max_seq_len tokens; samples never attend to each other."""
    packing_mode: Literal["rows", "batch"] = "rows"
    """rows: fill rows from the epoch's samples, and train.micro_batch_size counts rows (least padding);
    batch: each step keeps an unpacked run's samples (micro_batch_size counts samples), packed among themselves."""
    packing_window: int = Field(2048, gt=0)
    """With packing_mode=rows: samples packed together at a time (more fill rows better, fewer keep the
    shuffled order closer)."""
    shuffle: bool = True
    streaming: bool = False
    """Read training rows as a stream instead of tokenizing all first (needs train.max_steps)."""
    epoch_size: int | None = Field(None, gt=0)
    """Samples per epoch of a weighted mixture; default the sum of all sources."""
    add_eos: bool = True
    """End every raw text and plain completion with the tokenizer's end-of-sequence token."""
    reasoning: Literal["keep", "drop"] = "keep"
    """Reasoning of assistant turns (`reasoning_content`, or <think>...</think> in the content): keep = rendered
    and trained in every turn, also where the chat template leaves it out of history turns; drop = whatever the
    template does (docs/data.md lists which families drop it)."""
    system_role: Literal["keep", "merge"] = "keep"
    """keep: system turns go to the template as they are; merge: folded into the first user turn (for templates
    that refuse a system role, such as Gemma 2's)."""
    max_untrained_share: float = Field(0.1, ge=0, le=1)
    """With on_bad_row=skip: the share of a source's rows that may give no trained token (cut by truncation,
    an empty answer) before loading stops with an error."""
    cache: bool = True
    """Keep tokenized data on disk under $SFT_CACHE/data (default ~/.cache/sft/data)."""

    @field_validator("train")
    @classmethod
    def _some_training_data(cls, v: list[DataSource]) -> list[DataSource]:
        if not v:
            raise ValueError("name at least one training source, e.g. data.train=my_data.jsonl")
        return v

    @field_validator("train", "eval", mode="before")
    @classmethod
    def _paths_as_sources(cls, v: Any) -> Any:
        # `data.train=some.jsonl` on the command line is a convenience for one source.
        if isinstance(v, str):
            return [{"path": v}]
        if isinstance(v, list):
            return [{"path": x} if isinstance(x, str) else x for x in v]
        return v

    @model_validator(mode="after")
    def _consistent(self) -> DataConfig:
        if self.split_overlap >= self.max_seq_len // 2:
            raise ValueError(
                f"split_overlap ({self.split_overlap}) must be below half of max_seq_len ({self.max_seq_len})"
            )
        weighted = [s.weight is not None for s in self.train]
        if any(weighted) and not all(weighted):
            raise ValueError("set a weight on every data.train source (a weighted mixture) or on none")
        if any(s.weight is not None for s in self.eval):
            raise ValueError("weights apply to data.train; data.eval sources are always read whole")
        if self.epoch_size is not None and not any(weighted):
            raise ValueError("data.epoch_size applies to a weighted mixture; set weights on data.train")
        return self


class OptimConfig(Section):
    name: Literal["adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit"] = "adamw"
    """adamw: torch's; the others are bitsandbytes': 8-bit state (about 1/4 of the memory) and/or paged state
    (CUDA unified memory that moves to host RAM under memory pressure; ordinary memory on CPU)."""
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
    loss_impl: Literal["chunked", "full"] = "chunked"
    """chunked: cross entropy at trained positions only, the output head applied a chunk of tokens at a
    time (never the whole logits tensor); full: the logits of every position, then cross entropy."""
    peak_tflops: float | None = Field(None, gt=0)
    """Peak TFLOP/s of one device for the MFU metric; default: sft/gpus.py's table for the GPU (by name and
    precision), or a short matmul probe on a CPU."""
    compile: bool = False
    """torch.compile each decoder layer (single and fsdp2); the first step includes the compilation."""
    activation_offload: bool = False
    """GPU runs: keep the activations saved for the backward in CPU memory (best with
    model.gradient_checkpointing, which saves only each layer's input)."""

    # The global batch, in one place: a step trains micro_batch_size x grad_accum units (samples, or packed rows)
    # on each of the processes, and every split of the same global batch trains the same units.
    def global_batch(self, world_size: int = 1) -> int:
        """Units of one optimizer step over `world_size` processes (1: one process's share)."""
        return self.micro_batch_size * self.grad_accum * world_size

    def rank_share(self, units: list[T], world_size: int = 1, rank: int = 0) -> list[list[T]]:
        """One process's micro-batches of a step's global batch: micro-batch a of rank r is the
        (a x world + r)-th slice of micro_batch_size units, so ranks are disjoint and the global batch is
        split the same way for any accumulation."""
        m, w = self.micro_batch_size, world_size
        return [units[(a * w + rank) * m : (a * w + rank + 1) * m] for a in range(self.grad_accum)]


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
    plots: bool = True
    """Draw plots/*.png (loss, learning rate, throughput, memory) at each evaluation and at the end."""
    wandb: WandbConfig = Field(default_factory=WandbConfig)


class FsdpConfig(Section):
    """PyTorch FSDP2 (`fully_shard` per decoder layer and the root)."""

    param_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """dtype of the gathered weights used for compute; auto: bfloat16 when train.precision=bf16."""
    reduce_dtype: Literal["float32", "bfloat16"] = "float32"
    """dtype of the gradient reduce-scatter; float32 keeps the sum over ranks exact enough for parity."""
    cpu_offload: bool = False
    """Keep sharded weights, gradients and optimizer state in CPU memory (GPU runs; slower, much less memory)."""
    reshard_after_forward: bool = True
    """Free each layer's gathered weights after its forward (ZeRO-3 like); false keeps them for the
    backward (ZeRO-2 like: more memory, one all-gather fewer per layer)."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward instead of storing them."""
    sync_every_micro_batch: bool = False
    """With grad_accum > 1: false accumulates unsharded gradients and reduce-scatters once per step (less
    communication, a full gradient copy per rank between micro-batches); true reduce-scatters after every
    micro-batch (gradients stay sharded: least memory, for models whose full gradients do not fit)."""


class DeepSpeedConfig(Section):
    """DeepSpeed ZeRO. The JSON config's "auto" values are filled from this recipe."""

    zero_stage: Literal[1, 2, 3] = 2
    """1: shard optimizer state; 2: + gradients; 3: + parameters."""
    offload_optimizer: bool = False
    """Optimizer state and step on the CPU (DeepSpeedCPUAdam; compiles a C++ op once)."""
    offload_params: bool = False
    """Parameters on the CPU between uses (ZeRO-3 only)."""
    config: str | None = None
    """Your own DeepSpeed JSON; default ds_configs/zero{1,2,3}.json or zero3_offload.json. Its values must be
    "auto" or agree with the recipe (batch sizes, accumulation, clipping, precision, optimizer)."""


class StrategyConfig(Section):
    name: Literal["single", "fsdp2", "deepspeed"] = "single"
    """single: one process, plain PyTorch; fsdp2: PyTorch FSDP2; deepspeed: DeepSpeed ZeRO 1/2/3."""
    fsdp: FsdpConfig = Field(default_factory=FsdpConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)


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
    job_name: str | None = None
    """Slurm job name; default `sft-<last part of output_dir>`."""
    python: str | None = None
    """Python on the compute nodes; default the one running `sft launch` (same venv on a shared filesystem)."""
    rdzv_endpoint: str | None = None
    """host:port of the first box, for `--backend torchrun` across several boxes without Slurm."""

    @field_validator("time", "mem", mode="before")
    @classmethod
    def _number_as_text(cls, v: Any) -> Any:
        # `time: 90` (minutes) and `mem: 0` (all of the node's memory) are valid Slurm values as numbers too.
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v


class Recipe(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    method: Literal["full", "lora", "qlora"] = "lora"
    """qlora: LoRA adapters over a frozen base loaded in 4-bit (the `quant` section)."""
    lora: LoraConfig = Field(default_factory=LoraConfig)
    quant: QuantConfig = Field(default_factory=QuantConfig)
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
    """The run's own folder. sft deletes a folder only when it made it (the `.sft-run` marker inside)."""
    resume: bool | Literal["auto"] = False
    """true: continue from `output_dir/checkpoints/latest` (an error when there is no checkpoint);
    auto: continue when there is a checkpoint, else start (what `sft launch` and requeued jobs use)."""
    resume_changes: Literal["refuse", "allow"] = "refuse"
    """A resume whose recipe or data differ from the checkpoint's in ways that change the run is refused;
    `allow` continues with the new values and records what changed."""
    overwrite: bool = False
    """Replace an earlier run in `output_dir` (otherwise that is an error, unless resuming)."""

    @field_validator("resume", mode="before")
    @classmethod
    def _resume_choice(cls, v: Any) -> Any:
        if isinstance(v, bool) or v == "auto":
            return v
        if isinstance(v, str) and v.lower() in ("true", "false"):
            return v.lower() == "true"
        raise ValueError("use false, true or auto")

    @field_validator("output_dir")
    @classmethod
    def _named_output_dir(cls, v: str) -> str:
        if not v.strip():
            raise ValueError(
                "is empty (an unset variable?); name the run's folder, e.g. output_dir=runs/my-run"
            )
        return v

    @field_validator("model", mode="before")
    @classmethod
    def _model_as_name(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _combinations(self) -> Recipe:
        """Options that cannot work together, caught before anything is loaded or launched."""
        if self.model.attn_implementation.startswith("flash") and self.train.device == "cpu":
            raise ValueError(
                f"model.attn_implementation={self.model.attn_implementation} needs a GPU; use auto or sdpa on CPU"
            )
        if self.train.precision == "bf16" and self.model.dtype == "float16":
            raise ValueError(
                "train.precision=bf16 with model.dtype=float16 mixes two half types; use float32"
            )
        if self.method == "full" and self.model.dtype != "float32" and self.train.precision == "fp32":
            raise ValueError(
                f"method=full with model.dtype={self.model.dtype} trains half-precision weights without mixed "
                "precision; set model.dtype=float32 (optionally with train.precision=bf16)"
            )
        if self.train.activation_offload and self.train.device == "cpu":
            raise ValueError(
                "train.activation_offload=true moves activations from the GPU to CPU memory; with train.device=cpu "
                "there is nothing to move (use model.gradient_checkpointing to save activation memory on a CPU)"
            )
        if self.resume is not False and self.overwrite:
            raise ValueError(
                f"resume={str(self.resume).lower()} and overwrite=true contradict each other; pick one"
            )
        if self.method == "full" and self.lora != LoraConfig():
            raise ValueError(
                "the lora section applies to method=lora or qlora, but method=full trains every weight; "
                "remove the lora settings or set method=lora"
            )
        self._length_combinations()
        self._qlora_combinations()
        self._strategy_combinations()
        return self

    def _length_combinations(self) -> None:
        t = self.train
        if t.max_steps is not None and t.epochs != 1:
            raise ValueError(
                f"train.max_steps={t.max_steps} and train.epochs={t.epochs} both set the run's length; "
                "keep one (max_steps counts optimizer steps)"
            )
        if self.data.streaming and t.max_steps is None:
            raise ValueError("data.streaming=true needs train.max_steps: a stream has no known length")

    def _qlora_combinations(self) -> None:
        """4-bit base weights and bitsandbytes optimizers: what cannot work, and why (issue 5)."""
        s, q = self.strategy, self.quant
        if self.method != "qlora" and q != QuantConfig():
            raise ValueError(
                f"the quant section applies to method=qlora (got method={self.method}); "
                "set method=qlora or remove the quant settings"
            )
        half_base = self.model.dtype != "float32" and self.train.precision != "bf16"
        if self.method in ("lora", "qlora") and self.lora.modules_to_save and half_base:
            raise ValueError(
                f"lora.modules_to_save trains full copies of {self.lora.modules_to_save} in float32 while "
                f"model.dtype={self.model.dtype} keeps the rest in half precision; set train.precision=bf16 "
                "(autocast joins the two) or model.dtype=float32"
            )
        if self.method == "qlora":
            self._qlora_only()
        if self.optim.name != "adamw" and s.name == "deepspeed":
            raise ValueError(
                f"optim.name={self.optim.name} is a bitsandbytes optimizer, but DeepSpeed builds and partitions its "
                "own AdamW from the config (paged or 8-bit state cannot be partitioned by ZeRO); use optim.name=adamw"
            )
        if self.optim.name != "adamw" and s.name == "fsdp2":
            raise ValueError(
                f"optim.name={self.optim.name} is a bitsandbytes optimizer; its kernels update plain tensors, not "
                "the sharded DTensor parameters of FSDP2; use optim.name=adamw (FSDP2 shards its state already)"
            )

    def _qlora_only(self) -> None:
        s, q = self.strategy, self.quant
        autocast = "bfloat16" if self.train.precision == "bf16" else "float32"
        halves = {
            f"model.dtype={self.model.dtype}": self.model.dtype,
            f"quant.compute_dtype={q.compute_dtype}": q.compute_dtype,
            f"train.precision={self.train.precision}": autocast,
        }
        mixed = {k: v for k, v in halves.items() if v != "float32"}
        if len(set(mixed.values())) > 1:
            raise ValueError(
                f"method=qlora with {' and '.join(mixed)} mixes two half types; use one of bfloat16 or float16 "
                "throughout (or float32)"
            )
        if s.name == "deepspeed":
            why = (
                "ZeRO-3 partitions every parameter, which breaks bitsandbytes' packed 4-bit weights and their "
                "quantization state"
                if s.deepspeed.zero_stage == 3
                else f"ZeRO-{s.deepspeed.zero_stage} would shard only the small adapters' optimizer state"
            )
            raise ValueError(
                f"method=qlora is not supported under strategy.name=deepspeed: {why}; use strategy.name=fsdp2 "
                "(FSDP-QLoRA) or single"
            )
        if s.name == "fsdp2":
            if q.storage_dtype != self.model.dtype:
                raise ValueError(
                    f"method=qlora under fsdp2 needs quant.storage_dtype={self.model.dtype} (= model.dtype): FSDP2 "
                    f"shards float tensors of one dtype, and quant.storage_dtype={q.storage_dtype} is not"
                )
            if s.fsdp.param_dtype not in ("auto", q.storage_dtype):
                raise ValueError(
                    f"method=qlora under fsdp2 gathers the packed 4-bit weights as stored ({q.storage_dtype}); "
                    f"strategy.fsdp.param_dtype={s.fsdp.param_dtype} would cast their bytes into other numbers; "
                    "use param_dtype=auto (train.precision sets the compute dtype)"
                )
            if self.lora.use_dora:
                raise ValueError(
                    "lora.use_dora with method=qlora under fsdp2: peft's DoRA dequantizes each whole 4-bit weight, "
                    "which FSDP2 holds sharded across ranks; use plain LoRA or strategy.name=single"
                )

    def _strategy_combinations(self) -> None:
        s = self.strategy
        if s.name == "fsdp2":
            if s.fsdp.activation_checkpointing and self.model.gradient_checkpointing:
                raise ValueError(
                    "strategy.fsdp.activation_checkpointing and model.gradient_checkpointing both recompute "
                    "activations; keep one (the fsdp one wraps each decoder layer)"
                )
            if s.fsdp.param_dtype == "bfloat16" and self.train.precision == "fp32":
                raise ValueError(
                    "strategy.fsdp.param_dtype=bfloat16 computes in bf16 but train.precision=fp32; "
                    "set train.precision=bf16 (or param_dtype=auto)"
                )
        if s.name == "deepspeed":
            if self.train.compile:
                raise ValueError(
                    "train.compile=true is not supported under strategy.name=deepspeed (ZeRO's parameter "
                    "hooks run inside each layer's call); use strategy.name=fsdp2 or single, or train.compile=false"
                )
            if s.deepspeed.offload_params and s.deepspeed.zero_stage != 3:
                raise ValueError(
                    f"strategy.deepspeed.offload_params needs zero_stage=3 (got {s.deepspeed.zero_stage})"
                )
            from sft.ds_config import check_against_recipe

            check_against_recipe(self)  # a user JSON that contradicts the recipe fails here, before launch

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def warmup_warnings(optim: OptimConfig, total_steps: int) -> list[str]:
    """A warmup that does not end before the run does (the lr never reaches optim.lr). Said, not refused: a
    short trial of a longer recipe (`train.max_steps=2`) is a normal thing to do."""
    if optim.warmup_steps < total_steps:
        return []
    return [
        f"warning: optim.warmup_steps={optim.warmup_steps} is not below the run's {total_steps} steps, so the "
        "learning rate never reaches optim.lr; fine for a short trial, otherwise lower optim.warmup_steps"
    ]


# ---------------------------------------------------------------- loading, overrides, errors


def load_recipe(path: str | Path | None, overrides: list[str] = ()) -> Recipe:  # type: ignore[assignment]
    """Read a YAML recipe (or start from defaults), apply `a.b=c` overrides, validate."""
    where = str(path) if path else "recipe"
    raw: dict[str, Any] = {}
    if path is not None:
        raw = read_yaml_mapping(
            Path(path), "recipe file", "a recipe is a mapping of sections (model:, data:, train: ...)"
        )
    for item in overrides:
        apply_override(raw, item)
    return validate_recipe(raw, where)


def read_yaml_mapping(path: Path, what: str, shape: str) -> dict[str, Any]:
    """Load a YAML file that must hold a mapping; every problem is one SftError naming the file (and line)."""
    if not path.is_file():
        raise SftError(f"{path}: {what} not found" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SftError(f"{path}: not a text file (not UTF-8 at byte {e.start}); {shape}") from None
    try:
        loaded = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except DuplicateKeyError as e:
        raise SftError(f"{path}: line {e.line}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}: line {mark.line + 1}" if mark else str(path)
        problem = str(getattr(e, "problem", None) or e).splitlines()[0]
        raise SftError(f"{where} is not valid YAML ({problem})") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise SftError(f"{path}: {shape}")
    return loaded or {}


class DuplicateKeyError(yaml.YAMLError):
    def __init__(self, key: Any, line: int, first_line: int) -> None:
        super().__init__(
            f"key '{key}' is given twice (also on line {first_line}); the second would silently replace the "
            "first, so merge them into one"
        )
        self.line = line


class _UniqueKeyLoader(yaml.SafeLoader):
    """The safe YAML loader, refusing a mapping that repeats a key (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen and key != "<<":
                raise DuplicateKeyError(key, line, seen[key])
            seen.setdefault(key, line)
        return super().construct_mapping(node, deep=deep)


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
        raise SftError(describe_validation_error(e, where, Recipe)) from None


def describe_validation_error(e: ValidationError, where: str, root: type[BaseModel]) -> str:
    """One line for the first problem: the dotted key, what is wrong, and the closest valid key."""
    err = e.errors()[0]
    loc = [str(x) for x in err["loc"]]
    key = ".".join(loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        valid = list(_section_model(root, loc[:-1]).model_fields)
        close = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.5)
        hint = (
            f"did you mean '{'.'.join([*loc[:-1], close[0]])}'?"
            if close
            else f"valid keys: {', '.join(valid)}"
        )
        return f"{where}: unknown key '{key}'; {hint}"
    if err["type"] == "missing":
        return f"{where}: '{key}' is required"
    msg = err["msg"].removeprefix("Value error, ")
    if not loc:  # a check across sections: the message names its keys
        return f"{where}: {msg}"
    got = err.get("input")
    shown = "" if isinstance(got, dict) or got is None else f" (got {got!r})"
    return f"{where}: {key}: {msg}{shown}"


def _section_model(root: type[BaseModel], path: list[str]) -> type[BaseModel]:
    """The section (model class) a dotted key path leads to; list indices are skipped."""
    model = root
    for part in path:
        if part.isdigit():
            continue
        ann = getattr(model.model_fields.get(part), "annotation", None)
        inner = [a for a in (ann, *get_args(ann)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not inner:
            break
        model = inner[0]
    return model
