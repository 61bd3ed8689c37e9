"""Memory as measured: the peaks a run logs (CUDA allocator, host RSS), reduced to the largest rank, and two
probes that check the planner (sft/plan.py) against real runs: the bytes held by live tensors, and the
allocation peak of a stretch of code on the CPU (the CPU twin of `torch.cuda.max_memory_allocated`)."""

from __future__ import annotations

import gc
import resource
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

GIB = 1024**3


def peak_memory(device: torch.device) -> dict[str, float]:
    """This process's memory high-water marks since it started, in GiB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    out = {"memory/peak_rss_gib": rss * (1 if sys.platform == "darwin" else 1024) / GIB}
    if device.type == "cuda":
        out["memory/peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / GIB
        out["memory/peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / GIB
    return out


def max_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Each value's maximum over all ranks (every rank calls this, with the same keys in the same order)."""
    import torch.distributed as tdist

    if not values or not tdist.is_initialized() or tdist.get_world_size() == 1:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return dict(zip(values, t.cpu().tolist(), strict=True))


# ---------------------------------------------------------------- probes (tests and benchmarks)


def _storage(t: torch.Tensor) -> Any:
    local = getattr(t, "_local_tensor", None)  # a DTensor's shard on this rank
    if local is not None:
        t = local
    if t.device.type == "meta":
        return None
    try:
        storage = t.untyped_storage()
        storage.data_ptr()  # torch.compile's fake tensors (kept by its caches) have a storage without memory
    except (RuntimeError, NotImplementedError):  # tensor subclasses without storage
        return None
    return storage


def tensor_bytes(tensors: Iterable[torch.Tensor], device_type: str | None = None) -> int:
    """Bytes of the distinct storages behind these tensors (views and repeats counted once)."""
    seen: set[int] = set()
    total = 0
    for t in tensors:
        s = _storage(t)
        if s is None or (device_type is not None and s.device.type != device_type):
            continue
        key = s.data_ptr()
        if key in seen or s.nbytes() == 0:
            continue
        seen.add(key)
        total += s.nbytes()
    return total


def live_tensors() -> Iterator[torch.Tensor]:
    """Every tensor the process holds from Python, with the gradients of parameters (autograd creates those
    without a Python object until they are read) and DeepSpeed ZeRO-3's partitions."""
    for obj in gc.get_objects():
        try:
            if not isinstance(obj, torch.Tensor):
                continue
        except ReferenceError:  # a dead weak proxy
            continue
        yield obj
        grad = obj.grad if obj.requires_grad else None
        if grad is not None:
            yield grad
        part = getattr(obj, "ds_tensor", None)
        if isinstance(part, torch.Tensor):
            yield part


def live_bytes(device_type: str = "cpu") -> int:
    """Bytes of every distinct tensor storage alive in this process on `device_type`."""
    gc.collect()
    return tensor_bytes(live_tensors(), device_type)


def state_bytes(model: torch.nn.Module, optimizer: Any, device_type: str = "cpu") -> dict[str, int]:
    """What this rank holds right now, by kind: the model's parameters (local shards), their gradients, the
    optimizer's state, and every other live tensor (flat buffers and master copies of DeepSpeed, batches)."""
    params = list(model.parameters())
    local = [getattr(p, "ds_tensor", p) for p in params]
    grads = [p.grad for p in params if p.grad is not None]
    inner = getattr(optimizer, "optimizer", optimizer)  # DeepSpeed wraps the torch optimizer
    states = [
        v for s in getattr(inner, "state", {}).values() for v in s.values() if isinstance(v, torch.Tensor)
    ]
    out = {
        "params": tensor_bytes(local, device_type),
        "grads": tensor_bytes(grads, device_type),
        "optimizer": tensor_bytes(states, device_type),
    }
    out["all"] = live_bytes(device_type)
    out["other"] = out["all"] - out["params"] - out["grads"] - out["optimizer"]
    return out


@contextmanager
def allocation_peak() -> Iterator[dict[str, int]]:
    """Record the most bytes allocated at once on the CPU inside the block, above what was allocated when it
    started: `with allocation_peak() as peak: ...` then `peak["bytes"]` (and `peak["end"]`, the bytes still
    allocated at the end). Uses the profiler's memory events
    (the CPU allocator keeps no statistics of its own); slow, for tests and benchmarks."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    result = {"bytes": 0, "end": 0}
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        yield result
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.typed[0] == _EventType.Allocation and node.typed[1].device.type == "cpu":
            alloc = node.typed[1]
            events.append((node.start_time_ns, alloc.total_allocated, alloc.alloc_size))
        stack.extend(node.children)
    if not events:
        return
    events.sort()
    # The profiler's running total carries over from earlier profiled stretches of this process: count from
    # where it stood before the block's first allocation.
    start = events[0][1] - events[0][2]
    result["bytes"] = max(total for _, total, _ in events) - start
    result["end"] = events[-1][1] - start
