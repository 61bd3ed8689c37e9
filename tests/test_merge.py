"""The merge stage on tiny random Llama models: config, streaming I/O, every method end to end, the checks,
atomic output, LoRA / DoRA / QLoRA against peft and bitsandbytes, and the streaming memory bound."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sft.errors import SftError
from sft.merge import methods, run_merge
from sft.merge.config import MergeConfig, load_merge_config, parse_size, validate_merge_config
from sft.merge.run import merge
from sft.safetensors_io import Checkpoint, ShardedWriter, TensorSpec
from tests.conftest import QUANT

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- tiny models


def tiny_config(**overrides: Any) -> Any:
    from transformers import LlamaConfig

    kw = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    return LlamaConfig(**(kw | overrides))


def save_tokenizer(folder: Path, vocab_size: int = 64) -> None:
    """A word-level tokenizer over w0..wN so tiny models can be prompted."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size - 2)} | {"[UNK]": vocab_size - 2, "[EOS]": vocab_size - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]", pad_token="[EOS]"
    )
    fast.save_pretrained(folder)


def save_model(folder: Path, seed: int, like: Path | None = None, noise: float = 0.02, **config: Any) -> Path:
    """A tiny Llama: random, or `like` another folder plus seeded noise (a stand-in fine-tune)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(**config))
    if like is not None:
        model.load_state_dict(load_file(like / "model.safetensors"), strict=False)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * noise)
    model.save_pretrained(str(folder))
    save_tokenizer(folder, model.config.vocab_size)
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    base = save_model(root / "base", 0)
    return {
        "base": base,
        "a": save_model(root / "a", 1, like=base),
        "b": save_model(root / "b", 2, like=base),
    }


def weights(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out |= load_file(f)
    return out


def cfg(**kw: Any) -> MergeConfig:
    kw.setdefault("verify", False)
    return validate_merge_config(json.loads(json.dumps(kw, default=str)))  # Paths -> strings, at any depth


def quiet(line: str) -> None:
    pass


# ---------------------------------------------------------------- config


def test_config_validation_messages() -> None:
    def err(raw: dict[str, Any]) -> str:
        with pytest.raises(SftError) as e:
            validate_merge_config(raw)
        return str(e.value)

    ok = {"method": "ties", "models": ["a", "b"], "base": "c", "density": 0.5, "output": "o"}
    assert validate_merge_config(ok).models[1].path == "b"
    assert "did you mean 'density'" in err(ok | {"densty": 0.5})
    assert "did you mean 'models.0.weight'" in err(ok | {"models": [{"path": "a", "wieght": 1}]})
    assert "'t' is not used by method ties" in err(ok | {"t": 0.5})
    assert "set 'base: PATH'" in err({k: v for k, v in ok.items() if k != "base"})
    assert "needs 'density'" in err({k: v for k, v in ok.items() if k != "density"})
    assert "'output' is required" in err({k: v for k, v in ok.items() if k != "output"})
    assert "density must be > 0" in err(ok | {"method": "dare_linear", "density": 0.0})
    assert "lower epsilon" in err(ok | {"method": "della", "density": 0.1, "epsilon": 0.2})
    assert "'epsilon' is not used by method ties" in err(ok | {"epsilon": 0.1})
    assert "models.1.density: values must lie in [0, 1]" in err(
        ok | {"models": ["a", {"path": "b", "density": [0.5, 1.2]}]}
    )
    assert "exactly two" in err({"method": "slerp", "models": ["a", "b", "c"], "t": 0.5, "output": "o"})
    assert "needs 't'" in err({"method": "slerp", "models": ["a", "b"], "output": "o"})
    assert "[0, 1]" in err({"method": "slerp", "models": ["a", "b"], "t": [0, 1.5], "output": "o"})
    assert "models.0.weight is not used" in err(
        {"method": "slerp", "models": [{"path": "a", "weight": 2}, "b"], "t": 0.5, "output": "o"}
    )
    assert "sum to 0" in err(
        {
            "method": "linear",
            "models": [{"path": "a", "weight": 1}, {"path": "b", "weight": -1}],
            "output": "o",
        }
    )
    assert "needs 'adapter" in err({"method": "lora", "output": "o"})
    assert "'models' is not used by method lora" in err(
        {"method": "lora", "adapter": "x", "models": ["a"], "output": "o"}
    )
    assert "max_shard_size" in err(ok | {"max_shard_size": "lots"})
    assert "method" in err(ok | {"method": "magic"})


def test_sizes_and_overrides(tmp_path: Path) -> None:
    assert parse_size("2GB") == 2 * 10**9 and parse_size("500MiB") == 500 * 2**20 and parse_size(123) == 123
    path = tmp_path / "m.yaml"
    path.write_text("method: linear\nmodels: [a, b]\noutput: out\n")
    c = load_merge_config(
        path, ["models.1.weight=3", "dtype=bfloat16", "max_shard_size=1GB", "models.0.path=z"]
    )
    assert [m.weight for m in c.models] == [1.0, 3.0] and c.models[0].path == "z"
    assert c.dtype == "bfloat16" and c.max_shard_size == 10**9
    with pytest.raises(SftError, match="not an index"):
        load_merge_config(path, ["models.5.weight=1"])
    with pytest.raises(SftError, match="expected key=value"):
        load_merge_config(path, ["oops"])
    c = load_merge_config(None, ["method=slerp", "models=[a, b]", "t=0.3", "output=o"])
    assert c.t == 0.3
    path.write_text("method: [unclosed\n")
    with pytest.raises(SftError, match="not valid YAML"):
        load_merge_config(path)
    with pytest.raises(SftError, match="not found"):
        load_merge_config(tmp_path / "nope.yaml")


def test_recipes_validate() -> None:
    recipes = sorted((REPO / "recipes").glob("merge_*.yaml"))
    assert len(recipes) >= 5
    for path in recipes:
        load_merge_config(path)


def test_config_and_package_import_no_torch() -> None:
    code = (
        "import sys; import sft.merge; from sft.merge.config import load_merge_config; "
        "load_merge_config(None, ['method=linear', 'models=[a, b]', 'output=o']); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# ---------------------------------------------------------------- streaming I/O


def test_writer_output_reads_back_with_safetensors(tmp_path: Path) -> None:
    tensors = {
        "a": torch.randn(3, 5),
        "b.bf16": torch.randn(7).bfloat16(),
        "c.f16": torch.randn(2, 2, 2).half(),
        "d.int": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "e.bool": torch.tensor([True, False, True]),
        "f.scalar": torch.tensor(3.5),
        "g.empty": torch.zeros(0, 4),
    }
    specs = [
        TensorSpec(n, {v: k for k, v in _codes().items()}[t.dtype], tuple(t.shape))
        for n, t in tensors.items()
    ]
    writer = ShardedWriter(tmp_path, specs, max_shard_bytes=40)
    for name, t in tensors.items():
        writer.write(name, t)
    writer.finish()
    assert len(writer.files) > 1 and writer.peak_pending_bytes == max(s.nbytes for s in specs)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    for name, t in tensors.items():
        with safe_open(str(tmp_path / index["weight_map"][name]), "pt") as f:
            assert torch.equal(f.get_tensor(name), t)
    with Checkpoint(tmp_path) as ck:  # and our reader reads them back too
        for name, t in tensors.items():
            assert torch.equal(ck.read(name), t)


def _codes() -> dict[str, torch.dtype]:
    return {
        "F32": torch.float32,
        "BF16": torch.bfloat16,
        "F16": torch.float16,
        "I64": torch.int64,
        "BOOL": torch.bool,
    }


def test_writer_refuses_out_of_plan(tmp_path: Path) -> None:
    writer = ShardedWriter(tmp_path, [TensorSpec("x", "F32", (2,)), TensorSpec("y", "F32", (2,))], 10**6)
    with pytest.raises(RuntimeError, match="expected x"):
        writer.write("y", torch.zeros(2))
    writer.write("x", torch.zeros(2))
    with pytest.raises(RuntimeError, match="never written"):
        writer.finish()
    writer.abort()


def test_reader_errors(tmp_path: Path) -> None:
    save_file({"w": torch.randn(100)}, str(tmp_path / "model.safetensors"))
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-20])
    with pytest.raises(SftError, match="truncated"):
        Checkpoint(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(SftError, match="safetensors only"):
        Checkpoint(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "model-00001-of-00002.safetensors"}})
    )
    with pytest.raises(SftError, match="model-00001-of-00002.safetensors: missing"):
        Checkpoint(tmp_path)


# ---------------------------------------------------------------- methods end to end


def expected_merge(c: MergeConfig, tiny: dict[str, Path]) -> dict[str, torch.Tensor]:
    """The same math applied to whole state dicts loaded with safetensors: checks the streaming plumbing."""
    models = [weights(tiny[m.path.rsplit("/", 1)[-1]]) for m in c.models]
    base = weights(tiny["base"])
    w = [m.weight for m in c.models]
    d = [float(c.density_setting(i)) for i in range(len(c.models))]  # type: ignore[arg-type]
    out = {}
    for name in base:
        ts = [m[name] for m in models]
        if c.method == "linear":
            out[name] = methods.linear(ts, w, c.normalize_default())
        elif c.method == "task_arithmetic":
            out[name] = methods.task_arithmetic(base[name], ts, w, c.scale, c.normalize_default())
        elif c.method == "ties":
            out[name] = methods.ties(base[name], ts, w, d, c.scale, c.normalize_default())
        elif c.method.startswith("dare"):
            gens = [methods.seeded_generator(c.seed, i, name) for i in range(len(ts))]
            out[name] = methods.dare(
                base[name], ts, w, d, c.scale, c.normalize_default(), gens, c.method == "dare_ties"
            )
        else:
            out[name] = methods.slerp(ts[0], ts[1], c.t)  # type: ignore[arg-type]
    return out


@pytest.mark.parametrize(
    "extra",
    [
        {"method": "linear", "models": [{"path": "a", "weight": 2}, "b"]},
        {"method": "task_arithmetic", "base": "base", "scale": 0.8},
        {"method": "ties", "base": "base", "density": 0.4},
        {"method": "dare_linear", "base": "base", "density": 0.6, "seed": 3},
        {
            "method": "dare_ties",
            "base": "base",
            "density": 0.6,
            "models": ["a", {"path": "b", "density": 0.9}],
        },
        {"method": "slerp", "t": 0.3},
    ],
    ids=lambda e: e["method"],
)
def test_each_method_end_to_end(
    tiny: dict[str, Path], tmp_path: Path, extra: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoModelForCausalLM

    # Paths in the YAML are relative to the working directory, as in recipes.
    monkeypatch.chdir(tiny["base"].parent)
    c = cfg(**({"models": ["a", "b"], "output": str(tmp_path / "out"), "max_shard_size": 30_000} | extra))
    result = merge(c, log=quiet)
    assert result.shards > 1 and (result.output / "model.safetensors.index.json").is_file()
    got = weights(result.output)
    want = expected_merge(c, tiny)
    assert set(got) == set(want)
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-6), name
    model = AutoModelForCausalLM.from_pretrained(result.output)
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 64)
    record = json.loads((result.output / "sft_merge.json").read_text())
    assert record["method"] == c.method and (result.output / "tokenizer.json").is_file()


def test_bf16_output_and_generation_check(tiny: dict[str, Path], tmp_path: Path) -> None:
    lines: list[str] = []
    c = cfg(
        method="linear",
        models=[tiny["a"], tiny["b"]],
        output=tmp_path / "o",
        dtype="bfloat16",
        verify=True,
        prompts=["w1 w2 w3"],
    )
    result = merge(c, log=lines.append)
    assert all(t.dtype == torch.bfloat16 for t in weights(result.output).values())
    assert json.loads((result.output / "config.json").read_text())["dtype"] == "bfloat16"
    assert "w1 w2 w3" in result.report["generations"]
    assert any(str(result.output) in line for line in lines)  # the result's location is printed


def test_slerp_t_varies_by_layer(tiny: dict[str, Path], tmp_path: Path) -> None:
    result = merge(
        cfg(method="slerp", models=[tiny["a"], tiny["b"]], t=[0.0, 1.0], output=tmp_path / "o"), log=quiet
    )
    got, a, b = weights(result.output), weights(tiny["a"]), weights(tiny["b"])
    # t runs from 0 at layer 0 to 1 at the last layer; as in mergekit, every tensor outside the decoder
    # layers (embeddings, final norm, head) takes the first value.
    for name in got:
        if ".layers.0." in name or "embed_tokens" in name or name in ("model.norm.weight", "lm_head.weight"):
            assert torch.allclose(got[name], a[name], atol=1e-6), name
        elif ".layers.2." in name:
            assert torch.allclose(got[name], b[name], atol=1e-6), name
        else:  # layer 1: t = 0.5
            assert torch.allclose(got[name], methods.slerp(a[name], b[name], 0.5), atol=1e-6), name


# ---------------------------------------------------------------- checks before writing


def test_incompatible_models_name_the_tensor(tiny: dict[str, Path], tmp_path: Path) -> None:
    wide = save_model(tmp_path / "wide", 3, intermediate_size=48)
    with pytest.raises(
        SftError, match=r"tensor model\.layers\.0\.mlp\.down_proj\.weight: shape \[32, 64\].*\[32, 48\]"
    ):
        merge(cfg(method="linear", models=[tiny["a"], wide], output=tmp_path / "o"), log=quiet)
    deep = save_model(tmp_path / "deep", 3, num_hidden_layers=4)
    with pytest.raises(SftError, match=r"has tensor model\.layers\.3\..*which models\.0 .* lacks"):
        merge(cfg(method="linear", models=[tiny["a"], deep], output=tmp_path / "o"), log=quiet)
    other = tmp_path / "other"
    shutil.copytree(tiny["b"], other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(
        json.dumps(config | {"model_type": "mistral", "architectures": ["MistralForCausalLM"]})
    )
    with pytest.raises(SftError, match="model_type mistral differs"):
        merge(cfg(method="linear", models=[tiny["a"], other], output=tmp_path / "o"), log=quiet)
    assert not (tmp_path / "o").exists()


def test_vocab_policies(tiny: dict[str, Path], tmp_path: Path) -> None:
    big = save_model(tmp_path / "big", 4, vocab_size=66)
    models = [tiny["a"], big]
    with pytest.raises(SftError, match=r"vocabulary sizes differ .*64.*66.*vocab: truncate"):
        merge(cfg(method="linear", models=models, output=tmp_path / "o"), log=quiet)

    r = merge(cfg(method="linear", models=models, output=tmp_path / "t", vocab="truncate"), log=quiet)
    got, a, b = weights(r.output), weights(tiny["a"]), weights(big)
    assert got["model.embed_tokens.weight"].shape == (64, 32)
    assert torch.allclose(
        got["lm_head.weight"], (a["lm_head.weight"] + b["lm_head.weight"][:64]) / 2, atol=1e-6
    )
    assert json.loads((r.output / "config.json").read_text())["vocab_size"] == 64

    with pytest.raises(SftError, match="copy_from: vocab: extend writes 66 rows"):
        merge(cfg(method="linear", models=models, output=tmp_path / "e", vocab="extend"), log=quiet)
    r = merge(
        cfg(method="linear", models=models, output=tmp_path / "e", vocab="extend", copy_from=1), log=quiet
    )
    got = weights(r.output)
    emb = got["model.embed_tokens.weight"]
    assert emb.shape == (66, 32) and torch.equal(emb[64:], b["model.embed_tokens.weight"][64:])
    assert torch.allclose(
        emb[:64], (a["model.embed_tokens.weight"] + b["model.embed_tokens.weight"][:64]) / 2, atol=1e-6
    )
    assert json.loads((r.output / "config.json").read_text())["vocab_size"] == 66


def test_missing_inputs_fail_before_writing(tiny: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "deep" / "out"
    with pytest.raises(SftError, match="models.1: .*nope: folder not found"):
        merge(cfg(method="linear", models=[tiny["a"], tmp_path / "nope"], output=out), log=quiet)
    broken = tmp_path / "broken"
    shutil.copytree(tiny["b"], broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(SftError, match="no model.safetensors"):
        merge(cfg(method="linear", models=[tiny["a"], broken], output=out), log=quiet)
    (broken / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "model-00002-of-00002.safetensors"}})
    )
    with pytest.raises(SftError, match="model-00002-of-00002.safetensors: missing"):
        merge(
            cfg(method="task_arithmetic", base=tiny["base"], models=[tiny["a"], broken], output=out),
            log=quiet,
        )
    with pytest.raises(SftError, match="is also an input"):
        merge(
            cfg(method="linear", models=[tiny["a"], tiny["b"]], output=tiny["b"], overwrite=True), log=quiet
        )
    assert not out.parent.exists()  # nothing at all was written


def test_output_is_complete_or_absent(
    tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    c = cfg(method="linear", models=[tiny["a"], tiny["b"]], output=out, max_shard_size=20_000)
    calls = {"n": 0}
    real = methods.linear

    def failing(*args: Any, **kw: Any) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 12:
            raise RuntimeError("disk on fire")
        return real(*args, **kw)

    monkeypatch.setattr(methods, "linear", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        merge(c, log=quiet)
    assert calls["n"] == 12 and not out.exists() and not list(tmp_path.glob(".out.*"))

    monkeypatch.setattr(methods, "linear", real)
    first = merge(c, log=quiet).output
    with pytest.raises(SftError, match="already exists; set overwrite: true"):
        merge(c, log=quiet)
    before = weights(first)

    # A failing overwrite leaves the old output untouched ...
    calls["n"] = 0
    monkeypatch.setattr(methods, "linear", failing)
    c2 = cfg(
        method="linear", models=[{"path": str(tiny["a"]), "weight": 3}, tiny["b"]], output=out, overwrite=True
    )
    with pytest.raises(RuntimeError):
        merge(c2, log=quiet)
    assert all(torch.equal(before[k], v) for k, v in weights(out).items())
    # ... and a successful one replaces it; a stale partial folder from a crash is cleared first.
    monkeypatch.setattr(methods, "linear", real)
    (tmp_path / ".out.partial").mkdir()
    (tmp_path / ".out.partial" / "junk").write_text("x")
    merge(c2, log=quiet)
    assert not torch.equal(before["lm_head.weight"], weights(out)["lm_head.weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_dry_run_writes_nothing(tiny: dict[str, Path], tmp_path: Path) -> None:
    lines: list[str] = []
    r = merge(
        cfg(
            method="ties",
            base=tiny["base"],
            models=[tiny["a"], tiny["b"]],
            density=0.5,
            output=tmp_path / "o",
            dry_run=True,
        ),
        lines.append,
    )
    assert not r.output.exists() and any("dry run" in line for line in lines)
    assert any(line.startswith("method: ties") for line in lines)


def test_run_merge_from_yaml(tiny: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / "merge.yaml"
    path.write_text(
        textwrap.dedent(f"""\
        method: task_arithmetic
        base: {tiny["base"]}
        models:
          - path: {tiny["a"]}
            weight: 0.5
          - {tiny["b"]}
        output: {tmp_path / "out"}
        verify: false
        """)
    )
    out = run_merge(str(path), ["models.1.weight=0.25"])
    assert out == tmp_path / "out" and (out / "model.safetensors").is_file()
    assert json.loads((out / "sft_merge.json").read_text())["config"]["models"][1]["weight"] == 0.25


# ---------------------------------------------------------------- LoRA, DoRA, QLoRA on tiny models


def make_adapter(
    base: Path, folder: Path, seed: int = 0, quant: dict[str, Any] | None = None, **lora: Any
) -> Path:
    """A peft adapter with random (nonzero) B, magnitudes and saved modules, plus sft_adapter.json."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base), LoraConfig(**({"r": 4, "lora_alpha": 8} | lora))
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if (
                "lora_B" in name
                or "lora_embedding_B" in name
                or "magnitude" in name
                or "modules_to_save" in name
            ):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(str(folder))
    (folder / "sft_adapter.json").write_text(json.dumps({"base_model": str(base), "quantization": quant}))
    return folder


def peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload()
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "lora",
    [
        {
            "target_modules": "all-linear",
            "rank_pattern": {"q_proj": 2},
            "alpha_pattern": {"v_proj": 3},
            "modules_to_save": ["lm_head"],
        },
        {"target_modules": ["q_proj", "v_proj", "embed_tokens"], "use_rslora": True},
        {"target_modules": "all-linear", "use_dora": True},
    ],
    ids=["patterns+saved", "embedding+rslora", "dora"],
)
def test_lora_merge_equals_peft(tiny: dict[str, Path], tmp_path: Path, lora: dict[str, Any]) -> None:
    adapter = make_adapter(tiny["base"], tmp_path / "adapter", **lora)
    result = merge(cfg(method="lora", adapter=adapter, output=tmp_path / "o"), log=quiet)
    got, want = weights(result.output), peft_merged(tiny["base"], adapter)
    assert set(got) == set(want)
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-6), name
    assert not torch.equal(
        got["model.layers.0.self_attn.q_proj.weight"],
        weights(tiny["base"])["model.layers.0.self_attn.q_proj.weight"],
    )


def test_lora_bias_merge_equals_peft(tmp_path: Path) -> None:
    base = save_model(tmp_path / "biased", 5, attention_bias=True)
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "v_proj"], lora_bias=True)
    got = weights(merge(cfg(method="lora", adapter=adapter, output=tmp_path / "o"), log=quiet).output)
    want = peft_merged(base, adapter)
    assert not torch.equal(
        want["model.layers.1.self_attn.q_proj.bias"], weights(base)["model.layers.1.self_attn.q_proj.bias"]
    )
    assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in want)


def test_lora_verify_report_and_adapter_as_merge_input(tiny: dict[str, Path], tmp_path: Path) -> None:
    adapter = make_adapter(tiny["base"], tmp_path / "adapter", target_modules="all-linear")
    lines: list[str] = []
    # verify defaults to on for lora; the base comes from sft_adapter.json
    r = merge(
        validate_merge_config(
            {
                "method": "lora",
                "adapter": str(adapter),
                "output": str(tmp_path / "o"),
                "prompts": ["w1 w5 w9 w2"],
            }
        ),
        lines.append,
    )
    assert r.report["max_abs_logit_diff"] <= 1e-4 and r.report["mean_kl"] < 1e-6 and r.report["tokens"] == 4
    assert any("max |Δlogit|" in line for line in lines)
    # An adapter folder also works as an input of the other methods: base + 1·(adapter model − base).
    r2 = merge(
        cfg(method="task_arithmetic", base=tiny["base"], models=[adapter], output=tmp_path / "ta"), log=quiet
    )
    got, want = weights(r2.output), weights(r.output)
    assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in want)


def test_adapter_errors(tiny: dict[str, Path], tmp_path: Path) -> None:
    adapter = make_adapter(tiny["base"], tmp_path / "adapter", target_modules="all-linear")
    wide = save_model(tmp_path / "wide", 3, intermediate_size=48)
    with pytest.raises(
        SftError, match=r"mlp\.down_proj: lora_A \[4, 64\].*do not fit.*is this the adapter's base"
    ):
        merge(cfg(method="lora", adapter=adapter, base=wide, output=tmp_path / "o"), log=quiet)
    with pytest.raises(SftError, match="was not trained with quantization"):
        merge(cfg(method="lora", adapter=adapter, output=tmp_path / "o", qlora_roundtrip=True), log=quiet)
    with pytest.raises(SftError, match="no adapter_config.json"):
        merge(cfg(method="lora", adapter=tiny["a"], output=tmp_path / "o"), log=quiet)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(config | {"init_lora_weights": "pissa"}))
    with pytest.raises(SftError, match="also changes the base weights"):
        merge(cfg(method="lora", adapter=adapter, output=tmp_path / "o"), log=quiet)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(SftError, match="adapter_model.safetensors is missing"):
        merge(cfg(method="lora", adapter=adapter, output=tmp_path / "o"), log=quiet)
    assert not (tmp_path / "o").exists()


def load_4bit(folder: Path, dtype: torch.dtype = torch.float32) -> Any:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from sft.merge.verify import disable_cpu_repack

    qc = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=qc, device_map="cpu", dtype=dtype
    )
    disable_cpu_repack(model)
    return model


@pytest.mark.parametrize("load_dtype", [None, "bfloat16"])
def test_qlora_round_trip_matches_a_real_4bit_load(tiny: dict[str, Path], load_dtype: str | None) -> None:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    from sft.merge.lora import quant_roundtrip, quantized_weight_names

    # None: the base loaded as stored (fp32); "bfloat16": loaded in bf16, recorded as quantization.dtype.
    quant = QUANT | ({"dtype": load_dtype} if load_dtype else {})
    model = load_4bit(tiny["base"], getattr(torch, load_dtype or "float32"))
    layers = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    # Exactly the layers a 4-bit load quantizes (decoder Linear layers, not embeddings, head or norms) ...
    assert set(layers) == quantized_weight_names(tiny["base"], quant)
    assert "lm_head.weight" not in layers and len(layers) == 3 * 7
    # ... and bit for bit the weights those layers compute with.
    raw = weights(tiny["base"])
    for name, m in layers.items():
        state = m.weight.quant_state  # type: ignore[attr-defined]
        deq = bnbf.dequantize_4bit(m.weight.data, state).to(m.compute_dtype or torch.float32).float()
        assert torch.equal(deq, quant_roundtrip(raw[name], quant)), name


def test_qlora_merge_reproduces_the_4bit_adapter_model(tiny: dict[str, Path], tmp_path: Path) -> None:
    adapter = make_adapter(tiny["base"], tmp_path / "adapter", quant=QUANT, target_modules="all-linear")
    prompts = ["w1 w2 w3 w4 w5", "w9 w8 w7"]
    rt = merge(
        validate_merge_config(
            {"method": "lora", "adapter": str(adapter), "output": str(tmp_path / "rt"), "prompts": prompts}
        ),
        quiet,
    )
    plain = merge(
        validate_merge_config(
            {
                "method": "lora",
                "adapter": str(adapter),
                "output": str(tmp_path / "p"),
                "prompts": prompts,
                "qlora_roundtrip": False,
            }
        ),
        quiet,
    )
    assert rt.report["max_abs_logit_diff"] < 1e-4
    assert rt.report["max_abs_logit_diff"] < plain.report["max_abs_logit_diff"] / 10
    assert rt.report["mean_kl"] < plain.report["mean_kl"]


# ---------------------------------------------------------------- streaming memory


RSS_SCRIPT = r"""
import json, re, sys, resource
from pathlib import Path
import torch
from sft.merge.config import validate_merge_config
from sft.merge.run import merge

root = Path(sys.argv[1])
def kib(field):
    return int(re.search(field + r":\s+(\d+)", Path("/proc/self/status").read_text()).group(1))
def run(out, base, models):
    c = validate_merge_config({"method": "ties", "base": str(root / base), "models": models, "density": 0.5,
                               "output": str(root / out), "max_shard_size": "64MiB", "verify": False})
    return merge(c, log=lambda line: None)
run("warm", "small_base", [str(root / "small_a"), str(root / "small_b")])   # import and warm every code path first
before = kib("VmRSS")
try:
    Path("/proc/self/clear_refs").write_text("5")   # reset the high-water mark
    peak_of = lambda: kib("VmHWM")
except OSError:
    peak_of = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
r = run("out", "base", [str(root / "a"), str(root / "b")])
print(json.dumps({"increase": (peak_of() - before) * 1024, "peak_tensor_bytes": r.peak_tensor_bytes,
                  "writer_peak_bytes": r.writer_peak_bytes, "bytes": r.bytes_written}))
"""


def synthetic_model(folder: Path, n: int, shape: tuple[int, int], seed: int) -> None:
    """A model-shaped folder of n float32 tensors, written one tensor at a time."""
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps({"model_type": "synthetic", "architectures": ["Synthetic"]})
    )
    specs = [TensorSpec(f"layers.{i}.weight", "F32", shape) for i in range(n)]
    writer = ShardedWriter(folder, specs, 64 * 2**20)
    g = torch.Generator().manual_seed(seed)
    for s in specs:
        writer.write(s.name, torch.randn(shape, generator=g))
    writer.finish()


def test_streaming_peak_memory_is_bounded_by_the_largest_tensor(tmp_path: Path) -> None:
    n, shape = 32, (1024, 1024)  # 4 MiB per tensor: 128 MiB per model, 384 MiB read by a TIES merge of two
    for name, seed in (("base", 0), ("a", 1), ("b", 2)):
        synthetic_model(tmp_path / name, n, shape, seed)
    for name, seed in (("small_base", 3), ("small_a", 4), ("small_b", 5)):
        synthetic_model(tmp_path / name, 4, (64, 64), seed)
    # A fixed mmap threshold makes glibc return every freed tensor at once, so RSS tracks the live tensors
    # rather than malloc's free-list cache (which otherwise keeps up to ~100 MB, whatever the model size).
    env = os.environ | {"PYTHONPATH": str(REPO), "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, str(tmp_path)], check=True, capture_output=True, text=True, env=env
    )
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    largest = 4 * 2**20
    assert stats["bytes"] == n * largest
    assert stats["writer_peak_bytes"] == largest  # the writer holds one tensor, never a shard
    assert stats["peak_tensor_bytes"] <= 4 * largest  # inputs read for one name (base + two models) + result
    # Real memory: TIES works on the base, two models and a few working copies of one name at a time:
    # at most 3 × (models + 2) tensors, far below one model (32 tensors) or the inputs (96).
    assert stats["increase"] < 3 * (2 + 2) * largest, stats
