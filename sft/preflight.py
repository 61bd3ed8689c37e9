"""Everything about a run that can be checked before anything is loaded or written (DESIGN invariant 9).

The model (its folder, or the hub), the data files, the output folder (safe, writable, with room for a
checkpoint and the export), and a W&B key when W&B is online. Each problem is one SftError line; a good
recipe passes in well under a second. No torch import (invariant 8): the CLI runs this before importing it.
"""

from __future__ import annotations

import configparser
import netrc
import os
from pathlib import Path
from urllib.parse import urlparse

from sft.config import Recipe, WandbConfig
from sft.data.sources import open_source
from sft.errors import SftError
from sft.model.check import check_model, parameter_counts
from sft.run_folder import check_output_dir, check_room

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
OPTIMIZER_BYTES = {"adamw": 8, "adamw_8bit": 2, "paged_adamw": 8, "paged_adamw_8bit": 2}  # per trained value


def preflight(recipe: Recipe, recipe_path: str | Path | None = None) -> None:
    model_dir = check_model(recipe.model)
    inputs = [] if recipe_path is None else [Path(recipe_path)]
    for spec in [*recipe.data.train, *recipe.data.eval]:
        src = open_source(spec)  # a missing file or unknown type fails here
        if not spec.path.startswith("builtin:"):
            inputs += src.files
    if model_dir is not None and Path(recipe.model.name).expanduser().exists():
        inputs.append(model_dir)
    check_output_dir(recipe, inputs)
    need = checkpoint_bytes(recipe, model_dir)
    if need:
        check_room(recipe.output_dir, need, "a checkpoint and the export")
    check_wandb_key(recipe.logging.wandb)


def checkpoint_bytes(recipe: Recipe, model_dir: Path | None) -> float | None:
    """About the disk a checkpoint plus the final export take (None when the model's size is unknown)."""
    if model_dir is None:
        return None
    full = recipe.method == "full"
    counts = parameter_counts(model_dir, None if full else recipe.lora.r, recipe.lora.target_modules)
    if counts is None:
        return None
    total, adapters = counts
    trained = total if full else adapters
    # fp32 trained weights and optimizer moments in the checkpoint; the export in model.dtype (adapters fp32)
    export = DTYPE_BYTES[recipe.model.dtype] if full else 4
    return float(trained * (4 + OPTIMIZER_BYTES[recipe.optim.name] + export))


def check_wandb_key(cfg: WandbConfig) -> None:
    """W&B online needs an API key; without one wandb would stop the run after the model has loaded."""
    if cfg.mode != "online" or _wandb_key_present():  # the recipe's mode wins over WANDB_MODE in wandb.init
        return
    raise SftError(
        "logging.wandb.mode=online but no W&B API key was found (WANDB_API_KEY, or `wandb login`); log in, "
        "or use logging.wandb.mode=offline and `wandb sync` the run later"
    )


def _wandb_key_present() -> bool:
    """Where wandb looks for a key: the environment, its settings files, the netrc file (presence only)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    config_dir = Path(os.environ.get("WANDB_CONFIG_DIR", Path.home() / ".config" / "wandb"))
    for settings in (config_dir / "settings", Path("wandb") / "settings"):
        parser = configparser.ConfigParser()
        try:
            parser.read(settings)
        except configparser.Error:
            continue
        if parser.has_option("default", "api_key"):
            return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc")).expanduser()
    try:
        return path.is_file() and netrc.netrc(str(path)).authenticators(host) is not None
    except (netrc.NetrcParseError, OSError):
        return False
