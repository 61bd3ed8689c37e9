"""Where sft keeps what it computes once and reuses: one cache root, one folder per kind of entry.

    $SFT_CACHE (default ~/.cache/sft)
      models/            built-in models converted from GGUF into Hugging Face folders (sft/model/builtin.py)
      data/              tokenized sources, keyed by content, tokenizer and settings (sft/data/cache.py)
      torch_extensions/  DeepSpeed's compiled C++ ops, unless TORCH_EXTENSIONS_DIR is set

No imports beyond the standard library: data, model and strategies all read it.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$SFT_CACHE, else ~/.cache/sft."""
    return Path(os.environ.get("SFT_CACHE", Path.home() / ".cache" / "sft"))


def models_cache_dir() -> Path:
    return cache_root() / "models"


def data_cache_dir() -> Path:
    return cache_root() / "data"


def extensions_cache_dir() -> Path:
    return cache_root() / "torch_extensions"
