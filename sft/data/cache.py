"""The on-disk cache of tokenized sources: $SFT_CACHE/data/<key>/ (default ~/.cache/sft/data).

The key hashes everything the tokens depend on: the data's content, the tokenizer (vocabulary, merges,
special tokens), the chat template and the data settings. One process builds an entry under a file lock while
the others wait, then all load it (memory-mapped). An entry is written aside and moved into place, so a crash
never leaves half an entry. The arrays are plain .npy files and the statistics JSON: nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sft.data.stats import SourceStats
from sft.data.store import TokenStore
from sft.paths import data_cache_dir
from sft.publish import publishing

CACHE_VERSION = 1
# The code that decides the tokens is part of the key too: changing it can never serve stale entries.
TOKENIZING_CODE = (
    "sources.py",
    "formats.py",
    "chat.py",
    "template.py",
    "lengths.py",
    "prepare.py",
    "store.py",
)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of what decides the token ids: the full tokenizer definition, special tokens, chat template."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # slow tokenizers: the vocabulary stands in for the model
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps([str(t) for t in tokenizer.all_special_tokens]).encode())
    h.update(json.dumps([tokenizer.bos_token_id, tokenizer.eos_token_id]).encode())
    template = getattr(tokenizer, "chat_template", None)
    h.update(json.dumps(template, sort_keys=True, default=str).encode())
    return h.hexdigest()


def code_fingerprint() -> str:
    h = hashlib.sha256(str(CACHE_VERSION).encode())
    for name in TOKENIZING_CODE:
        h.update((Path(__file__).parent / name).read_bytes())
    return h.hexdigest()


def cache_key(content: str, tokenizer_fp: str, settings: dict[str, Any]) -> str:
    blob = json.dumps(
        {"code": code_fingerprint(), "content": content, "tok": tokenizer_fp, "settings": settings},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def cached(
    key: str, build: Callable[[], tuple[TokenStore, SourceStats]]
) -> tuple[TokenStore, SourceStats, bool]:
    """(store, stats, hit): load the entry for `key`, or build and save it (one process at a time)."""
    from filelock import FileLock

    root = data_cache_dir()
    entry = root / key
    if _complete(entry):
        return _load(entry) + (True,)
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(entry) + ".lock")
        lock.acquire()
    except OSError as e:  # a read-only home, say: train without the cache rather than fail
        print(f"[sft] data cache unavailable ({e}); tokenizing without it", file=sys.stderr)
        return build() + (False,)
    try:
        if _complete(entry):  # another process built it while we waited
            return _load(entry) + (True,)
        store, stats = build()
        with publishing(entry) as folder:
            store.save(folder)
            (folder / "stats.json").write_text(json.dumps(stats.to_json(), indent=1) + "\n")
        return _load(entry) + (False,)
    finally:
        lock.release()


def _complete(entry: Path) -> bool:
    return (entry / "stats.json").is_file()


def _load(entry: Path) -> tuple[TokenStore, SourceStats]:
    stats = SourceStats.from_json(json.loads((entry / "stats.json").read_text()))
    return TokenStore.load(entry), stats
