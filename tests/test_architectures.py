"""The architecture matrix: tiny random-weight Llama, Qwen2, Qwen3, Qwen3-MoE, Gemma2, Gemma3 (text), Mistral,
Phi3 and Granite models, each with its family's published chat template swapped into the built-in tokenizer
and multi-turn data with system prompts. For each: packed logits equal per-sample logits (eager and sdpa,
where the model supports it; sliding windows shorter than the samples); LoRA (all-linear) and full fine-tuning
with packing through the real loop; the export reloads and gives the run's own eval loss; the LoRA merge gives
peft's merged logits; FSDP2 shards the decoder layers it finds by itself (one process for all, at the end)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from sft.config import DataSource
from sft.data.collate import as_item, pack_collate
from sft.data.formats import RowFormat
from sft.data.sources import open_source
from sft.errors import SftError
from tests.architectures import ARCHITECTURES, save_tiny_model, tiny_config
from tests.conftest import REPO, swap_template, tiny_recipe

ARCHS = sorted(ARCHITECTURES)


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Multi-turn conversations with a system prompt: two short jargon questions and answers each."""
    fmt = RowFormat("messages", {}, None)
    pairs = []
    for row in open_source(DataSource(path="builtin:jargon/train")).rows():
        assert row.data is not None
        msgs = fmt.example(row.data).messages
        assert msgs is not None
        if len(msgs[-1]["content"]) < 120:
            pairs.append([m for m in msgs if m["role"] != "system"])
        if len(pairs) == 16:
            break
    path = tmp_path_factory.mktemp("chat") / "multi_turn.jsonl"
    system = {"role": "system", "content": "You explain hacker slang in one sentence."}
    rows = [{"messages": [system, *pairs[i], *pairs[i + 1]]} for i in range(0, len(pairs), 2)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> Any:
    """arch -> a saved tiny model folder holding its family's tokenizer (made once per module)."""
    made: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in made:
            tok = swap_template(tokenizer, ARCHITECTURES[arch][2])
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
            made[arch] = save_tiny_model(arch, tok, tmp_path_factory.mktemp(arch))
        return made[arch]

    return get


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_logits_equal_per_sample_logits(arch: str, tokenizer: Any) -> None:
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch, tokenizer)
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(config)
    samples = [torch.randint(3, len(tokenizer), (n,)) for n in (37, 26)]  # longer than the sliding windows
    items = [as_item(_sample(ids)) for ids in samples]
    batch = pack_collate([items], pad_id=0)  # one row, padded to a multiple of 8, position ids restart
    tried = []
    model = reference.eval()
    for impl in ("eager", "sdpa"):
        if impl == "sdpa" and not type(model)._supports_sdpa:
            continue  # Gemma 2: eager only (its soft-capping has no sdpa path)
        model.set_attn_implementation(impl)
        assert model.config._attn_implementation == impl
        with torch.no_grad():
            packed = model(
                input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
            ).logits
            at = 0
            for ids in samples:
                alone = model(input_ids=ids[None], use_cache=False).logits[0]
                assert torch.allclose(packed[0, at : at + len(ids)], alone, atol=1e-4), (arch, impl)
                at += len(ids)
        tried.append(impl)
    assert tried


def _sample(ids: torch.Tensor) -> Any:
    from sft.data.chat import Sample

    return Sample(ids.tolist(), ids.tolist())


def losses(run: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def run_recipe(model_dir: Path, out: Path, data: Path, arch: str, **kw: Any) -> Any:
    extra = {"data__system_role": "merge"} if ARCHITECTURES[arch][2] == "gemma2" else {}
    return tiny_recipe(
        model_dir,
        out,
        data__train=str(data),
        data__eval=str(data),
        data__packing="true",
        data__max_seq_len=160,
        train__micro_batch_size=1,
        train__max_steps=2,
        eval__batch_size=1,
        **extra,
        **kw,
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_full_and_lora_fine_tuning_export_reload_and_merge(
    arch: str, models: Any, chat_data: Path, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sft.data.pipeline import DataPipeline
    from sft.evaluate import eval_loss
    from sft.merge.config import validate_merge_config
    from sft.merge.run import merge
    from sft.model.load import load_tokenizer
    from sft.train import train

    base = models(arch)
    full = tmp_path / "full"
    recipe = run_recipe(base, full, chat_data, arch, method="full")
    train(recipe)
    logged = [r["eval/loss"] for r in losses(full) if "eval/loss" in r]
    # the export reloads as a plain transformers model and is the trained one: the run's final eval loss
    reloaded = AutoModelForCausalLM.from_pretrained(full / "final", dtype=torch.float32)
    reloaded.config.use_cache = False
    batches = DataPipeline(recipe, load_tokenizer(recipe.model)).eval_batches()
    assert eval_loss(reloaded, batches, "fp32", lambda x: x)["eval/loss"] == pytest.approx(
        logged[-1], rel=1e-5
    )
    assert logged[-1] != pytest.approx(logged[0], rel=1e-6)  # it did train

    lora = tmp_path / "lora"
    if arch == "qwen3_moe":  # all-linear reaches the fused experts, which peft adapts only without dropout
        with pytest.raises(SftError, match="set lora.dropout=0"):
            train(run_recipe(base, lora, chat_data, arch, method="lora", lora__dropout=0.05))
    train(run_recipe(base, lora, chat_data, arch, method="lora", lora__dropout=0.0))
    spec = {"method": "lora", "adapter": str(lora / "final"), "output": str(tmp_path / "m"), "verify": False}
    ids = torch.randint(3, 1000, (1, 24))
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), lora / "final").eval()
    with torch.no_grad():
        want = peft(input_ids=ids, use_cache=False).logits
    if arch == "qwen3_moe":  # LoRA on the fused experts: peft's own merge, and a clear line from ours
        with pytest.raises(SftError, match="'target_parameters' is set, which this merge does not handle"):
            merge(validate_merge_config(spec), log=lambda line: None)
        merged_model = peft.merge_and_unload()
    else:
        merged_model = AutoModelForCausalLM.from_pretrained(
            merge(validate_merge_config(spec), log=print).output
        )
    with torch.no_grad():
        got = merged_model.eval()(input_ids=ids, use_cache=False).logits
    assert torch.allclose(got, want, atol=1e-5)
    adapter = json.loads((lora / "final" / "adapter_config.json").read_text())
    adapted = [*adapter["target_modules"], *(adapter.get("target_parameters") or [])]
    assert {"o_proj", "down_proj"} <= {name.split(".")[-1] for name in adapted}  # all-linear


def test_fsdp2_wraps_every_architecture_by_its_own_decoder_layers(models: Any) -> None:
    """One process (gloo, world size 1) for all: the decoder layer class is found from the model itself and
    each becomes an FSDP2 module; a sharded step gives the unsharded step's loss."""
    folders = {arch: str(models(arch)) for arch in ARCHS}
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "distributed" / "fsdp2_architectures.py"), json.dumps(folders)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for arch in ARCHS:
        layers, sharded, loss, ref = report[arch]
        assert (
            layers
            == [ARCHITECTURES[arch][0].replace("TextConfig", "Config").replace("Config", "DecoderLayer")] * 2
        )
        assert sharded == 3  # two decoder layers and the root
        assert loss == pytest.approx(ref, rel=1e-5)


def test_attention_auto_picks_what_the_model_supports(models: Any) -> None:
    from sft.config import ModelConfig
    from sft.model.attention import resolve_attention
    from sft.model.load import load_model

    gemma2, llama = str(models("gemma2")), str(models("llama"))
    assert resolve_attention(ModelConfig(name=llama), "cpu") == "sdpa"
    assert resolve_attention(ModelConfig(name=gemma2), "cpu") == "eager"  # no sdpa path for its soft-capping
    model = load_model(ModelConfig(name=gemma2), torch.device("cpu"))  # the default recipe loads Gemma 2
    assert model.config._attn_implementation == "eager"
    with pytest.raises(SftError, match="=sdpa: Gemma2ForCausalLM does not support it; use eager"):
        resolve_attention(ModelConfig(name=gemma2, attn_implementation="sdpa"), "cpu")
    with pytest.raises(SftError, match="flash_attention_2 needs a CUDA GPU and its flash-attn package"):
        resolve_attention(ModelConfig(name=llama, attn_implementation="flash_attention_2"), "cpu")
