"""The export room: what a run leaves for others to load, and how it appears in the run folder.

- `export_run`: the run's final model into OUTPUT/final, written aside and moved into place (sft/publish.py);
  every rank calls it because gathering sharded weights is a collective.
- `save_hf_folder`: rank 0's part, a loadable Hugging Face folder: weights (`save_weights`: the full model as
  safetensors shards with an index, or the peft adapter), the tokenizer, and for an adapter its record.
- The adapter record `sft_adapter.json`: which base the adapter was trained on and, for QLoRA, how that base
  was quantized (the merge folds the adapter into the weights training saw: dequantize(quantize(W))).

Nothing here imports torch at module level: the merge reads `ADAPTER_RECORD` and must stay light.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sft import publish
from sft.errors import SftError

if TYPE_CHECKING:
    import torch

    from sft.config import Recipe
    from sft.dist import DistEnv
    from sft.strategies.base import Strategy

EXPORT_SHARD_SIZE = (
    5 * 10**9
)  # bytes per safetensors shard of an exported model (with an index when there are several)
ADAPTER_RECORD = "sft_adapter.json"
FINAL = "final"


def adapter_only(recipe: Recipe) -> bool:
    """LoRA and QLoRA train (so save, gather and export) only the adapter weights."""
    return recipe.method in ("lora", "qlora")


def export_run(output_dir: Path, strategy: Strategy, model: Any, tokenizer: Any, dist: DistEnv) -> Path:
    """Every rank: export the trained model into OUTPUT/final, complete or not at all; return its path."""
    from sft.dist import barrier

    final = output_dir / FINAL
    partial = publish.aside_path(final)
    if dist.is_main:
        publish.aside(final)
    barrier()
    try:
        strategy.export(partial, model, tokenizer)
    except BaseException as e:
        full = publish.is_disk_full(e, output_dir)  # asked before the partial is removed
        if dist.is_main:
            publish.discard(partial)  # a failed export leaves the previous final/ (if any) untouched
        if full:
            raise SftError(
                f"disk full while exporting the model to {final}; the partial folder was removed and the last "
                "checkpoint is intact; free space, then resume=true (it exports without training again)"
            ) from None
        raise
    barrier()
    if dist.is_main:
        publish.move_into_place(partial, final)
    return final


def save_hf_folder(
    recipe: Recipe,
    folder: Path,
    model: Any,
    state_dict: dict[str, Any] | None,
    tokenizer: Any,
    max_shard_size: str | int = EXPORT_SHARD_SIZE,
) -> None:
    """Rank 0's part of an export: weights, tokenizer and (for an adapter) its record, into `folder`."""
    save_weights(recipe, folder, model, state_dict, max_shard_size)
    tokenizer.save_pretrained(folder)
    write_adapter_record(recipe, folder, model)


def save_weights(
    recipe: Recipe,
    folder: Path,
    model: Any,
    state_dict: dict[str, Any] | None,
    max_shard_size: str | int = EXPORT_SHARD_SIZE,
) -> None:
    """The model's config and weights as safetensors: `save_pretrained` with a gathered state dict (None: the
    model's own). For a peft model `save_pretrained` keeps only the adapter weights of the state dict."""
    kwargs: dict[str, Any] = {"safe_serialization": True}
    if not adapter_only(recipe):  # an adapter is small: one file
        kwargs["max_shard_size"] = max_shard_size
    if state_dict is not None:
        # A gathered state dict holds tied weights (embeddings = head) as separate copies: keep the first
        # name only, as the model's own state dict would.
        state_dict = dict(state_dict)
        first: dict[int, str] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            if first.setdefault(id(param), name) != name:
                state_dict.pop(name.replace("_checkpoint_wrapped_module.", ""), None)
        kwargs["state_dict"] = state_dict
    model.save_pretrained(folder, **kwargs)


def save_streamed_hf_folder(
    folder: Path,
    model: Any,
    tensors: Sequence[tuple[str, torch.dtype, tuple[int, ...], Callable[[], torch.Tensor | None]]],
    tokenizer: Any,
    is_main: bool,
) -> None:
    """Every rank: a full model's Hugging Face folder, written one tensor at a time (DESIGN invariant 10).

    `tensors` lists (name, dtype, shape, gather) in the order to write; `gather` is a collective every rank
    calls in turn, returning the whole tensor on rank 0 (None elsewhere). Rank 0 writes each straight into
    its shard file (sft.safetensors_io's streaming writer: shards of EXPORT_SHARD_SIZE with an index), so it holds one
    tensor at a time and never the model, whatever its size."""
    from sft.safetensors_io import CODE_OF, ShardedWriter, TensorSpec

    specs = [TensorSpec(n, CODE_OF[str(d).removeprefix("torch.")], tuple(s)) for n, d, s, _ in tensors]
    writer = ShardedWriter(folder, specs, EXPORT_SHARD_SIZE) if is_main else None
    try:
        for (_, _, _, gather), spec in zip(tensors, specs, strict=True):
            tensor = gather()
            if writer is not None:
                assert tensor is not None
                writer.write(spec.name, tensor)
            del tensor
        if writer is not None:
            writer.finish()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if is_main:
        model.config.save_pretrained(folder)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(folder)
        tokenizer.save_pretrained(folder)


def write_adapter_record(recipe: Recipe, folder: Path, model: Any) -> None:
    """`sft_adapter.json` beside a LoRA or QLoRA adapter (nothing for a full model): the base it was trained
    on and, for QLoRA, how that base was quantized, read from the loaded 4-bit layers."""
    if not adapter_only(recipe):
        return
    quantization = None
    if recipe.method == "qlora":
        from sft.model.quant import quantization_record

        quantization = quantization_record(model)
    record = {"base_model": recipe.model.name, "quantization": quantization, "method": recipe.method}
    (folder / ADAPTER_RECORD).write_text(json.dumps(record, indent=2) + "\n")
