"""The bad-input corpus: the ways a recipe, an override, a data row, a file, a path or a resume can be wrong.

Each case is run through `sft train` in a folder of its own (the tiny model, a small good data file and a
good recipe, then the one mistake). The contract (DESIGN invariant 9): exit code 2, exactly one line on
stderr naming the file, row or key (`names`) and saying what to do (`says`), no traceback, and nothing
written. tests/test_bad_inputs.py runs every case; `python -m tests.bad_inputs [MODEL_DIR] [--write-doc]` counts how
many keep the contract (with a MODEL_DIR, also against an older checkout: it needs only `sft.cli.main`), and
`--write-doc` writes docs/errors.md from what the cases print.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "errors.md"

GOOD = {
    "messages": [{"role": "user", "content": "What is a kluge?"}, {"role": "assistant", "content": "A hack."}]
}


ALPACA = {"instruction": "i", "output": "o"}
SHAREGPT = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}


def jsonl(*rows: Any) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def chat(*turns: tuple[str, Any]) -> dict[str, Any]:
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


BASE_RECIPE = """\
model: {model}
method: lora
data:
  train: good.jsonl
  eval: []
  max_seq_len: 64
train:
  micro_batch_size: 2
  max_steps: 1
  device: cpu
logging:
  wandb:
    mode: disabled
  progress: false
output_dir: out
"""


@dataclass
class Case:
    id: str
    group: str  # recipe | override | data | file | model | output | resume | combination | environment
    what: str  # the mistake, in words (docs/errors.md)
    args: list[str]  # overrides after the recipe
    names: str  # the file, row or key the message must name
    says: str  # a fragment of the message: what is wrong or what to do
    files: dict[str, str | bytes] = field(default_factory=dict)
    recipe: str | None = None  # the recipe's text; default BASE_RECIPE
    recipe_at: str = "r.yaml"  # where the recipe is written (None of it when `write_recipe` is false)
    write_recipe: bool = True
    setup: Callable[[Path, Path], None] | None = None  # (case folder, tiny model folder)
    sandbox: str | None = None  # "read-only" | "tiny-disk": run in a subprocess with a private mount


# ---------------------------------------------------------------- set-ups


def copy_model(name: str, change: Callable[[Path], None] | None = None) -> Callable[[Path, Path], None]:
    def setup(folder: Path, model: Path) -> None:
        target = folder / name
        shutil.copytree(model, target)
        if change is not None:
            change(target)

    return setup


def truncate(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def earlier_run(
    state: dict[str, Any] | None = None, recipe_overrides: tuple[str, ...] = (), checkpoint: bool = True
) -> Callable[[Path, Path], None]:
    """An earlier run of this recipe in `out/` with a checkpoint at step 1 (its files only as far as a resume
    reads them before loading weights)."""

    def setup(folder: Path, model: Path) -> None:
        from sft.config import load_recipe

        with contextlib.chdir(folder):
            saved = load_recipe("r.yaml", list(recipe_overrides)).to_yaml()
        out = folder / "out"
        out.mkdir()
        (out / ".sft-run").touch()
        (out / "recipe.yaml").write_text(saved)
        if checkpoint:
            ckpt = out / "checkpoints" / "step-0000001"
            ckpt.mkdir(parents=True)
            (ckpt / "recipe.yaml").write_text(saved)
            (ckpt / "trainer_state.json").write_text(
                json.dumps({"step": 1, "total_steps": 1, **(state or {})})
            )
            (out / "checkpoints" / "latest").write_text(ckpt.name + "\n")

    return setup


def finished_without_checkpoints(folder: Path, model: Path) -> None:
    out = folder / "out"
    (out / "final").mkdir(parents=True)
    (out / ".sft-run").touch()
    (out / "recipe.yaml").write_text("x: 1\n")


def make_dirs(*names: str) -> Callable[[Path, Path], None]:
    def setup(folder: Path, model: Path) -> None:
        for n in names:
            (folder / n).mkdir(parents=True, exist_ok=True)

    return setup


def dupe_yaml(key_block: str) -> str:
    return BASE_RECIPE + key_block


# ---------------------------------------------------------------- the cases

BAD = ["data.train=bad.jsonl"]


def row_case(id: str, what: str, row: Any, says: str, fmt: str | None = None, line: int = 2) -> Case:
    args = [*BAD, *([f"data.train=[{{path: bad.jsonl, format: {fmt}}}]"] if fmt else [])]
    return Case(id, "data", what, args, f"bad.jsonl:{line}", says, files={"bad.jsonl": jsonl(GOOD, row)})


# fmt: off
CASES: list[Case] = [
    # -- the recipe file
    Case("recipe-missing", "recipe", "the recipe file does not exist", [], "nope.yaml", "not found",
        recipe_at="nope.yaml", write_recipe=False),
    Case("recipe-folder", "recipe", "the recipe path is a folder", [], "adir", "not found", recipe_at="adir",
        write_recipe=False, setup=make_dirs("adir")),
    Case("yaml-syntax", "recipe", "YAML syntax error (unclosed bracket)", [], "r.yaml: line", "not valid YAML",
        recipe="train: {max_steps: [1,\n"),
    Case("yaml-tab", "recipe", "a tab used for indentation", [], "r.yaml: line", "not valid YAML",
        recipe="train:\n\tmax_steps: 1\n"),
    Case("yaml-list", "recipe", "the recipe is a list, not a mapping", [], "r.yaml", "mapping of sections",
        recipe="- model\n- data\n"),
    Case("yaml-scalar", "recipe", "the recipe is a plain string", [], "r.yaml", "mapping of sections",
        recipe="just some text\n"),
    Case("yaml-binary", "recipe", "the recipe is not a text file", [], "r.yaml", "not UTF-8", write_recipe=False,
        files={"r.yaml": b"\xff\xfe\x00\x01"}),
    Case("yaml-control-char", "recipe", "a control character in the recipe", [], "r.yaml", "not valid YAML",
        recipe="train:\n  max_steps: 1\x00\n"),
    Case("dup-section", "recipe", "a section given twice (the second replaced the first)", [], "key 'train'",
        "given twice", recipe=dupe_yaml("train:\n  micro_batch_size: 4\n")),
    Case("dup-nested", "recipe", "a key given twice inside a section", [], "key 'max_steps'", "given twice",
        recipe=BASE_RECIPE.replace("  max_steps: 1\n", "  max_steps: 1\n  max_steps: 5\n")),
    Case("unknown-section", "recipe", "a misspelt section", ["trian.max_steps=3"], "trian", "did you mean 'train'"),
    Case("unknown-key", "recipe", "a misspelt key", ["train.max_stepz=3"], "train.max_stepz",
        "did you mean 'train.max_steps'"),
    Case("unknown-key-far", "recipe", "a key that exists nowhere", ["checkpoint.colour=red"], "checkpoint.colour",
        "valid keys"),
    Case("section-scalar", "recipe", "a section given a value", ["train=5"], "train", "valid dictionary"),
    Case("type-int", "recipe", "text where a number belongs", ["train.max_steps=abc"], "train.max_steps",
        "valid integer"),
    Case("type-float-int", "recipe", "a fraction where a whole number belongs", ["train.max_steps=1.5"],
        "train.max_steps", "integer"),
    Case("negative-batch", "recipe", "a negative micro-batch size", ["train.micro_batch_size=-1"],
        "train.micro_batch_size", "greater than 0"),
    Case("zero-lr", "recipe", "a learning rate of zero", ["optim.lr=0"], "optim.lr", "greater than 0"),
    Case("negative-lr", "recipe", "a negative learning rate", ["optim.lr=-1e-4"], "optim.lr", "greater than 0"),
    Case("bad-method", "recipe", "a misspelt method", ["method=qlorra"], "method", "'full', 'lora' or 'qlora'"),
    Case("bad-precision", "recipe", "an unknown precision", ["train.precision=fp8"], "train.precision", "fp32"),
    Case("bad-scheduler", "recipe", "an unknown schedule", ["optim.scheduler=step"], "optim.scheduler", "cosine"),
    Case("bad-dropout", "recipe", "a LoRA dropout above 1", ["lora.dropout=1.5"], "lora.dropout", "less than 1"),
    Case("bad-betas", "recipe", "three Adam betas", ["optim.betas=[0.9,0.99,0.999]"], "optim.betas", "at most 2"),
    Case("bad-dtype", "recipe", "an unknown model dtype", ["model.dtype=float64"], "model.dtype", "float32"),
    Case("bad-targets", "recipe", "LoRA target modules given as a number", ["lora.target_modules=5"],
        "lora.target_modules", "valid list"),
    Case("bad-eval-every", "recipe", "evaluation every 0 steps", ["eval.every=0"], "eval.every", "greater than 0"),
    Case("bad-keep", "recipe", "keep 0 checkpoints", ["checkpoint.keep=0"], "checkpoint.keep", "greater than 0"),
    Case("bad-device", "recipe", "an unknown device", ["train.device=tpu"], "train.device", "'cpu'"),
    Case("bad-optimizer", "recipe", "an unknown optimizer", ["optim.name=sgd"], "optim.name", "adamw"),
    Case("bad-overflow", "recipe", "an unknown overflow policy", ["data.on_overflow=wrap"], "data.on_overflow",
        "truncate"),
    Case("short-seq", "recipe", "max_seq_len too small", ["data.max_seq_len=8"], "data.max_seq_len",
        "greater than 8"),
    Case("bad-resume", "recipe", "resume given a word it does not know", ["resume=maybe"], "resume",
        "false, true or auto"),
    Case("bad-resume-changes", "recipe", "an unknown resume_changes", ["resume_changes=sometimes"],
        "resume_changes", "'refuse' or 'allow'"),
    Case("bad-strategy", "recipe", "an unknown strategy", ["strategy.name=ddp"], "strategy.name", "fsdp2"),
    Case("bad-zero", "recipe", "ZeRO stage 4", ["strategy.name=deepspeed", "strategy.deepspeed.zero_stage=4"],
        "strategy.deepspeed.zero_stage", "1, 2 or 3"),
    Case("bad-wandb-mode", "recipe", "an unknown W&B mode", ["logging.wandb.mode=cloud"], "logging.wandb.mode",
        "offline"),
    Case("bad-launch-nodes", "recipe", "zero nodes", ["launch.nodes=0"], "launch.nodes", "greater than 0"),
    Case("source-no-path", "recipe", "a data source without a path", ["data.train=[{format: text}]"],
        "data.train.0.path", "required"),
    Case("source-unknown-key", "recipe", "a misspelt data source key",
        ["data.train=[{path: good.jsonl, fromat: text}]"], "data.train.0.fromat",
        "did you mean 'data.train.0.format'"),
    Case("source-bad-format", "recipe", "an unknown data format",
        ["data.train=[{path: good.jsonl, format: chatml}]"], "data.train.0.format", "'messages'"),
    Case("source-bad-columns", "recipe", "columns maps an unknown field",
        ["data.train=[{path: good.jsonl, columns: {msgs: dialog}}]"], "data.train.0.columns",
        "unknown field 'msgs'"),
    Case("source-weight-zero", "recipe", "a mixture weight of 0", ["data.train=[{path: good.jsonl, weight: 0}]"],
        "data.train.0.weight", "greater than 0"),
    # -- overrides on the command line
    Case("override-no-equals", "override", "an override without '='", ["train.max_steps"], "train.max_steps",
        "expected key=value"),
    Case("override-empty-key", "override", "an override with an empty key", ["=3"], "=3", "the key is empty"),
    Case("override-into-value", "override", "an override below a plain value", ["output_dir.x=1"], "output_dir",
        "is a value, not a section"),
    Case("override-empty-output", "override", "output_dir set from an unset variable", ["output_dir="],
        "output_dir", "is empty"),
    Case("override-empty-model", "override", "model.name set to nothing", ["model.name="], "model.name",
        "at least 1 character"),
    Case("override-empty-data", "override", "data.train set to nothing", ["data.train="], "data.train.0.path",
        "at least 1 character"),
    Case("override-no-data", "override", "data.train set to an empty list", ["data.train=[]"], "data.train",
        "at least one training source"),
    Case("override-yaml-list", "override", "a list where a number belongs", ["train.max_steps=[1,2]"],
        "train.max_steps", "valid integer"),
    Case("override-loss-impl", "override", "an unknown train.loss_impl", ["train.loss_impl=fused"],
        "train.loss_impl", "'chunked' or 'full'"),
    # -- contradictions between keys
    Case("lora-with-full", "combination", "lora settings with method=full", ["method=full", "lora.r=8"], "lora",
        "method=full trains every weight"),
    Case("quant-with-lora", "combination", "quant settings with method=lora", ["quant.quant_type=fp4"], "quant",
        "applies to method=qlora"),
    Case("epochs-and-steps", "combination", "train.epochs and train.max_steps both set", ["train.epochs=3"],
        "train.epochs", "both set the run's length"),
    Case("two-warmups", "combination", "warmup_steps and warmup_ratio",
        ["optim.warmup_ratio=0.1", "optim.warmup_steps=1", "train.max_steps=10"], "optim.warmup_ratio", "not both"),
    Case("warmup-ratio-1", "combination", "warmup_ratio of 1", ["optim.warmup_ratio=1"], "optim.warmup_ratio",
        "less than 1"),
    Case("resume-and-overwrite", "combination", "resume=true with overwrite=true",
        ["resume=true", "overwrite=true"], "overwrite", "contradict"),
    Case("auto-and-overwrite", "combination", "resume=auto with overwrite=true", ["resume=auto", "overwrite=true"],
        "overwrite", "contradict"),
    Case("flash-on-cpu", "combination", "flash attention on the CPU",
        ["model.attn_implementation=flash_attention_2"], "flash_attention_2", "needs a GPU"),
    Case("two-halves", "combination", "bf16 compute over float16 weights",
        ["train.precision=bf16", "model.dtype=float16"], "model.dtype=float16", "mixes two half types"),
    Case("full-half-weights", "combination", "full fine-tuning of bfloat16 weights without mixed precision",
        ["method=full", "model.dtype=bfloat16"], "model.dtype", "set model.dtype=float32"),
    Case("streaming-no-steps", "combination", "streaming data without max_steps",
        ["data.streaming=true", "train.max_steps=null"], "train.max_steps", "no known length"),
    Case("weights-on-some", "combination", "mixture weights on some sources only",
        ["data.train=[{path: good.jsonl, weight: 1}, good.jsonl]"], "data.train", "on every data.train source"),
    Case("weight-on-eval", "combination", "a weight on an eval source",
        ["data.eval=[{path: good.jsonl, weight: 1}]"], "data.eval", "weights apply to data.train"),
    Case("epoch-size-no-mixture", "combination", "epoch_size without mixture weights", ["data.epoch_size=10"],
        "data.epoch_size", "weighted mixture"),
    Case("overlap-too-big", "combination", "split_overlap above half the sequence", ["data.split_overlap=40"],
        "split_overlap", "below half of max_seq_len"),
    Case("system-prompt-text", "combination", "a system prompt on raw text",
        ["data.train=[{path: good.jsonl, format: text, system_prompt: hi}]"], "system_prompt",
        "not to format=text"),
    Case("qlora-deepspeed", "combination", "QLoRA under DeepSpeed", ["method=qlora", "strategy.name=deepspeed"],
        "strategy.name=deepspeed", "use strategy.name=fsdp2"),
    Case("bnb-optim-deepspeed", "combination", "an 8-bit optimizer under DeepSpeed",
        ["optim.name=adamw_8bit", "strategy.name=deepspeed"], "optim.name=adamw_8bit", "use optim.name=adamw"),
    Case("bnb-optim-fsdp2", "combination", "an 8-bit optimizer under FSDP2",
        ["optim.name=adamw_8bit", "strategy.name=fsdp2"], "optim.name=adamw_8bit", "use optim.name=adamw"),
    Case("fsdp-bf16-fp32", "combination", "FSDP2 bf16 compute with fp32 training",
        ["strategy.name=fsdp2", "strategy.fsdp.param_dtype=bfloat16"], "strategy.fsdp.param_dtype",
        "set train.precision=bf16"),
    Case("two-recomputes", "combination", "two kinds of activation checkpointing",
        ["strategy.name=fsdp2", "strategy.fsdp.activation_checkpointing=true", "model.gradient_checkpointing=true"],
        "activation_checkpointing", "keep one"),
    Case("compile-deepspeed", "combination", "train.compile under DeepSpeed",
        ["train.compile=true", "strategy.name=deepspeed"], "train.compile", "use strategy.name=fsdp2 or single"),
    Case("activation-offload-cpu", "combination", "activation offload on the CPU",
        ["train.activation_offload=true"], "train.activation_offload", "nothing to move"),
    Case("offload-zero2", "combination", "parameter offload with ZeRO-2",
        ["strategy.name=deepspeed", "strategy.deepspeed.offload_params=true"], "offload_params",
        "needs zero_stage=3"),
    Case("qlora-fsdp-storage", "combination", "FSDP-QLoRA with uint8 storage",
        ["method=qlora", "strategy.name=fsdp2"], "quant.storage_dtype", "shards float tensors"),
    Case("qlora-dora-fsdp", "combination", "DoRA in FSDP-QLoRA",
        ["method=qlora", "strategy.name=fsdp2", "quant.storage_dtype=float32", "lora.use_dora=true"],
        "lora.use_dora", "plain LoRA"),
    Case("qlora-two-halves", "combination", "QLoRA with two half types",
        ["method=qlora", "quant.compute_dtype=float16", "train.precision=bf16"], "quant.compute_dtype=float16",
        "mixes two half types"),
    Case("modules-to-save-half", "combination", "modules_to_save over half-precision weights",
        ["model.dtype=bfloat16", "lora.modules_to_save=[lm_head]"], "lora.modules_to_save", "train.precision=bf16"),
    Case("ds-config-missing", "combination", "a DeepSpeed JSON that does not exist",
        ["strategy.name=deepspeed", "strategy.deepspeed.config=nope.json"], "nope.json", "not found"),
    Case("ds-config-contradicts", "combination", "a DeepSpeed JSON that contradicts the recipe",
        ["strategy.name=deepspeed", "strategy.deepspeed.config=ds.json"], "train_micro_batch_size_per_gpu",
        "contradicts the recipe", files={"ds.json": '{"train_micro_batch_size_per_gpu": 7}'}),
    # -- data rows (each names file:line)
    row_case("row-malformed-json", "a line that is not JSON", "{oops", "malformed JSON"),
    row_case("row-not-object", "a line holding a list, not an object", "[1, 2]", "must be a JSON object"),
    Case("row-not-utf8", "data", "a line that is not UTF-8", BAD, "bad.jsonl:2", "not valid UTF-8",
        files={"bad.jsonl": jsonl(GOOD).encode() + b'{"text": "caf\xe9"}\n'}),
    Case("row-unknown-format", "data", "a first row whose fields fit no format", BAD, "bad.jsonl:1",
        "cannot tell the data format", files={"bad.jsonl": jsonl({"question": "q", "answer": "a"})}),
    row_case("row-messages-not-list", "messages is a string", {"messages": "hi"}, "non-empty list"),
    row_case("row-messages-empty", "messages is an empty list", {"messages": []}, "non-empty list"),
    row_case("row-turn-no-content", "a turn without content", {"messages": [{"role": "user"}]},
        "needs 'role' and 'content'"),
    row_case("row-unknown-role", "a turn with an unknown role", chat(("human", "q"), ("assistant", "a")),
        "unknown role"),
    row_case("row-content-not-text", "a turn whose content is a number", chat(("user", 5), ("assistant", "a")),
        "must be a string"),
    row_case("row-empty-answer", "an empty assistant turn", chat(("user", "q"), ("assistant", " ")),
        "empty assistant turn"),
    row_case("row-no-assistant", "a conversation without an assistant turn", chat(("user", "q")),
        "no assistant turn"),
    row_case("row-starts-assistant", "a conversation starting with the assistant",
        chat(("assistant", "a"), ("user", "q"), ("assistant", "b")), "starts with an assistant turn"),
    row_case("row-ends-user", "a conversation ending with an unanswered user turn",
        chat(("user", "q"), ("assistant", "a"), ("user", "and?")), "end the conversation with an assistant turn"),
    row_case("row-missing-field", "a row without the format's field", {"text": "x"}, "no 'messages' field"),
    Case("alpaca-no-output", "data", "an Alpaca row without output", BAD, "bad.jsonl:2", "no 'output' field",
        files={"bad.jsonl": jsonl({"instruction": "i", "output": "o"}, {"instruction": "i"})}),
    Case("alpaca-input-not-text", "data", "an Alpaca input that is a list", BAD, "bad.jsonl:2", "must be a string",
        files={"bad.jsonl": jsonl(ALPACA, {**ALPACA, "input": [1]})}),
    Case("completion-empty", "data", "an empty completion", BAD, "bad.jsonl:2", "is empty",
        files={"bad.jsonl": jsonl({"prompt": "p", "completion": "c"}, {"prompt": "p", "completion": ""})}),
    Case("text-not-string", "data", "a text field holding a number", BAD, "bad.jsonl:2", "must be a string",
        files={"bad.jsonl": jsonl({"text": "t"}, {"text": 3})}),
    Case("text-empty", "data", "an empty text", BAD, "bad.jsonl:2", "is empty",
        files={"bad.jsonl": jsonl({"text": "t"}, {"text": "  "})}),
    Case("sharegpt-bad-from", "data", "a ShareGPT turn from an unknown speaker", BAD, "bad.jsonl:2", "unknown role",
        files={"bad.jsonl": jsonl(SHAREGPT, {"conversations": [{"from": "bot", "value": "q"}]})}),
    Case("csv-fields", "data", "a CSV row with more fields than the header", ["data.train=bad.csv"], "bad.csv:3",
        "different number of fields", files={"bad.csv": "text\nhello\nhello,again\n"}),
    Case("csv-json-cell", "data", "a CSV cell with malformed conversation JSON", ["data.train=bad.csv"],
        "bad.csv:3", "malformed JSON",
        files={"bad.csv": 'messages\n"' + json.dumps(GOOD["messages"]).replace('"', '""') + '"\n"[oops"\n'}),
    Case("json-not-list", "data", "a .json file holding one object", ["data.train=bad.json"], "bad.json",
        "list of row objects", files={"bad.json": json.dumps(GOOD)}),
    Case("json-malformed", "data", "a .json file that is not JSON", ["data.train=bad.json"], "bad.json",
        "malformed JSON", files={"bad.json": "[{"}),
    Case("json-row-not-object", "data", "a .json list holding a string", ["data.train=bad.json"], "bad.json row 1",
        "must be a JSON object", files={"bad.json": json.dumps([GOOD, "x"])}),
    Case("parquet-broken", "data", "a .parquet file that is not Parquet", ["data.train=bad.parquet"], "bad.parquet",
        "not a readable Parquet file", files={"bad.parquet": "not parquet"}),
    Case("data-empty-file", "data", "an empty data file", ["data.train=empty.jsonl"], "empty.jsonl",
        "no usable samples", files={"empty.jsonl": ""}),
    Case("data-blank-lines", "data", "a data file of blank lines", ["data.train=blank.jsonl"], "blank.jsonl",
        "no usable samples", files={"blank.jsonl": "\n\n\n"}),
    Case("data-all-too-long", "data", "every row too long, with on_overflow=drop",
        ["data.train=long.jsonl", "data.on_overflow=drop"], "long.jsonl", "no usable samples",
        files={"long.jsonl": jsonl({"text": "word " * 200})}),
    Case("data-too-small", "data", "too few samples for one batch", ["data.train=one.jsonl"],
        "train.micro_batch_size", "do not fill one global batch", files={"one.jsonl": jsonl(GOOD)}),
    Case("data-mixed-formats", "data", "a text row in a chat file", BAD, "bad.jsonl:2", "no 'messages' field",
        files={"bad.jsonl": jsonl(GOOD, {"text": "plain"})}),
    Case("eval-bad-row", "data", "a bad row in the eval data", ["data.eval=bad.jsonl"], "bad.jsonl:2",
        "malformed JSON", files={"bad.jsonl": jsonl(GOOD, "{oops")}),
    Case("glob-second-file-bad", "data", "a bad row in the second file of a glob", ["data.train=parts/*.jsonl"],
        "b.jsonl:1", "malformed JSON", files={"parts/a.jsonl": jsonl(GOOD, GOOD), "parts/b.jsonl": jsonl("{")}),
    Case("column-map-missing", "data", "columns names a field the rows lack",
        ["data.train=[{path: good.jsonl, format: messages, columns: {messages: dialog}}]"], "good.jsonl:1",
        "no 'dialog' field"),
    # -- data files and paths
    Case("data-missing", "file", "a data file that does not exist", ["data.train=missing.jsonl"], "missing.jsonl",
        "file not found"),
    Case("data-glob-empty", "file", "a glob that matches nothing", ["data.train=parts/*.jsonl"], "parts/*.jsonl",
        "file not found"),
    Case("data-bad-suffix", "file", "a data file of unknown type", ["data.train=notes.txt"], "notes.txt",
        "unknown file type", files={"notes.txt": "x"}),
    Case("data-mixed-glob", "file", "a glob matching .jsonl and .csv", ["data.train=mix/*"], "mix/*",
        "several types", files={"mix/a.jsonl": jsonl(GOOD), "mix/b.csv": "text\nx\n"}),
    Case("data-folder", "file", "a plain folder as data", ["data.train=adir"], "adir", "save_to_disk",
        setup=make_dirs("adir")),
    Case("data-hub-empty", "file", "hub: without a name", ["data.train='hub:'"], "hub:", "name a hub data set"),
    Case("data-builtin-unknown", "file", "an unknown built-in data set", ["data.train=builtin:nope/train"],
        "builtin:nope/train", "valid: builtin:jargon/train"),
    Case("eval-missing", "file", "an eval file that does not exist", ["data.eval=missing.jsonl"], "missing.jsonl",
        "file not found"),
    # -- the model
    Case("model-missing", "model", "a model path that does not exist", ["model.name=/nonexistent/model"],
        "/nonexistent/model", "path not found"),
    Case("model-relative-missing", "model", "a relative model path that does not exist", ["model.name=./mymodel"],
        "./mymodel", "path not found"),
    Case("model-path-typo", "model", "a path typo that looks like a hub id", ["model.name=models/tiny-typo"],
        "models/tiny-typo", "path typo", setup=make_dirs("models")),
    Case("model-hub-offline", "model", "a hub id with the hub offline and no cached copy",
        ["model.name=someorg/somemodel"], "someorg/somemodel", "offline"),
    Case("model-builtin-unknown", "model", "an unknown built-in model", ["model.name=builtin:gpt-9"],
        "builtin:gpt-9", "known: builtin:smollm2"),
    Case("model-no-config", "model", "a model folder without config.json", ["model.name=m"], "m", "no config.json",
        setup=copy_model("m", lambda p: (p / "config.json").unlink())),
    Case("model-config-corrupt", "model", "a corrupt config.json", ["model.name=m"], "config.json",
        "not valid JSON", setup=copy_model("m", lambda p: truncate(p / "config.json", 0.5))),
    Case("model-config-no-type", "model", "a config.json without model_type", ["model.name=m"], "config.json",
        "no model_type", setup=copy_model("m", lambda p: (p / "config.json").write_text("{}"))),
    Case("model-no-weights", "model", "a model folder without weights", ["model.name=m"], "m", "no weight files",
        setup=copy_model("m", lambda p: (p / "model.safetensors").unlink())),
    Case("model-truncated", "model", "truncated model weights (an interrupted download)", ["model.name=m"],
        "model.safetensors", "truncated", setup=copy_model("m", lambda p: truncate(p / "model.safetensors", 0.6))),
    Case("model-weights-garbage", "model", "a weights file that is not safetensors", ["model.name=m"],
        "model.safetensors", "not a readable safetensors file",
        setup=copy_model("m", lambda p: (p / "model.safetensors").write_bytes(b"\xff" * 64))),
    Case("model-is-file", "model", "model.name is a file", ["model.name=good.jsonl"], "good.jsonl", "is a file"),
    # -- the output folder
    Case("out-cwd", "output", "output_dir is the working directory", ["output_dir=."], "output_dir .",
        "is the working directory"),
    Case("out-cwd-overwrite", "output", "output_dir=. with overwrite=true (the folder holds the user's files)",
        ["output_dir=.", "overwrite=true"], "output_dir .", "is the working directory"),
    Case("out-empty-overwrite", "output", "an empty output_dir with overwrite=true (an unset $OUT)",
        ["output_dir=", "overwrite=true"], "output_dir", "is empty"),
    Case("out-parent", "output", "output_dir is a parent of the working directory", ["output_dir=.."],
        "output_dir ..", "contains the working directory"),
    Case("out-root", "output", "output_dir is /", ["output_dir=/"], "output_dir /",
        "contains the working directory"),
    Case("out-is-file", "output", "output_dir is a file", ["output_dir=good.jsonl"], "output_dir good.jsonl",
        "is a file"),
    Case("out-below-file", "output", "output_dir is below a file", ["output_dir=good.jsonl/run"],
        "output_dir good.jsonl/run", "which is a file"),
    Case("out-holds-recipe", "output", "output_dir holds the recipe", ["output_dir=sub"], "sub/r.yaml",
        "one of this run's inputs", recipe_at="sub/r.yaml"),
    Case("out-holds-data", "output", "output_dir holds the data", ["output_dir=d", "data.train=d/x.jsonl"],
        "x.jsonl", "one of this run's inputs", files={"d/x.jsonl": jsonl(*[GOOD] * 8)}),
    Case("out-holds-model", "output", "output_dir holds the model", ["output_dir=mdir", "model.name=mdir/m"],
        "mdir/m", "one of this run's inputs", setup=copy_model("mdir/m")),
    Case("out-foreign", "output", "output_dir holds files sft did not write", ["output_dir=notes"], "notes",
        "did not write", files={"notes/todo.txt": "mine"}),
    Case("out-foreign-overwrite", "output", "overwrite=true on a folder sft did not write",
        ["output_dir=notes", "overwrite=true"], "notes", "did not write", files={"notes/todo.txt": "mine"}),
    Case("out-existing-run", "output", "an earlier run there, neither resume nor overwrite", [], "output_dir out",
        "already holds a run", setup=earlier_run()),
    Case("out-read-only", "output", "output_dir on a read-only file system", ["output_dir=ro/out"], "ro",
        "read-only", sandbox="read-only", setup=make_dirs("ro")),
    Case("out-no-room", "output", "no room on the disk for a checkpoint", ["output_dir=small/out", "method=full"],
        "output_dir small/out", "GB free", sandbox="tiny-disk", setup=make_dirs("small")),
    # -- resume
    Case("resume-nothing", "resume", "resume=true with no run there", ["resume=true"], "output_dir out",
        "no checkpoint to continue"),
    Case("resume-no-checkpoint", "resume", "resume=true where no checkpoint was written", ["resume=true"], "out",
        "no checkpoint to continue", setup=earlier_run(checkpoint=False)),
    Case("resume-lr", "resume", "resume with another learning rate", ["resume=true", "optim.lr=1e-2"], "optim.lr",
        "resume_changes=allow", setup=earlier_run()),
    Case("resume-batch", "resume", "resume with another micro-batch size",
        ["resume=true", "train.micro_batch_size=4"], "train.micro_batch_size", "resume_changes=allow",
        setup=earlier_run(state={"global_batch": 2})),  # 2 per micro-batch x 1 x 1 rank
    Case("resume-seed", "resume", "resume with another seed", ["resume=true", "seed=7"], "seed",
        "resume_changes=allow", setup=earlier_run()),
    Case("resume-steps", "resume", "resume with a longer cosine schedule", ["resume=true", "train.max_steps=5"],
        "train.max_steps", "resume_changes=allow", setup=earlier_run()),
    Case("resume-method", "resume", "resume with another method (even with resume_changes=allow)",
        ["resume=true", "method=full", "resume_changes=allow"], "method", "cannot follow", setup=earlier_run()),
    Case("resume-lora-r", "resume", "resume with another LoRA rank", ["resume=true", "lora.r=8"], "lora.r",
        "cannot follow", setup=earlier_run()),
    Case("resume-data-changed", "resume", "resume after the training data changed", ["resume=true"],
        "data.train[0] good.jsonl", "resume_changes=allow",
        setup=earlier_run(state={"data_fingerprints": {"train[0] good.jsonl": "0" * 64}})),
    Case("resume-auto-finished-no-ckpt", "resume", "resume=auto over a finished run whose checkpoints are gone",
        ["resume=auto"], "out", "finished run",
        setup=finished_without_checkpoints),
    # -- the environment
    Case("wandb-no-key", "environment", "W&B online without an API key", ["logging.wandb.mode=online"],
        "logging.wandb.mode", "no W&B API key"),
]
# fmt: on


# ---------------------------------------------------------------- running a case


@dataclass
class Outcome:
    code: int | str
    err: str
    written: list[str]


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    skip = folder / ".cache"
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
        if not p.is_relative_to(skip)
    }


def prepare(case: Case, folder: Path, model: Path) -> list[str]:
    """Write the case's files; returns the `sft train` arguments (run from `folder`)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "good.jsonl").write_text(jsonl(*[GOOD] * 8))
    if case.write_recipe:
        recipe = folder / case.recipe_at
        recipe.parent.mkdir(parents=True, exist_ok=True)
        recipe.write_text(
            (BASE_RECIPE if case.recipe is None else case.recipe).replace("{model}", str(model))
        )
    for name, content in case.files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    if case.setup is not None:
        case.setup(folder, model)
    return ["train", case.recipe_at, *case.args]


def case_env(folder: Path) -> dict[str, str]:
    """No network, no W&B key, a data cache of the case's own."""
    return {
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "SFT_CACHE": str(folder / ".cache"),
        "NETRC": str(folder / ".no-netrc"),
        "WANDB_CONFIG_DIR": str(folder / ".no-wandb"),
        "TOKENIZERS_PARALLELISM": "false",
    }


def run_case(case: Case, folder: Path, model: Path) -> Outcome:
    args = prepare(case, folder, model)
    before = snapshot(folder)
    if case.sandbox:
        code, err = _run_sandboxed(case, folder, args)
    else:
        code, err = _run_in_process(folder, args)
    after = snapshot(folder)
    written = sorted(k for k in after if before.get(k) != after[k]) + sorted(
        k for k in before if k not in after
    )
    return Outcome(code, err, written)


def _run_in_process(folder: Path, args: list[str]) -> tuple[int | str, str]:
    from sft.cli import main

    env = {**case_env(folder), "WANDB_API_KEY": ""}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    del os.environ["WANDB_API_KEY"]
    err = io.StringIO()
    try:
        with (
            contextlib.chdir(folder),
            contextlib.redirect_stderr(err),
            contextlib.redirect_stdout(io.StringIO()),
        ):
            try:
                code: int | str = main(args)
            except SystemExit as e:
                code = int(e.code) if isinstance(e.code, int) else str(e.code)
            except BaseException:  # a traceback is what the contract forbids: recorded, not raised
                code = "traceback"
                err.write(traceback.format_exc())
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return code, err.getvalue()


def _run_sandboxed(case: Case, folder: Path, args: list[str]) -> tuple[int | str, str]:
    """A private mount namespace: a read-only bind mount, or a 1 MB tmpfs, over the case's folder."""
    target = folder / ("ro" if case.sandbox == "read-only" else "small")
    mount = (
        f"mount --bind {target} {target} && mount -o remount,ro,bind {target} {target}"
        if case.sandbox == "read-only"
        else f"mount -t tmpfs -o size=1m tmpfs {target}"
    )
    unshare = ["unshare", "--mount"] + ([] if os.geteuid() == 0 else ["--map-root-user"])
    py = " ".join([sys.executable, "-m", "sft.cli", *[f"'{a}'" for a in args]])
    env = {**os.environ, **case_env(folder), "PYTHONPATH": os.environ.get("PYTHONPATH", str(REPO))}
    env.pop("WANDB_API_KEY", None)
    proc = subprocess.run(
        [*unshare, "sh", "-c", f"{mount} && cd {folder} && exec {py}"],
        capture_output=True,
        text=True,
        env=env,
    )
    return proc.returncode, proc.stderr


def problems(case: Case, out: Outcome) -> list[str]:
    """What in the outcome breaks the contract (empty: kept)."""
    found = []
    lines = out.err.splitlines()
    if out.code != 2:
        found.append(f"exit code {out.code}")
    if len(lines) != 1 or "Traceback" in out.err:
        found.append(f"{len(lines)} lines on stderr")
    if case.names not in out.err:
        found.append(f"does not name {case.names!r}")
    if case.says not in out.err:
        found.append(f"does not say {case.says!r}")
    if out.written:
        found.append(f"wrote {', '.join(out.written[:3])}")
    return found


def shown_message(out: Outcome, folder: Path, model: Path) -> str:
    """The line as docs/errors.md shows it: the case's folders as placeholders."""
    text = out.err.strip().removeprefix("sft: error: ")
    for path, name in ((folder.resolve(), "."), (folder, "."), (model.resolve(), "MODEL"), (model, "MODEL")):
        text = text.replace(str(path) + "/", "" if name == "." else name + "/").replace(str(path), name)
    return text.replace("|", "\\|")


# ---------------------------------------------------------------- docs/errors.md

FAULTS = [  # (fault, what the user sees, the test that checks it)
    (
        "kill -9 during training, and at 4 moments inside a save (files half-written; folder complete but not "
        "moved in; moved in but the pointer not moved; old checkpoints being removed)",
        "the next `resume=true` continues from the newest complete checkpoint, never from step 0, and the losses "
        "equal an uninterrupted run's; leftover `.partial` / `.old` folders are removed",
        "test_kill_9_anywhere_never_loses_a_complete_checkpoint",
    ),
    (
        "`latest` missing, empty, or naming a deleted or damaged folder; a crash between the renames of a re-save",
        "`[sft] OUT/checkpoints/latest names step-N, but ...; resuming from the newest complete checkpoint, step-M`",
        "test_broken_pointer_falls_back_to_the_newest_complete_checkpoint",
    ),
    (
        "a checkpoint file that reads wrong although its size is right",
        "`checkpoint OUT/checkpoints/step-N cannot be loaded (...); the older complete checkpoint step-M can continue "
        "the run: move step-N aside (mv ...) and resume again`, exit 2, nothing written",
        "test_corrupt_checkpoint_names_itself_and_the_older_one",
    ),
    (
        "re-running a finished run with resume=true or auto (a requeue, `sft launch` again)",
        "`[sft] the run in OUT is complete (final/ and results.json); nothing to do`, exit 0; nothing rewritten",
        "test_rerun_of_a_finished_run_changes_nothing",
    ),
    (
        "resuming with `resume_changes=allow` after a refused change",
        "`[sft] resume_changes=allow: continuing with optim.lr 0.001 -> 0.01, ...`; the new values apply and "
        "every later checkpoint records the change",
        "test_allowed_recipe_change_takes_effect_and_is_recorded",
    ),
    (
        "SIGTERM, SIGUSR1 (Slurm's warning) or SIGINT (Ctrl-C) during training",
        "a checkpoint at the end of the step, `[sft] SIGINT received: checkpoint at step N written, exiting`, exit 99",
        "test_signal_checkpoints_then_exits",
    ),
    ("a second Ctrl-C", "stops at once without a checkpoint, exit 130", "test_second_sigint_stops_at_once"),
    (
        "disk full while saving a checkpoint, or while exporting",
        "`disk full while writing checkpoint step-N in OUT/checkpoints; the partial folder was removed and the "
        "previous checkpoint step-M is intact; free space, then resume=true` (or `disk full while exporting ...`), "
        "exit 2",
        "test_disk_full_keeps_the_previous_checkpoint",
    ),
    (
        "one rank of a multi-process job killed (kill -9, out of memory)",
        "`[sft] rank 1 of 2 stopped first (without a line of its own above: killed by a signal ...)` before "
        "torchrun's summary; the job ends within seconds. A rank that raises prints `[sft] rank R of W failed: ...`",
        "test_a_killed_rank_is_named",
    ),
    (
        "the loss or the gradient becomes NaN or infinite",
        "`sft: stopped: training diverged at step N: loss nan ...; last good checkpoint: ...`, exit 3; a checkpoint "
        "holding the diverged weights is renamed `diverged-step-N`",
        "test_nan_loss_stops_with_exit_3_keeping_the_good_checkpoint",
    ),
    (
        "the model collapses (loss at ln(vocabulary), zero gradient; e.g. lr 1e6 without clipping)",
        "`sft: stopped: training collapsed at step N: loss 10.8027 = ln(vocabulary size 49152) ...`, exit 3",
        "test_collapse_stops_with_exit_3",
    ),
]
FAULT_TESTS = REPO / "tests" / "test_faults.py"

DOC_HEAD = """\
# Errors: what goes wrong and what sft says

Generated by `python -m tests.bad_inputs --write-doc` from the cases that tests/test_bad_inputs.py runs;
tests/test_bad_inputs.py fails when this page is out of date. Paths are shown relative to the folder the
command ran in; `MODEL` is the model folder.

## Bad input: one line, exit code 2, nothing written

Every mistake below stops `sft train` (and `sft launch`) before any weights are loaded or anything is
written, with one line on stderr that names the file, row or key and says what to do, and exit code 2.

| kind | mistake | what sft says |
| --- | --- | --- |
"""

FAULT_HEAD = """
## Faults during a run

| fault | what happens | checked by |
| --- | --- | --- |
"""

WARNINGS = """
## Said, not refused

| what | what sft prints (the run goes on) |
| --- | --- |
| a warmup as long as the run or longer (a short trial of a longer recipe, e.g. `train.max_steps=2`) | `[sft] warning: optim.warmup_steps=5 is not below the run's 2 steps, so the learning rate never reaches optim.lr; fine for a short trial, otherwise lower optim.warmup_steps` |
| `resume=auto` with nothing to continue | `[sft] resume=auto: no checkpoint in OUT; starting from step 0` |
"""

EXIT_CODES = """
## Exit codes

| code | meaning |
| --- | --- |
| 0 | done (or nothing to do: the run was already complete) |
| 2 | bad input: the one line on stderr says what and how to fix it |
| 3 | training diverged or collapsed; the last good checkpoint is kept |
| 99 | stopped by a signal (SIGTERM, SIGUSR1, SIGINT) after writing a checkpoint; resume with `resume=true` |
| 130 | a second Ctrl-C: stopped at once, without a checkpoint |
"""


def render_doc(messages: dict[str, str]) -> str:
    rows = [f"| {c.group} | {c.what} | {messages[c.id]} |" for c in CASES]
    faults = [f"| {f} | {what} | `tests/test_faults.py::{test}` |" for f, what, test in FAULTS]
    return DOC_HEAD + "\n".join(rows) + "\n" + FAULT_HEAD + "\n".join(faults) + "\n" + WARNINGS + EXIT_CODES


def main(argv: list[str]) -> int:
    import tempfile

    given = [a for a in argv if not a.startswith("-")]
    messages, kept = {}, 0
    with tempfile.TemporaryDirectory() as tmp:
        if given:
            model = Path(given[0]).resolve()
        else:
            from transformers import AutoTokenizer

            from sft.model.builtin import builtin_model_dir
            from tests.conftest import random_llama

            tokenizer = AutoTokenizer.from_pretrained(builtin_model_dir("builtin:smollm2-135m-instruct"))
            model = random_llama(Path(tmp) / "tiny-model", tokenizer, hidden_size=64, intermediate_size=128)
        for case in CASES:
            folder = Path(tmp) / case.id
            out = run_case(case, folder, model)
            found = problems(case, out)
            kept += not found
            messages[case.id] = shown_message(out, folder, model)
            print(f"{'ok  ' if not found else 'FAIL'} {case.group:12} {case.id:28} {'; '.join(found)}")
    print(
        f"{kept} of {len(CASES)} bad inputs keep the contract (one line naming it, exit 2, nothing written)"
    )
    if "--write-doc" in argv:
        DOC.write_text(render_doc(messages))
        print(f"wrote {DOC}")
    return 0 if kept == len(CASES) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
