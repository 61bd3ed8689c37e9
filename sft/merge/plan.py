"""From a checked config to a merge plan: open every input, check that they fit together, decide the output.

Everything that can be wrong with the inputs is found here, from the safetensors headers and config files,
before a byte of output is written: missing files, different architectures, a tensor missing from one
model, different shapes (the message names the tensor), different vocabulary sizes (an error unless
`vocab:` picks a policy). No tensor data is read.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sft.errors import SftError
from sft.merge.config import MergeConfig
from sft.merge.lora import AdapterSource, read_adapter
from sft.merge.params import describe as describe_setting
from sft.merge.params import layer_index, position
from sft.merge.sources import FolderSource, Source, is_adapter, resolve
from sft.safetensors_io import CODE_OF, DTYPES, FLOAT_CODES, TensorSpec

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


@dataclass
class Plan:
    cfg: MergeConfig
    output: Path
    inputs: list[Source]
    """The models (for lora: the one adapter source)."""
    labels: list[str]
    """How messages name each input: 'models.0 (path)'."""
    base: Source | None
    copy_source: Source
    """Config and generation config come from here (and vocabulary rows beyond the shared ones)."""
    tokenizer_folder: Path
    out_dtype: str
    """torch dtype name of the written floating-point tensors."""
    specs: list[TensorSpec]
    """Output tensors in write order."""
    vocab_rows: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Vocabulary tensors: (rows merged across all inputs, rows written)."""
    out_config: dict[str, Any] = field(default_factory=dict)
    n_layers: int = 1
    lora: AdapterSource | None = None
    """method lora: the adapter (also inputs[0])."""

    def sources(self) -> list[Source]:
        return ([self.base] if self.base else []) + self.inputs

    def close(self) -> None:
        for s in self.sources():
            s.close()

    def layer_position(self, name: str) -> float:
        """Where a tensor sits for per-layer gradients (sft/merge/params.py: mergekit's positions)."""
        return position(name, self.n_layers)


def open_source(ref: str, what: str, base: str | None, roundtrip: bool | None) -> Source:
    """Open a model or adapter folder. An adapter sits on `base` when given, else on the base it records."""
    folder = resolve(ref, what)
    if not is_adapter(folder):
        return FolderSource(ref, folder)
    adapter = read_adapter(folder, what)
    base_ref = base or adapter.recorded_base
    if not base_ref:
        raise SftError(f"{what}: adapter {ref} does not record its base model; set 'base: PATH'")
    base_src = FolderSource(base_ref, resolve(base_ref, f"{what} (base of {ref})"))
    return AdapterSource(ref, adapter, base_src, roundtrip)


def build_plan(cfg: MergeConfig) -> Plan:
    """Open and check all inputs; raise SftError for the first problem. Reads headers only."""
    output = Path(cfg.output).expanduser().resolve()
    if output.exists() and not cfg.overwrite:
        raise SftError(f"output: {output} already exists; set overwrite: true or choose another folder")
    if output.exists() and not output.is_dir():
        raise SftError(f"output: {output} exists and is not a folder")
    opened: list[Source] = []
    try:
        plan = _build(cfg, output, opened)
    except BaseException:
        for s in opened:
            s.close()
        raise
    return plan


def _build(cfg: MergeConfig, output: Path, opened: list[Source]) -> Plan:
    base: Source | None = None
    lora: AdapterSource | None = None
    if cfg.method == "lora":
        assert cfg.adapter is not None
        if not is_adapter(resolve(cfg.adapter, "adapter")):
            raise SftError(f"adapter: {cfg.adapter} has no adapter_config.json; is it a peft adapter folder?")
        source = open_source(cfg.adapter, "adapter", cfg.base, cfg.qlora_roundtrip)
        opened.append(source)
        assert isinstance(source, AdapterSource)
        lora = source
        inputs: list[Source] = [lora]
        labels = [f"adapter ({cfg.adapter})"]
    else:
        if cfg.base:
            folder = resolve(cfg.base, "base")
            if is_adapter(folder):
                raise SftError(f"base: {cfg.base} is an adapter folder; the base must be a full model")
            base = FolderSource(cfg.base, folder)
            opened.append(base)
        inputs = []
        for i, m in enumerate(cfg.models):
            inputs.append(open_source(m.path, f"models.{i}", cfg.base, cfg.qlora_roundtrip))
            opened.append(inputs[-1])
        labels = [f"models.{i} ({m.path})" for i, m in enumerate(cfg.models)]
        if cfg.qlora_roundtrip and not any(isinstance(s, AdapterSource) for s in inputs):
            raise SftError("qlora_roundtrip: none of the models is a QLoRA adapter; remove it")
    for s in [base, *inputs]:
        if s is not None and s.folder == output:
            raise SftError(f"output: {output} is also an input ({s.label}); write the merge elsewhere")

    named: list[tuple[str, Source]] = ([("base (" + base.label + ")", base)] if base else []) + list(
        zip(labels, inputs, strict=True)
    )
    _check_architecture(named)
    vocab_rows, out_rows = _check_tensors(named, cfg)

    copy_source, copy_label = _copy_source(cfg, base, inputs, labels)
    if vocab_rows:
        sizes = {label: _vocab_size(s) for label, s in named}
        known = [v for v in sizes.values() if v is not None]
        want = min(known) if cfg.vocab == "truncate" else max(known)
        if _vocab_size(copy_source) != want:
            raise SftError(
                f"copy_from: vocab: {cfg.vocab} writes {want} rows, but the tokenizer and config would come from "
                f"{copy_label} with {_vocab_size(copy_source)}; set copy_from to a model with {want}"
            )
    tokenizer_folder = copy_source.folder
    if lora is not None:
        adapter_folder = lora.adapter.folder
        if any((adapter_folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            tokenizer_folder = adapter_folder  # the trainer may have saved its (chat-templated) tokenizer
    verify = cfg.verify if cfg.verify is not None else cfg.method == "lora"
    if verify and not any(
        (tokenizer_folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")
    ):
        raise SftError(f"verify: no tokenizer in {tokenizer_folder} to encode the prompts; set verify: false")

    out_dtype = _output_dtype(cfg, copy_source)
    reference = named[0][1].specs()
    specs = []
    for name, spec in reference.items():
        dtype = CODE_OF[out_dtype] if spec.dtype in FLOAT_CODES else spec.dtype
        shape = (out_rows, *spec.shape[1:]) if name in vocab_rows else spec.shape
        specs.append(TensorSpec(name, dtype, shape))

    out_config = copy.deepcopy(copy_source.config)
    out_config.pop("quantization_config", None)
    for key in ("dtype", "torch_dtype"):
        if key in out_config or key == "dtype":
            out_config[key] = out_dtype
    if vocab_rows:
        text = out_config.get("text_config") if "vocab_size" not in out_config else None
        (text if isinstance(text, dict) else out_config)["vocab_size"] = out_rows
    return Plan(
        cfg=cfg,
        output=output,
        inputs=inputs,
        labels=labels,
        base=base,
        copy_source=copy_source,
        tokenizer_folder=tokenizer_folder,
        out_dtype=out_dtype,
        specs=specs,
        vocab_rows={n: (common, out_rows) for n, common in vocab_rows.items()},
        out_config=out_config,
        n_layers=_n_layers(copy_source, reference),
        lora=lora,
    )


def _check_architecture(named: list[tuple[str, Source]]) -> None:
    first_label, first = named[0]
    for label, s in named[1:]:
        for key in ("model_type", "architectures"):
            if s.config.get(key) != first.config.get(key):
                raise SftError(
                    f"{label}: {key} {s.config.get(key)} differs from {first_label}: {first.config.get(key)}; "
                    "merging needs models of one architecture"
                )


def _vocab_size(s: Source) -> int | None:
    v = s.config.get("vocab_size")
    if v is None and isinstance(s.config.get("text_config"), dict):
        v = s.config["text_config"].get("vocab_size")
    return v


def _check_tensors(named: list[tuple[str, Source]], cfg: MergeConfig) -> tuple[dict[str, int], int]:
    """Same names, dtypes kinds and shapes everywhere; returns vocabulary tensors -> shared rows, and rows out."""
    first_label, first = named[0]
    ref = first.specs()
    for label, s in named[1:]:
        specs = s.specs()
        missing = [n for n in ref if n not in specs]
        if missing:
            raise SftError(
                f"{label}: has no tensor {missing[0]}, which {first_label} has (different architecture?)"
            )
        extra = [n for n in specs if n not in ref]
        if extra:
            raise SftError(
                f"{label}: has tensor {extra[0]}, which {first_label} lacks (different architecture?)"
            )
    sizes = {label: _vocab_size(s) for label, s in named}
    vocab_rows: dict[str, int] = {}
    for name, spec in ref.items():
        shapes = {label: s.specs()[name].shape for label, s in named}
        for label, s in named[1:]:
            if (s.specs()[name].dtype in FLOAT_CODES) != (spec.dtype in FLOAT_CODES):
                raise SftError(
                    f"tensor {name}: {s.specs()[name].dtype} in {label} but {spec.dtype} in {first_label}"
                )
        if len(set(shapes.values())) == 1:
            continue
        is_vocab = all(len(sh) >= 1 and sh[0] == sizes[label] for label, sh in shapes.items()) and (
            len({sh[1:] for sh in shapes.values()}) == 1
        )
        other = next(label for label, sh in shapes.items() if sh != spec.shape)
        if not is_vocab:
            raise SftError(
                f"tensor {name}: shape {list(spec.shape)} in {first_label} but {list(shapes[other])} in {other}; "
                "the models do not share an architecture"
            )
        if cfg.vocab == "error":
            listed = ", ".join(f"{label}: {v}" for label, v in sizes.items())
            raise SftError(
                f"tensor {name}: vocabulary sizes differ ({listed}); set vocab: truncate (keep the shared rows) "
                "or vocab: extend (extra rows from copy_from)"
            )
        vocab_rows[name] = min(sh[0] for sh in shapes.values())
    valid = [v for v in sizes.values() if v is not None]
    out_rows = (min(valid) if cfg.vocab == "truncate" else max(valid)) if vocab_rows and valid else 0
    return vocab_rows, out_rows


def _copy_source(
    cfg: MergeConfig, base: Source | None, inputs: list[Source], labels: list[str]
) -> tuple[Source, str]:
    if cfg.method == "lora":
        return inputs[0], labels[0]
    choice = cfg.copy_from
    if choice == "base" or (choice is None and base is not None):
        if base is None:
            raise SftError("copy_from: base, but no 'base' is set")
        return base, f"base ({base.label})"
    i = int(choice) if choice is not None else 0
    if not 0 <= i < len(inputs):
        raise SftError(f"copy_from: {choice} is not an index into models (0..{len(inputs) - 1})")
    return inputs[i], labels[i]


def _output_dtype(cfg: MergeConfig, copy_source: Source) -> str:
    if cfg.dtype != "auto":
        return cfg.dtype
    # The dtype most of the copy source's floating-point bytes are stored in.
    totals: dict[str, int] = {}
    for spec in copy_source.specs().values():
        if spec.dtype in FLOAT_CODES:
            totals[spec.dtype] = totals.get(spec.dtype, 0) + spec.nbytes
    code = max(totals, key=lambda k: totals[k]) if totals else "F32"
    name = DTYPES[code][0]
    return name if name in ("float32", "bfloat16", "float16") else "float32"


def _n_layers(s: Source, specs: dict[str, TensorSpec]) -> int:
    text = s.config.get("text_config")
    cfg: dict[str, Any] = text if isinstance(text, dict) else s.config
    n = cfg.get("num_hidden_layers") or cfg.get("n_layer")
    if isinstance(n, int) and n > 0:
        return n
    found = [i for name in specs if (i := layer_index(name)) is not None]
    return max(found) + 1 if found else 1


def describe(plan: Plan) -> list[str]:
    """What the merge will do, in a few lines."""
    cfg = plan.cfg
    gb = sum(s.nbytes for s in plan.specs) / 1e9
    lines = [f"method: {cfg.method}{_params(cfg)}"]
    if plan.lora is not None:
        src = plan.lora
        ad = src.adapter
        quant = ad.quantization
        rt = src.quantization is not None
        lines.append(f"adapter: {ad.folder} ({len(ad.targets)} LoRA modules, {len(ad.replaced)} saved whole)")
        lines.append(f"base: {src.base.label} ({src.folder})")
        if quant is not None:
            kind = f"{quant.get('quant_type', 'nf4')}{' + double quant' if quant.get('double_quant') else ''}"
            state = "on" if rt else "off (qlora_roundtrip: false)"
            lines.append(
                f"QLoRA ({kind}): quantize→dequantize round trip of {len(src.quantized)} weights {state}"
            )
    else:
        if plan.base is not None:
            lines.append(f"base: {plan.base.label} ({plan.base.folder})")
        for i, (label, m) in enumerate(zip(plan.labels, cfg.models, strict=True)):
            extra = ""
            if cfg.method not in ("slerp", "model_stock"):
                extra = f"  weight {describe_setting(m.weight)}"
            if cfg.method in ("ties", "dare_linear", "dare_ties", "della", "della_linear"):
                extra += f"  density {describe_setting(cfg.density_setting(i))}"
            if cfg.method.startswith("della"):
                extra += f"  epsilon {describe_setting(cfg.epsilon_setting(i))}"
            kind = " [adapter on its base]" if isinstance(plan.inputs[i], AdapterSource) else ""
            lines.append(f"{label}{kind}{extra}")
    if plan.vocab_rows:
        common, rows = next(iter(plan.vocab_rows.values()))
        lines.append(f"vocab: {cfg.vocab}: {common} shared rows merged, {rows} written")
    size = cfg.max_shard_size
    shards = (
        "1 file"
        if gb * 1e9 <= size
        else f"shards of ≤ {size / 1e9:g} GB"
        if size >= 1e8
        else f"shards of ≤ {size} bytes"
    )
    lines.append(
        f"output: {plan.output} ({len(plan.specs)} tensors, {gb:.2f} GB {plan.out_dtype}, {shards}; "
        f"config from {plan.copy_source.folder}, tokenizer from {plan.tokenizer_folder})"
    )
    return lines


def _params(cfg: MergeConfig) -> str:
    m = cfg.method
    parts = []
    if m not in ("slerp", "model_stock", "lora"):
        parts.append(f"normalize {str(cfg.normalize_default()).lower()}")
    if m not in ("linear", "slerp", "model_stock", "lora"):
        parts.append(f"scale {cfg.scale:g}")
    if m in ("ties", "dare_linear", "dare_ties", "della", "della_linear"):
        parts.append(f"{cfg.semantics} semantics")
    if m.startswith(("dare", "della")):
        parts.append(f"seed {cfg.seed}, rescale {str(cfg.rescale).lower()}")
    if m == "model_stock" and cfg.filter_wise:
        parts.append("filter-wise")
    if m == "slerp":
        parts.append(f"t {describe_setting(cfg.t)}")
    return f" ({', '.join(parts)})" if parts else ""
