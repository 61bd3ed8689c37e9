"""Per-rank bytes of a sharded model at any scale, measured in one CPU process without the hardware.

torch's fake process group lets this process play rank r of N (collectives return at once); the model is built
from its config with no weights (FSDP2: on the meta device, then `fully_shard` per decoder layer and the root;
ZeRO-3: constructed inside `deepspeed.zero.Init` with partitions on the meta device). The real sharding code
decides what rank r keeps, so the numbers are what a run of N processes would hold, for a 70B model in
seconds and under half a GB of memory. Full fine-tuning with AdamW and bf16 mixed precision:

- FSDP2: fp32 parameter shards (they are the master weights; layers are gathered in bf16 for compute), fp32
  gradient shards, AdamW's two fp32 moments and step counters: measured from the tensors after a real
  optimizer step on meta.
- ZeRO-3: bf16 parameter partitions (measured from DeepSpeed's `ds_tensor`s) and the small tensors DeepSpeed
  keeps whole on every rank (its own persistence rule, with sft's threshold); DeepSpeed allocates the bf16
  gradient partition, the fp32 master copy and the two fp32 moments with the partition's number of elements.

Each row carries `formula`: what the memory planner (`sft.plan.model_state`, about 16 bytes per parameter over
N) expects for the same rank. Activations and the one gathered layer in flight come on top.

    python -m sft.simulate --world 64 [--rank 0] [--strategy fsdp2 zero3] [--model meta-llama/Llama-3.1-70B]
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

STRATEGIES = ("fsdp2", "zero3")  # also the memory planner's names of these layouts

DEFAULT_MODEL = "meta-llama/Llama-3.1-70B"  # a bundled config (sft.model.bundled): shapes only, no download


def formula(net: Any, world: int, rank: int, strategy: str) -> dict[str, float]:
    """Bytes of parameters, gradients and optimizer state (fp32 master copies included) the memory planner
    expects rank `rank` of `world` to hold for the model `net` (built on meta, not yet sharded)."""
    from sft.ds_config import persistence_threshold
    from sft.plan import model_state, params_of

    # DeepSpeed with bf16: 2-byte partitions and fp32 masters; tensors kept whole as sft configures ZeRO-3.
    threshold = persistence_threshold(net.config.hidden_size)
    state = model_state(params_of(net), strategy, world, rank, "adamw", strategy == "zero3", threshold)
    return {"params": state.params, "grads": state.grads, "optimizer": state.optimizer + state.master}


def _config(model: str) -> Any:
    from transformers import AutoConfig

    from sft.model.bundled import bundled_config_dir

    folder = bundled_config_dir(model)
    assert folder is not None, model  # the command line offers bundled ids only
    return AutoConfig.from_pretrained(folder)


def measure_fsdp2(model: str, world: int, rank: int) -> dict[str, Any]:
    """What this rank holds under FSDP2 (needs the process group)."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM

    from sft.model.layers import decoder_layers

    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(_config(model), dtype=torch.float32)
    expected = formula(net, world, rank, "fsdp2")
    mesh = init_device_mesh("cpu", (world,))
    for layer in decoder_layers(net):
        fully_shard(layer, mesh=mesh)
    fully_shard(net, mesh=mesh)
    params = list(net.parameters())
    for p in params:  # FSDP2 reduce-scatters each gradient into a shard shaped like its parameter's
        p.grad = torch.zeros_like(p)
    optimizer = torch.optim.AdamW(params, lr=1e-5, foreach=False)
    optimizer.step()  # creates the moments, sharded like the parameters (on meta: no memory), and step counters
    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return {
        "strategy": "fsdp2",
        "n_params": sum(p.numel() for p in params),
        "params": _local_bytes(params),
        "grads": _local_bytes([p.grad for p in params]),
        "optimizer": _local_bytes(state),
        "formula": expected,
    }


def measure_zero3(model: str, world: int, rank: int) -> dict[str, Any]:
    """What this rank holds under DeepSpeed ZeRO-3 with bf16 (needs the process group)."""
    from types import SimpleNamespace

    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from sft.ds_config import persistence_threshold

    config = _config(model)
    with torch.device("meta"):
        expected = formula(AutoModelForCausalLM.from_config(config), world, rank, "zero3")
    os.environ.setdefault("LOCAL_RANK", "0")
    deepspeed.init_distributed(dist_backend=dist.get_backend())
    ds = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": world,
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": 3},
    }
    # Each parameter is created whole on the CPU (allocated, never written) and partitioned onto meta at once.
    with no_init_weights(), deepspeed.zero.Init(config_dict_or_path=ds, remote_device="meta"):
        net = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    # The tensors the engine will keep whole on every rank: DeepSpeed's own rule, with sft's threshold.
    persistent = DeepSpeedZeRoOffload.mark_persistent_parameters(
        SimpleNamespace(module=net), persistence_threshold(config.hidden_size), 2**63
    )
    params = list(net.parameters())
    partition = sum(p.ds_tensor.numel() for p in params)
    return {
        "strategy": "zero3",
        "n_params": sum(p.ds_numel for p in params),
        "params": sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in params)
        + sum(p.ds_numel * p.ds_tensor.element_size() for p in persistent),
        "grads": 2 * partition,  # bf16 gradient partition
        "optimizer": 12 * partition,  # fp32 master + exp_avg + exp_avg_sq
        "formula": expected,
    }


def _local_bytes(tensors: list[Any]) -> int:
    from torch.distributed.tensor import DTensor

    total = 0
    for t in tensors:
        local = t.to_local() if isinstance(t, DTensor) else t
        total += local.numel() * local.element_size()
    return total


def simulate(model: str, world: int, rank: int, strategies: list[str]) -> list[dict[str, Any]]:
    """Start a fake process group as rank `rank` of `world` and measure each strategy (once per process)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    measure = {"fsdp2": measure_fsdp2, "zero3": measure_zero3}
    rows = []
    for strategy in strategies:
        row = measure[strategy](model, world, rank)
        row.update(model=model, world=world, rank=rank)
        rows.append(row)
    dist.destroy_process_group()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    from sft.model.bundled import bundled_models

    ap.add_argument("--model", default=DEFAULT_MODEL, choices=bundled_models(), help="a bundled hub config")
    ap.add_argument("--world", type=int, required=True)
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--strategy", nargs="+", default=["fsdp2", "zero3"], choices=STRATEGIES)
    args = ap.parse_args()
    print(json.dumps(simulate(args.model, args.world, args.rank, args.strategy)))


if __name__ == "__main__":
    main()
