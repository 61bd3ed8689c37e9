"""FSDP2 over every architecture of the matrix, in one process (gloo, world size 1), for tests/test_architectures.py.

    python tests/distributed/fsdp2_architectures.py '{"llama": "/path/to/tiny-llama", ...}'

For each model folder: the decoder layers `decoder_layers` finds (by the model's own `_no_split_modules`), how
many modules became FSDP2 modules, and the loss of one training step sharded vs. unsharded. Prints one JSON line.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch.distributed.fsdp import FSDPModule  # noqa: E402

from sft.config import validate_recipe  # noqa: E402
from sft.dist import DistEnv  # noqa: E402
from sft.loss import loss_sum  # noqa: E402
from sft.model.layers import decoder_layers  # noqa: E402
from sft.model.load import load_model  # noqa: E402
from sft.strategies.fsdp2 import FSDP2Strategy  # noqa: E402


def step_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> float:
    loss = loss_sum(model, batch, "fp32")
    loss.backward()
    return float(loss)


def main() -> None:
    report = {}
    dist = DistEnv(0, 0, 1, torch.device("cpu"))
    for arch, folder in json.loads(sys.argv[1]).items():
        recipe = validate_recipe(
            {
                "model": {"name": folder},
                "method": "full",
                "strategy": {"name": "fsdp2"},
                "train": {"device": "cpu"},
            }
        )
        torch.manual_seed(0)
        model = load_model(recipe.model, dist.device)
        reference = copy.deepcopy(model)
        layers = [type(m).__name__ for m in decoder_layers(model)]
        model, _ = FSDP2Strategy(recipe, dist).prepare(model)
        sharded = sum(isinstance(m, FSDPModule) for m in model.modules())
        ids = torch.randint(3, 1000, (2, 40))
        batch = {"input_ids": ids, "labels": ids.clone()}
        report[arch] = [layers, sharded, step_loss(model, batch), step_loss(reference, batch)]
    print(json.dumps(report))


if __name__ == "__main__":
    main()
