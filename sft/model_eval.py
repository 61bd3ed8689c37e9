"""`sft eval`: held-out loss and perplexity of any model on any data, plus greedy answers to prompts.

    sft eval runs/lab3/code/final --data builtin:code/eval builtin:sonnets/eval --prompt "def fib(n):" --json out.json

MODEL is a Hugging Face model folder, `builtin:NAME`, a hub id, or a LoRA/QLoRA adapter folder (loaded on
the base it records, in 4-bit when it was trained in 4-bit, as `sft merge` verifies it). Each data source
is read, formatted, tokenized and masked exactly as training reads it (sft/data, the tokenizer cache
included), and scored with the training loop's own loss (sft/evaluate.py): the loss is the mean over the
trained tokens (for chat rows: the assistant answers) of each source, reported per source.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from sft.errors import SftError


def read_prompts(path: str) -> list[str]:
    """Prompts from a file: a JSON or YAML list of strings, or else one prompt per non-empty line."""
    import yaml

    file = Path(path).expanduser()
    if not file.is_file():
        raise SftError(f"--prompts: file not found: {path}")
    text = file.read_text(encoding="utf-8")
    if file.suffix.lower() in (".json", ".yaml", ".yml"):
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise SftError(f"--prompts: {path} is not valid JSON/YAML ({e})") from None
        if not (isinstance(loaded, list) and all(isinstance(p, str) for p in loaded)):
            raise SftError(f"--prompts: {path} must hold a list of strings")
        return loaded
    return [line.strip() for line in text.splitlines() if line.strip()]


def evaluate_model(
    model_ref: str,
    sources: list[str],
    prompts: list[str] = (),  # type: ignore[assignment]
    *,
    max_seq_len: int = 1024,
    batch_size: int = 8,
    max_batches: int | None = None,
    max_new_tokens: int = 64,
    device: str = "auto",
    precision: str = "fp32",
    log: Any = print,
) -> dict[str, Any]:
    """Loss per source and answers per prompt; checks the inputs before loading the model."""
    from sft.config import DataConfig, DataSource, ModelConfig
    from sft.data.sources import open_source

    specs = [DataSource(path=s) for s in sources]
    for spec in specs:
        open_source(spec)  # a missing file fails here, before the model loads
    data = DataConfig(
        train=specs or [DataSource(path="builtin:jargon/train")], eval=specs, max_seq_len=max_seq_len
    )
    adapter = _adapter_folder(model_ref)
    if adapter is None:
        from sft.model.check import check_model_name

        check_model_name(model_ref)

    import torch

    from sft.data.collate import pad_collate
    from sft.data.prepare import load_source
    from sft.evaluate import eval_loss, generate_answers
    from sft.model.load import load_tokenizer

    dev = torch.device(device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    start = time.perf_counter()
    if adapter is not None:
        model, tokenizer = _load_adapter(adapter, dev)
    else:
        from sft.model.load import load_model

        cfg = ModelConfig(name=model_ref)
        tokenizer = load_tokenizer(cfg)
        model = load_model(cfg, dev)
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    results: dict[str, Any] = {"model": model_ref, "sources": {}, "answers": []}
    for spec in specs:
        store, stats, _ = load_source(spec, tokenizer, data)
        order = list(range(len(store)))
        chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)][:max_batches]
        batches = (
            {k: v.to(dev) for k, v in pad_collate([store.ids_labels(i) for i in chunk], pad).items()}
            for chunk in chunks
        )
        scores = eval_loss(model, batches, precision, lambda t: t)
        row = {
            "loss": scores["eval/loss"],
            "perplexity": scores["eval/perplexity"],
            "tokens": int(scores["eval/tokens"]),
            "samples": sum(len(c) for c in chunks),
        }
        results["sources"][spec.path] = row
        log(
            f"[sft eval] {spec.path}: loss {row['loss']:.4f}  perplexity {row['perplexity']:.2f}  "
            f"({row['samples']} samples, {row['tokens']} trained tokens)"
        )
    if prompts:
        results["answers"] = generate_answers(model, tokenizer, list(prompts), max_new_tokens, precision)
        for a in results["answers"]:
            log(f"[sft eval] {a['prompt']}\n  -> {a['answer']}")
    results["seconds"] = round(time.perf_counter() - start, 2)
    return results


def _adapter_folder(ref: str) -> Path | None:
    folder = Path(ref).expanduser()
    return folder if (folder / "adapter_config.json").is_file() else None


def _load_adapter(folder: Path, device: Any) -> tuple[Any, Any]:
    """The adapter on its recorded base (4-bit for QLoRA), as training ran it, and its tokenizer."""
    from transformers import AutoTokenizer

    from sft.export import ADAPTER_RECORD
    from sft.merge.verify import load_adapter_model
    from sft.model.builtin import resolve_model_path

    record_file = folder / ADAPTER_RECORD
    record = json.loads(record_file.read_text()) if record_file.is_file() else {}
    base = record.get("base_model") or json.loads((folder / "adapter_config.json").read_text()).get(
        "base_model_name_or_path"
    )
    if not base:
        raise SftError(
            f"{folder}: the adapter records no base model (sft_adapter.json or adapter_config.json)"
        )
    base_folder = Path(resolve_model_path(base))
    if not base_folder.is_dir():
        raise SftError(f"{folder}: its base {base} is not a local folder or built-in model")
    quant = record.get("quantization")
    dtype = (quant or {}).get("dtype") or "float32"
    model = load_adapter_model(base_folder, folder, quant, dtype, str(device))
    has_tokenizer = (folder / "tokenizer_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(folder if has_tokenizer else base_folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def run_eval(args: Any) -> int:
    """The `sft eval` command."""
    prompts = list(args.prompt or [])
    if args.prompts:
        prompts += read_prompts(args.prompts)
    if not args.data and not prompts:
        raise SftError(
            "sft eval: nothing to do; give --data SOURCE (held-out loss) and/or --prompt/--prompts"
        )
    results = evaluate_model(
        args.model,
        args.data or [],
        prompts,
        max_seq_len=args.max_seq_len,
        batch_size=args.batch_size,
        max_batches=args.max_batches,
        max_new_tokens=args.max_new_tokens,
        device=args.device,
        precision=args.precision,
    )
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    return 0 if all(math.isfinite(r["loss"]) for r in results["sources"].values()) else 1
