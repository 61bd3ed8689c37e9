"""The same merge as a mergekit configuration: for comparing outputs with mergekit (no torch, no mergekit here).

`to_mergekit(cfg)` gives the mapping mergekit 0.1.5's `mergekit-yaml` reads for the merge `cfg` describes:
method names are the same, `scale` is mergekit's `lambda`, SLERP's models[0] is mergekit's `base_model`,
per-model `weight` / `density` / `epsilon` go under each model's `parameters`, everything else under the
top-level `parameters`. Gradients and filtered values are written as mergekit writes them. The tests and
`bench/bench_vs_mergekit.py` run both tools on the result and compare the tensors.
"""

from __future__ import annotations

from typing import Any

from sft.errors import SftError
from sft.merge.config import MergeConfig
from sft.merge.params import Conditional, Setting


def _setting(value: Setting) -> Any:
    if isinstance(value, list) and value and isinstance(value[0], Conditional):
        return [
            {"value": c.value} | ({"filter": c.filter} if c.filter is not None else {})
            for c in value  # type: ignore[union-attr]
        ]
    return value


def to_mergekit(cfg: MergeConfig, resolve_path: Any = str) -> dict[str, Any]:
    """mergekit's configuration for `cfg`; `resolve_path` maps our model references to folders."""
    if cfg.method == "lora":
        raise SftError("method lora has no mergekit counterpart here (mergekit folds adapters itself)")
    if cfg.semantics != "mergekit" and "semantics" in cfg.model_fields_set:
        raise SftError("semantics: paper has no mergekit counterpart; compare with semantics: mergekit")
    m = cfg.method
    models = []
    for model in cfg.models:
        params: dict[str, Any] = {}
        if m not in ("slerp", "model_stock"):
            params["weight"] = _setting(model.weight)
        if model.density is not None:
            params["density"] = _setting(model.density)
        if model.epsilon is not None:
            params["epsilon"] = _setting(model.epsilon)
        models.append({"model": str(resolve_path(model.path))} | ({"parameters": params} if params else {}))
    top: dict[str, Any] = {}
    if m not in ("slerp", "model_stock"):
        top["normalize"] = cfg.normalize_default()
    if m not in ("linear", "slerp", "model_stock"):
        top["lambda"] = cfg.scale
    if cfg.density is not None:
        top["density"] = _setting(cfg.density)
    if m.startswith(("dare", "della")):
        top["rescale"] = cfg.rescale
    if m.startswith("della"):
        top["epsilon"] = _setting(cfg.epsilon)
    if m == "model_stock":
        top["filter_wise"] = cfg.filter_wise
    if m == "slerp":
        assert cfg.t is not None
        top["t"] = _setting(cfg.t)
    out: dict[str, Any] = {"merge_method": m, "models": models, "parameters": top, "dtype": "float32"}
    base = cfg.models[0].path if m == "slerp" else cfg.base
    if base is not None:
        out["base_model"] = str(resolve_path(base))
    out["out_dtype"] = "float32" if cfg.dtype == "auto" else cfg.dtype
    return out
