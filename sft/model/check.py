"""Check the model a recipe names before loading it: one line naming the problem, in well under a second.

A local folder must hold a readable config.json and complete weight files (the safetensors headers say how
long each file must be); a hub id must be reachable, or cached when the hub is offline. Also an estimate of
the parameters to size checkpoints with. No torch import (DESIGN invariant 8).
"""

from __future__ import annotations

import functools
import json
import os
import struct
from pathlib import Path
from typing import Any

from sft.config import ModelConfig
from sft.errors import SftError
from sft.model.builtin import _gguf_path, is_builtin
from sft.paths import models_cache_dir

WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf")
OFFLINE_VALUES = ("1", "true", "yes", "on")
HUB_TIMEOUT_S = 10.0


def check_model(cfg: ModelConfig) -> Path | None:
    """Fail fast on a model that cannot load; return its local folder (None for a hub id not cached)."""
    name = cfg.name
    if is_builtin(name):
        _gguf_path(name.removeprefix("builtin:"))
        converted = models_cache_dir() / name.removeprefix("builtin:")
        return converted if (converted / "config.json").is_file() else None
    path = Path(name).expanduser()
    if path.exists():
        check_model_folder(path, name)
        return path
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:
        raise SftError(f"model: path not found: {name}")
    first = name.split("/")[0]
    if "/" in name and Path(first).is_dir():
        raise SftError(
            f"model: {name} not found, but ./{first} is a folder here: a path typo? (a hub id would not start "
            f"with a local folder's name; write ./{name} for a local model)"
        )
    return _check_hub_model(name, cfg.revision)


def check_model_name(name: str) -> None:
    """`check_model` for a bare name (no revision)."""
    check_model(ModelConfig(name=name))


def check_model_folder(path: Path, name: str) -> None:
    if not path.is_dir():
        raise SftError(f"model: {name} is a file; point model.name at a Hugging Face model folder")
    config = path / "config.json"
    if not config.is_file():
        raise SftError(f"model: {name} has no config.json; point model.name at a Hugging Face model folder")
    try:
        parsed = json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SftError(
            f"model: {config} is not valid JSON ({e}); restore it from the model's source"
        ) from None
    if not isinstance(parsed, dict) or "model_type" not in parsed:
        raise SftError(
            f"model: {config} has no model_type, so transformers cannot tell the architecture; "
            "restore it from the model's source"
        )
    weights = [p for pattern in WEIGHT_FILES for p in path.glob(pattern)]
    if not weights:
        raise SftError(
            f"model: {name} has no weight files (*.safetensors or *.bin); is the download complete?"
        )
    for file in weights:
        if file.suffix == ".safetensors":
            safetensors_header(file)  # raises on a truncated or broken file


def safetensors_header(file: Path) -> dict[str, Any]:
    """The tensor table of a .safetensors file, checked against the file's length (catches truncation)."""
    size = file.stat().st_size
    try:
        with file.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if 8 + n > size:
                raise ValueError("header runs past the end")
            header: dict[str, Any] = json.loads(f.read(n))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError, IndexError) as e:
        raise SftError(f"{file}: not a readable safetensors file ({e}); restore it from its source") from None
    if 8 + n + end > size:
        raise SftError(
            f"{file}: truncated ({size:,} bytes, its header needs {8 + n + end:,}); restore it from its source"
        )
    return header


def _hub_offline() -> bool:
    return any(
        os.environ.get(v, "").lower() in OFFLINE_VALUES for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


@functools.cache
def _check_hub_model(name: str, revision: str | None) -> Path | None:
    """A hub id: cached when offline, reachable when online (else one line instead of a minute of retries)."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json", revision=revision)
    folder = Path(cached).parent if isinstance(cached, str) else None
    if _hub_offline():
        if folder is None:
            raise SftError(
                f"model: {name} is not a local folder, and the hub is offline (HF_HUB_OFFLINE) with no copy in "
                "the Hugging Face cache; check the path, or download it once online"
            )
        return folder
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        HfApi(endpoint=os.environ.get("HF_ENDPOINT")).model_info(
            name, revision=revision, timeout=HUB_TIMEOUT_S
        )
    except GatedRepoError:
        raise SftError(
            f"model: {name} is gated on the hub; accept its license there and log in (hf auth login or HF_TOKEN)"
        ) from None
    except RevisionNotFoundError:
        raise SftError(
            f"model: {name} has no revision {revision!r} on the hub; check model.revision"
        ) from None
    except RepositoryNotFoundError:
        raise SftError(
            f"model: {name} is neither a local folder nor a model on the hub (or it is private: log in); "
            "check the spelling"
        ) from None
    except Exception as e:  # no network, DNS, proxy, timeout: all end here, named
        if folder is not None:  # the cache has it: load offline instead of retrying the network for a minute
            os.environ["HF_HUB_OFFLINE"] = "1"
            print(
                f"[sft] the hub is unreachable ({type(e).__name__}); loading {name} from the cache",
                flush=True,
            )
            return folder
        raise SftError(
            f"model: cannot reach the Hugging Face hub for {name} ({type(e).__name__}) and it is not cached; "
            "check the network, or the name if you meant a local folder"
        ) from None
    return folder


def parameter_counts(folder: Path, lora_r: int | None, targets: Any) -> tuple[int, int] | None:
    """(all parameters, LoRA parameters at rank `lora_r`) from the safetensors headers; None if unknown."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    total = adapters = 0
    for file in files:
        for key, t in safetensors_header(file).items():
            if key == "__metadata__":
                continue
            shape = t["shape"]
            n = 1
            for d in shape:
                n *= d
            total += n
            module = key.removesuffix(".weight")
            if lora_r and len(shape) == 2 and key.endswith(".weight") and _lora_target(module, targets):
                adapters += lora_r * (shape[0] + shape[1])
    return total, adapters


def _lora_target(module: str, targets: Any) -> bool:
    leaf = module.rsplit(".", 1)[-1]
    if targets == "all-linear":  # peft leaves out the output head; embeddings are not linear layers
        return "embed" not in leaf and leaf != "lm_head" and "norm" not in leaf
    return leaf in targets
