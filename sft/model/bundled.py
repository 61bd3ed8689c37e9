"""Configs of well-known hub models shipped inside sft, so `sft plan` works where the hub is out of reach
(HF_HUB_OFFLINE=1, a login node without network, a gated model without a token).

Each folder `bundled_configs/<org>/<name>/` holds a config.json with the architecture numbers of that hub model's
published config.json (sizes, layer and head counts, vocabulary, tied embeddings: what decides the parameter
shapes); bundled_configs/README.md names the source of each. They are never used to load weights.
"""

from __future__ import annotations

from pathlib import Path

BUNDLED_DIR = Path(__file__).parent / "bundled_configs"


def bundled_models() -> list[str]:
    """The hub ids with a bundled config, sorted."""
    return sorted(str(p.parent.relative_to(BUNDLED_DIR)) for p in BUNDLED_DIR.glob("*/*/config.json"))


def bundled_config_dir(name: str) -> Path | None:
    """The folder holding the bundled config.json of hub id `name` (matched without regard to case, as the hub
    does), or None."""
    wanted = name.strip().lower()
    return next((BUNDLED_DIR / m for m in bundled_models() if m.lower() == wanted), None)
