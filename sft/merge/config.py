"""The merge YAML: typed and validated before anything heavy is imported (no torch here).

One file says what goes in (an adapter, or several fine-tuned models and their base), how they are combined
(method and its parameters), and where the result goes. Dotted `key=value` overrides are applied on top;
a number in the path picks a list item (`models.1.weight=0.3`). Every problem becomes one `SftError` line.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sft.config import describe_validation_error, read_yaml_mapping
from sft.errors import SftError
from sft.merge.params import Setting, anchors

Method = Literal[
    "lora",
    "linear",
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "della",
    "della_linear",
    "model_stock",
    "slerp",
]
METHODS: tuple[str, ...] = get_args(Method)

# The parameters each method reads; setting another one is a mistake worth reporting.
_TASK = {"base", "normalize", "scale"}
_RANDOM = {"density", "seed", "rescale", "semantics", *_TASK}
METHOD_KEYS: dict[str, set[str]] = {
    "lora": {"adapter", "base"},
    "linear": {"models", "normalize"},
    "task_arithmetic": {"models", *_TASK},
    "ties": {"models", "density", "semantics", *_TASK},
    "dare_linear": {"models", *_RANDOM},
    "dare_ties": {"models", *_RANDOM},
    "della": {"models", "epsilon", *_RANDOM},
    "della_linear": {"models", "epsilon", *_RANDOM},
    "model_stock": {"models", "base", "filter_wise"},
    "slerp": {"models", "t"},
}
_METHOD_SPECIFIC = set().union(*METHOD_KEYS.values())
# Per-model keys and the methods that read them.
_USES_WEIGHT = {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "della", "della_linear"}
_USES_DENSITY = {"ties", "dare_linear", "dare_ties", "della", "della_linear"}
_RANDOM_METHODS = {"dare_linear", "dare_ties", "della", "della_linear"}
# normalize defaults, as mergekit 0.1.5 sets them per method
_NORMALIZED = {"linear", "ties", "della"}

DEFAULT_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Write a short poem about the sea.",
]

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(value: str | int) -> int:
    """'5GB' -> 5e9 bytes, '512MiB' -> 512 * 2**20; a bare integer is bytes."""
    if isinstance(value, int):
        return value
    m = _SIZE.match(value)
    if not m:
        raise ValueError(f"expected a size like 2GB or 500MiB, got {value!r}")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InputModel(_Section):
    path: str
    """`builtin:NAME`, a Hugging Face folder with safetensors weights, or a LoRA adapter folder."""
    weight: Setting = 1.0
    """How much this model counts (wᵢ): linear, task arithmetic, TIES, DARE, DELLA. A list varies it over
    the layers; a list of {filter, value} per tensor (sft/merge/params.py)."""
    density: Setting | None = None
    """TIES / DARE / DELLA: fraction of this model's task vector kept; overrides the top-level `density`."""
    epsilon: Setting | None = None
    """DELLA: overrides the top-level `epsilon`."""


class MergeConfig(_Section):
    method: Method
    output: str
    """Folder to write; it appears complete or not at all."""
    models: list[InputModel] = Field(default_factory=list)
    """Models to combine (every method but lora)."""
    adapter: str | None = None
    """lora: the adapter folder (peft files, plus sft_adapter.json when written by our trainer)."""
    base: str | None = None
    """The common base: task vectors are θᵢ − base. lora: defaults to the base the adapter records."""
    normalize: bool | None = None
    """Divide by the sum of weights. Default: true for linear, TIES and DARE-TIES; false otherwise."""
    scale: float = 1.0
    """λ applied to the combined task vector (task arithmetic, TIES, DARE)."""
    density: Setting | None = None
    """TIES: fraction of each task vector kept by magnitude. DARE / DELLA: keep probability (> 0)."""
    epsilon: Setting = 0.15
    """DELLA: keep probabilities run from density − epsilon (smallest magnitudes) to density + epsilon."""
    rescale: bool = True
    """DARE / DELLA: rescale what is kept (to the task vector's L1 norm; `semantics: paper`: 1/probability)."""
    semantics: Literal["mergekit", "paper"] = "mergekit"
    """Where mergekit and the papers differ (TIES ties and zero sums, DARE/DELLA rescale): docs/merge.md."""
    filter_wise: bool = False
    """Model Stock: one interpolation factor per row (output channel) instead of per tensor."""
    t: Setting | None = None
    """SLERP: 0 gives models[0], 1 gives models[1]; a list varies across layers (first to last)."""
    seed: int = 0
    """DARE / DELLA: the random drop is seeded per model and tensor, so reruns give the same model."""
    qlora_roundtrip: bool | None = None
    """Apply the NF4/FP4 quantize→dequantize round trip the training saw; default: on for QLoRA adapters."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """dtype of the written weights; auto: that of the model config and tokenizer come from. Math is fp32."""
    copy_from: str | int | None = None
    """Where config, generation config, tokenizer and chat template come from: 'base' or an index into
    models. Default: the base, else models[0]. lora: the base (tokenizer from the adapter when it has one)."""
    vocab: Literal["error", "truncate", "extend"] = "error"
    """Different vocabulary sizes: error; truncate to the smallest; extend to the largest (extra rows from
    copy_from, which must be that model)."""
    max_shard_size: int = 5 * 10**9
    """Largest output shard, in bytes or as '2GB' / '500MiB'."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the tensor math runs (tensors still stream one at a time)."""
    verify: bool | None = None
    """lora (default on): report max logit difference and KL between adapter model and merged model.
    Other methods (default off): load the merged model and generate from `prompts`."""
    prompts: list[str] = Field(default_factory=lambda: list(DEFAULT_PROMPTS))
    overwrite: bool = False
    """Replace an existing output folder (only once the new one is complete)."""
    dry_run: bool = False
    """Check everything and print the plan; write nothing."""

    @field_validator("models", mode="before")
    @classmethod
    def _paths_as_models(cls, v: Any) -> Any:
        # `models: [a, b]` is shorthand for `models: [{path: a}, {path: b}]`.
        if isinstance(v, list):
            return [{"path": x} if isinstance(x, str) else x for x in v]
        return v

    @field_validator("max_shard_size", mode="before")
    @classmethod
    def _size(cls, v: Any) -> Any:
        return parse_size(v) if isinstance(v, str) else v

    @field_validator("max_shard_size")
    @classmethod
    def _positive_size(cls, v: int) -> int:
        if v <= 0:
            raise ValueError("must be positive")
        return v

    @model_validator(mode="after")
    def _fits_method(self) -> MergeConfig:
        m = self.method
        unused = sorted((self.model_fields_set & _METHOD_SPECIFIC) - METHOD_KEYS[m])
        if unused:
            users = [k for k, v in METHOD_KEYS.items() if unused[0] in v]
            raise ValueError(
                f"'{unused[0]}' is not used by method {m} (only by {', '.join(users)}); remove it"
            )
        for i, model in enumerate(self.models):
            if "weight" in model.model_fields_set and m not in _USES_WEIGHT:
                raise ValueError(f"models.{i}.weight is not used by method {m}; remove it")
            if model.density is not None and m not in _USES_DENSITY:
                raise ValueError(f"models.{i}.density is not used by method {m}; remove it")
            if model.epsilon is not None and not m.startswith("della"):
                raise ValueError(f"models.{i}.epsilon is not used by method {m} (only by DELLA); remove it")
        if m == "lora":
            if not self.adapter:
                raise ValueError("method lora needs 'adapter: PATH' (the adapter folder)")
            if self.copy_from not in (None, "base"):
                raise ValueError("copy_from: lora takes config from the base; leave copy_from unset")
            return self
        need = 2 if m in ("linear", "slerp", "model_stock") else 1
        if len(self.models) < need:
            raise ValueError(f"method {m} needs at least {need} entries under 'models'")
        if m not in ("linear", "slerp") and not self.base:
            raise ValueError(f"method {m} combines task vectors θᵢ − base; set 'base: PATH'")
        if m == "slerp":
            self._check_slerp()
        if m in _USES_DENSITY:
            self._check_density()
        if self.normalize_default():
            weights = [x.weight for x in self.models]
            if m in ("ties", "dare_ties", "della") and any(min(anchors(w)) <= 0 for w in weights):
                raise ValueError(f"{m} with normalize: true needs positive weights; set normalize: false")
            if all(isinstance(w, float | int) for w in weights) and abs(sum(weights)) < 1e-12:  # type: ignore[arg-type]
                raise ValueError("weights sum to 0, so normalize cannot divide by them; set normalize: false")
        if isinstance(self.copy_from, str) and self.copy_from != "base" and not self.copy_from.isdigit():
            raise ValueError("copy_from: expected 'base' or an index into models (0, 1, ...)")
        return self

    def _check_slerp(self) -> None:
        if len(self.models) != 2:
            raise ValueError("method slerp interpolates exactly two models; list two under 'models'")
        if self.t is None:
            raise ValueError("method slerp needs 't' (0..1, or a list of values across layers)")
        values = anchors(self.t)
        if not values or any(not 0 <= x <= 1 for x in values):
            raise ValueError(f"t: values must lie in [0, 1] (got {self.t})")

    def _check_density(self) -> None:
        random = self.method in _RANDOM_METHODS
        top = anchors(self.density)
        if any(not 0 <= x <= 1 for x in top):
            raise ValueError(f"density: values must lie in [0, 1] (got {self.density})")
        for i, model in enumerate(self.models):
            own = anchors(model.density)
            if any(not 0 <= x <= 1 for x in own):
                raise ValueError(f"models.{i}.density: values must lie in [0, 1] (got {model.density})")
            values = own or top
            if not values:
                raise ValueError(f"method {self.method} needs 'density' (top level or models.{i}.density)")
            if random and min(values) == 0 and self.rescale:
                raise ValueError(f"models.{i}: {self.method} rescales what it keeps, so density must be > 0")
            if self.method.startswith("della"):
                eps = anchors(model.epsilon) or anchors(self.epsilon)
                for d in values:
                    if d < 1 and any(not (d - e > 0 and d + e < 1) for e in eps):
                        raise ValueError(
                            f"models.{i}: DELLA keeps with probabilities density ± epsilon, which must lie in "
                            f"(0, 1) (density {d:g}, epsilon {max(eps):g}); lower epsilon"
                        )

    def normalize_default(self) -> bool:
        """The `normalize` in effect: explicit, else the method's default (mergekit's)."""
        if self.normalize is not None:
            return self.normalize
        return self.method in _NORMALIZED

    def density_setting(self, i: int) -> Setting:
        d = self.models[i].density
        return d if d is not None else (self.density if self.density is not None else 1.0)

    def epsilon_setting(self, i: int) -> Setting:
        e = self.models[i].epsilon
        return e if e is not None else self.epsilon

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


# ---------------------------------------------------------------- loading, overrides, errors


def load_merge_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> MergeConfig:
    """Read the merge YAML (or start empty when path is None or ''), apply overrides, validate."""
    where = str(path) if path else "merge config"
    raw: dict[str, Any] = {}
    if path:
        raw = read_yaml_mapping(
            Path(path), "merge config", "a merge config is a mapping (method:, models:, output: ...)"
        )
    for item in overrides:
        apply_override(raw, item)
    return validate_merge_config(raw, where)


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply `a.b=value` (value parsed as YAML); a numeric part indexes a list: `models.0.weight=0.5`."""
    if "=" not in item:
        raise SftError(f"override '{item}': expected key=value, for example method=ties")
    key, _, text = item.partition("=")
    parts = [p for p in key.strip().split(".")]
    if not all(parts):
        raise SftError(f"override '{item}': the key is empty or has an empty part")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    node: Any = raw
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise SftError(f"override '{item}': '{part}' is not an index of the {len(node)} list items")
            idx = int(part)
            if last:
                node[idx] = value
                return
            if isinstance(node[idx], str) and parts[depth - 1] == "models":
                node[idx] = {"path": node[idx]}  # `models: [a, b]` shorthand, then models.0.weight=...
            node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = value
                return
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        else:
            raise SftError(f"override '{item}': '{parts[depth - 1]}' is a value, not a section or list")


def validate_merge_config(raw: dict[str, Any], where: str = "merge config") -> MergeConfig:
    try:
        return MergeConfig.model_validate(raw)
    except ValidationError as e:
        raise SftError(describe_validation_error(e, where, MergeConfig)) from None
