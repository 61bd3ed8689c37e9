"""`sft merge` against mergekit 0.1.5 itself (a dev dependency), run on the same inputs and the same config.

The inputs are small Llama-shaped checkpoints built to hit the cases where the two could differ: tensors of
odd sizes (5 x 7, 11 x 5), task vectors that cancel exactly between two models, and many equal magnitudes
(values on a grid of 1/8, exact in float32) so TIES' threshold falls inside a run of ties. Deterministic
methods must agree to 1e-6; DARE and DELLA draw their masks from different generators, so the test compares
what is the same by construction: the drop rate and the rescaled L1 norm.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from sft.merge.config import validate_merge_config
from sft.merge.mergekit import to_mergekit
from sft.merge.run import merge

LAYERS = 3


def llama_tensors(hidden: int, inter: int, vocab: int) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (hidden, hidden),
            p + "self_attn.k_proj.weight": (hidden, hidden),
            p + "self_attn.v_proj.weight": (hidden, hidden),
            p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
        }
    return shapes | {"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}


def write_model(folder: Path, tensors: dict[str, torch.Tensor], hidden: int, inter: int, vocab: int) -> None:
    folder.mkdir(parents=True)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": 1,
        "num_key_value_heads": 1,
        "head_dim": 4,  # metadata only (RoPE wants it even); no model is built from it
        "vocab_size": vocab,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def crafted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """base, a, b, c: odd sizes; a and b cancel exactly on a third of the entries; values on a 1/8 grid."""
    root = tmp_path_factory.mktemp("crafted")
    g = torch.Generator().manual_seed(0)
    shapes = llama_tensors(5, 7, 11)

    def grid(shape: tuple[int, ...], span: int) -> torch.Tensor:
        return torch.randint(-span, span + 1, shape, generator=g).float() / 8

    base = {n: grid(s, 16) for n, s in shapes.items()}
    tau_a = {n: grid(s, 3) for n, s in shapes.items()}
    tau_b = {}
    for n, s in shapes.items():
        t = grid(s, 3)
        cancel = torch.rand(s, generator=g) < 1 / 3
        tau_b[n] = torch.where(cancel, -tau_a[n], t)
    tau_c = {n: grid(s, 4) for n, s in shapes.items()}
    write_model(root / "base", base, 5, 7, 11)
    for name, tau in (("a", tau_a), ("b", tau_b), ("c", tau_c)):
        write_model(root / name, {n: base[n] + tau[n] for n in shapes}, 5, 7, 11)
    return root


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """base, a, b with ~100k entries each (normal task vectors): enough for drop-rate statistics."""
    root = tmp_path_factory.mktemp("wide")
    g = torch.Generator().manual_seed(1)
    shapes = llama_tensors(64, 96, 160)
    base = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    write_model(root / "base", base, 64, 96, 160)
    for name in ("a", "b"):
        write_model(
            root / name,
            {n: base[n] + 0.1 * torch.randn(s, generator=g) for n, s in shapes.items()},
            64,
            96,
            160,
        )
    return root


def run_both(
    root: Path, out: Path, raw: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Our merge and mergekit's of the same config; both outputs as state dicts."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    raw = {"output": str(out / "ours"), "verify": False, "dtype": "float32"} | raw
    cfg = validate_merge_config(raw)
    merge(cfg, log=lambda line: None)
    mk = to_mergekit(cfg, resolve_path=lambda p: root / p)
    run_merge(
        MergeConfiguration.model_validate(mk),
        str(out / "mergekit"),
        MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, random_seed=0),
    )
    return load_file(str(out / "ours" / "model.safetensors")), _mergekit_weights(out / "mergekit")


def _mergekit_weights(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out |= load_file(str(f))
    return out


def max_difference(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> float:
    assert set(ours) == set(theirs)
    return max(float((ours[n] - theirs[n]).abs().max()) for n in ours)


DETERMINISTIC = {
    "linear": {"method": "linear", "models": [{"path": "a", "weight": 0.3}, {"path": "b", "weight": 0.7}]},
    "task_arithmetic": {
        "method": "task_arithmetic",
        "base": "base",
        "models": [{"path": "a", "weight": 1.0}, {"path": "b", "weight": 0.5}],
        "scale": 0.8,
    },
    # density 0.55 of 25 entries: mergekit keeps int(13.75) = 13, the paper's round() would keep 14; the
    # exact cancellations of a and b give sums of exactly 0 (mergekit elects +).
    "ties": {"method": "ties", "base": "base", "models": ["a", "b"], "density": 0.55},
    "ties_three_weighted": {
        "method": "ties",
        "base": "base",
        "models": [{"path": "a", "weight": 0.5}, {"path": "b", "weight": 0.5, "density": 0.3}, "c"],
        "density": 0.7,
        "normalize": False,
    },
    "ties_gradients": {
        "method": "ties",
        "base": "base",
        "models": [{"path": "a", "weight": [1.0, 0.2]}, {"path": "b", "density": [0.2, 0.9, 0.5]}],
        "density": [{"filter": "mlp", "value": [0.3, 0.8]}, {"value": 0.6}],
    },
    "slerp": {"method": "slerp", "models": ["a", "b"], "t": 0.3},
    # embeddings, final norm and head take the first anchor, as in mergekit
    "slerp_list": {"method": "slerp", "models": ["a", "c"], "t": [0.1, 0.6, 0.9]},
    "slerp_gradients": {
        "method": "slerp",
        "models": ["a", "c"],
        "t": [
            {"filter": "self_attn", "value": [0.0, 0.5, 0.3, 0.7, 1.0]},
            {"filter": "mlp", "value": [1.0, 0.5, 0.7, 0.3, 0.0]},
            {"value": 0.5},
        ],
    },
    "model_stock": {"method": "model_stock", "base": "base", "models": ["a", "b", "c"]},
    "model_stock_filter_wise": {
        "method": "model_stock",
        "base": "base",
        "models": ["a", "c"],
        "filter_wise": True,
    },
}


@pytest.mark.parametrize("case", list(DETERMINISTIC))
def test_equals_mergekit(case: str, crafted: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(crafted)
    ours, theirs = run_both(crafted, tmp_path, DETERMINISTIC[case])
    assert max_difference(ours, theirs) <= 1e-6


def test_ties_paper_semantics_differs_where_documented(
    crafted: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The paper variant is not mergekit's: the outputs differ (kept count, ties, zero sums)."""
    monkeypatch.chdir(crafted)
    ours, theirs = run_both(crafted, tmp_path, DETERMINISTIC["ties"])
    raw = DETERMINISTIC["ties"] | {"semantics": "paper", "output": str(tmp_path / "paper"), "verify": False}
    merge(validate_merge_config(raw), log=lambda line: None)
    paper = load_file(str(tmp_path / "paper" / "model.safetensors"))
    assert max_difference(ours, theirs) <= 1e-6
    assert max_difference(paper, theirs) > 1e-3


@pytest.mark.parametrize("method", ["dare_linear", "della_linear"])
def test_random_methods_drop_and_rescale_like_mergekit(
    method: str, wide: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One model, weight 1: the output's task vector is the dropped and rescaled one. Its L1 norm equals the
    input's for every tensor (mergekit's rescale) in both tools, and both keep about `density` of it."""
    monkeypatch.chdir(wide)
    raw = {"method": method, "base": "base", "models": ["a"], "density": 0.4}
    if method == "della_linear":
        raw["epsilon"] = 0.2
    ours, theirs = run_both(wide, tmp_path, raw)
    base, a = (
        load_file(str(wide / "base" / "model.safetensors")),
        load_file(str(wide / "a" / "model.safetensors")),
    )
    kept = {}
    for tool, out in (("ours", ours), ("mergekit", theirs)):
        total = dropped = 0
        for n in base:
            tau, got = a[n] - base[n], out[n] - base[n]
            assert torch.allclose(got.abs().sum(), tau.abs().sum(), rtol=1e-4), (tool, n)
            dropped += int((out[n] == base[n]).sum())
            total += tau.numel()
        kept[tool] = 1 - dropped / total
    assert abs(kept["ours"] - 0.4) < 0.01 and abs(kept["mergekit"] - 0.4) < 0.01


def test_della_keeps_large_magnitudes_more_often(
    wide: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DELLA's keep probability runs from density − ε (smallest in a row) to density + ε (largest): the
    top quarter of magnitudes is kept ~0.475 of the time and the bottom quarter ~0.325 at 0.4 ± 0.1, in both."""
    monkeypatch.chdir(wide)
    ours, theirs = run_both(
        wide,
        tmp_path,
        {"method": "della_linear", "base": "base", "models": ["a"], "density": 0.4, "epsilon": 0.1},
    )
    base, a = (
        load_file(str(wide / "base" / "model.safetensors")),
        load_file(str(wide / "a" / "model.safetensors")),
    )
    for out in (ours, theirs):
        top = bottom = top_n = bottom_n = 0
        for n in base:
            if base[n].dim() != 2:
                continue
            tau = (a[n] - base[n]).abs()
            kept = out[n] != base[n]
            lo, hi = tau.quantile(0.25, dim=1, keepdim=True), tau.quantile(0.75, dim=1, keepdim=True)
            top += int(kept[tau >= hi].sum())
            top_n += int((tau >= hi).sum())
            bottom += int(kept[tau <= lo].sum())
            bottom_n += int((tau <= lo).sum())
        assert abs(top / top_n - 0.475) < 0.02 and abs(bottom / bottom_n - 0.325) < 0.02
