"""The merge stage on the built-in model (SmolLM2-135M-Instruct) and real fine-tunes of it.

Session fixtures train, with a plain PyTorch loop and a few AdamW steps each: two full fine-tunes (Python
code, poetry), a LoRA adapter and a QLoRA adapter (NF4 + double quant on the CPU), all saved the way our
trainer saves them.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from sft.merge.config import validate_merge_config
from sft.merge.run import merge
from tests.conftest import QUANT

pytestmark = pytest.mark.slow

BUILTIN = "builtin:smollm2-135m-instruct"
CODE = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i * i)\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n",
    "import os\nfiles = sorted(os.listdir('.'))\n",
]
POETRY = [
    "Shall I compare thee to a summer's day?\nThou art more lovely and more temperate:",
    "The woods are lovely, dark and deep,\nBut I have promises to keep,",
    "I wandered lonely as a cloud\nThat floats on high o'er vales and hills,",
    "Because I could not stop for Death,\nHe kindly stopped for me;",
]
PROMPTS = ["Write a Python function that reverses a list.", "Write a short poem about the sea."]


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    # These models are small: one thread avoids OpenMP threads spinning against each other on a shared box
    # (measured 5x faster on 2 busy cores). Restored afterwards for the other test modules.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with one_thread():
        yield


def base_dir() -> Path:
    from sft.model.builtin import builtin_model_dir

    return builtin_model_dir(BUILTIN)


def train(model: Any, texts: list[str], steps: int, lr: float) -> None:
    """A few real AdamW steps of causal-LM loss on `texts` (padding masked out of the loss)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir())
    batch = tok(texts, return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(**batch, labels=labels, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.fixture(scope="session")
def finetunes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("finetunes")
    out = {}
    with one_thread():
        for name, texts in (("code", CODE), ("poetry", POETRY)):
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_pretrained(base_dir(), dtype=torch.float32)
            train(model, texts, steps=3, lr=5e-5)
            model.save_pretrained(root / name, safe_serialization=True)
            out[name] = root / name
            del model
    return out


@pytest.fixture(scope="session")
def lora_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("lora") / "adapter"
    torch.manual_seed(0)
    with one_thread():
        base = AutoModelForCausalLM.from_pretrained(base_dir(), dtype=torch.float32)
        model = get_peft_model(
            base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0)
        )
        train(model, CODE, steps=3, lr=1e-3)
        model.save_pretrained(str(folder))
    (folder / "sft_adapter.json").write_text(json.dumps({"base_model": BUILTIN, "quantization": None}))
    return folder


@pytest.fixture(scope="session")
def qlora_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from sft.merge.verify import disable_cpu_repack

    folder = tmp_path_factory.mktemp("qlora") / "adapter"
    torch.manual_seed(0)
    qc = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    with one_thread():
        base = AutoModelForCausalLM.from_pretrained(
            base_dir(), quantization_config=qc, device_map="cpu", dtype=torch.float32
        )
        disable_cpu_repack(base)  # before any forward (FACTS.md: the AVX512-BF16 repack corrupts gradients)
        model = get_peft_model(
            base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0)
        )
        train(model, POETRY, steps=3, lr=1e-3)
        model.save_pretrained(str(folder))
    (folder / "sft_adapter.json").write_text(json.dumps({"base_model": BUILTIN, "quantization": QUANT}))
    return folder


def quiet(line: str) -> None:
    pass


def code_loss(folder: Path) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    batch = tok(CODE, return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    with torch.inference_mode():
        return float(model(**batch, labels=labels, use_cache=False).loss)


def test_ties_merge_of_two_real_finetunes_loads_and_generates(
    finetunes: dict[str, Path], tmp_path: Path
) -> None:
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    raw = {
        "method": "ties",
        "base": BUILTIN,
        "models": [str(finetunes["code"]), str(finetunes["poetry"])],
        "density": 0.5,
        "dtype": "bfloat16",
        "max_shard_size": "100MB",
        "output": str(tmp_path / "merged"),
    }
    result = merge(validate_merge_config(raw), log=quiet)
    out = result.output
    assert result.shards >= 2 and (out / "model.safetensors.index.json").is_file()
    assert (out / "chat_template.jinja").is_file() and (out / "generation_config.json").is_file()

    # It differs from the base and from each fine-tune.
    name = "model.layers.3.mlp.down_proj.weight"
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(str(out / index[name]), "pt") as f:
        merged = f.get_tensor(name).float()
    for folder in (base_dir(), finetunes["code"], finetunes["poetry"]):
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            assert not torch.allclose(merged, f.get_tensor(name).bfloat16().float())

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.dtype == torch.bfloat16
    ids: Any = tok.apply_chat_template(
        [{"role": "user", "content": PROMPTS[0]}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.inference_mode():
        y = model.generate(**ids, max_new_tokens=12, do_sample=False)
    text: Any = tok.decode(y[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert text.strip(), "the merged model generated nothing"
    # The code fine-tune's skill survives the merge: lower loss on its texts than the base.
    assert code_loss(out) < code_loss(base_dir())


def logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model.eval()(input_ids=ids, use_cache=False).logits


def test_lora_merge_equals_the_adapter_model(lora_adapter: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lines: list[str] = []
    raw = {
        "method": "lora",
        "adapter": str(lora_adapter),
        "output": str(tmp_path / "merged"),
        "prompts": PROMPTS,
    }
    result = merge(validate_merge_config(raw), log=lines.append)  # verify is on by default for lora
    # The report compares float32 forwards; on this 30-layer model their rounding alone differs by up to
    # ~2e-4 (logits reach ~40), so a faithful merge reads as ~1e-4 there and a wrong one as > 0.1.
    assert result.report["max_abs_logit_diff"] <= 1e-3 and result.report["mean_kl"] < 1e-6, result.report
    assert any("max |Δlogit|" in line for line in lines)

    # Measured here independently, in float64 so forward rounding does not hide the merge's own error: the
    # merged float32 weights give the adapter model's logits to within 1e-4.
    tok = AutoTokenizer.from_pretrained(result.output)
    chat = [{"role": "user", "content": PROMPTS[1]}]
    enc: Any = tok.apply_chat_template(
        chat, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    ids = enc["input_ids"]
    merged = logits(AutoModelForCausalLM.from_pretrained(result.output, dtype=torch.float64), ids)
    base = AutoModelForCausalLM.from_pretrained(base_dir(), dtype=torch.float64)
    base_logits = logits(base, ids)
    adapter_logits = logits(PeftModel.from_pretrained(base, lora_adapter).double(), ids)
    diff = (adapter_logits - merged).abs().max().item()
    assert diff <= 1e-4, diff
    assert (base_logits - merged).abs().max().item() > 0.05  # the adapter did change the model


def test_qlora_merge_with_round_trip_is_closer_to_the_trained_model(
    qlora_adapter: Path, tmp_path: Path
) -> None:
    raw = {"method": "lora", "adapter": str(qlora_adapter), "prompts": PROMPTS}
    with_rt = merge(validate_merge_config(raw | {"output": str(tmp_path / "rt")}), log=quiet)
    plain = merge(
        validate_merge_config(raw | {"output": str(tmp_path / "plain"), "qlora_roundtrip": False}), log=quiet
    )
    rt, pl = with_rt.report, plain.report
    assert rt["max_abs_logit_diff"] < pl["max_abs_logit_diff"] / 10, (rt, pl)
    assert rt["mean_kl"] < pl["mean_kl"] / 10, (rt, pl)
    assert rt["max_abs_logit_diff"] < 1e-3, rt
    print(f"\nQLoRA merge vs 4-bit adapter model: with round trip {rt}, into the plain base {pl}")
