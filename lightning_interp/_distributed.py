"""The few collectives the callbacks need, as no-ops outside ``torch.distributed``."""

from __future__ import annotations

import torch
import torch.distributed as dist


#: Lightning strategies that shard parameters: outside a module's own forward its weights are not whole
SHARDED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy", "XLAFSDPStrategy")


def sharded_strategy(trainer: object) -> str | None:
    """The name of the Trainer's strategy when it shards parameters (FSDP, DeepSpeed, model parallel), else None."""
    for cls in type(getattr(trainer, "strategy", None)).__mro__:
        if cls.__name__ in SHARDED_STRATEGIES:
            return cls.__name__
    return None


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_(tensor: torch.Tensor, op: str = "mean") -> torch.Tensor:
    """In-place all-reduce (``mean``, ``sum``, ``min`` or ``max``); identity on one process."""
    n = world_size()
    if n == 1:
        return tensor
    reduce_op = {"mean": dist.ReduceOp.SUM, "sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op]
    dist.all_reduce(tensor, op=reduce_op)
    if op == "mean":
        tensor /= n
    return tensor


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along dim 0 (ranks may hold different numbers of rows)."""
    n = world_size()
    if n == 1:
        return tensor
    count = torch.tensor([tensor.shape[0]], device=tensor.device)
    counts = [torch.zeros_like(count) for _ in range(n)]
    dist.all_gather(counts, count)
    longest = int(max(int(c) for c in counts))
    padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.zeros_like(padded) for _ in range(n)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[: int(c)] for g, c in zip(gathered, counts)])


def all_gather_object(value: object) -> list[object]:
    """Every rank's ``value`` (any picklable object), in rank order; ``[value]`` on one process."""
    n = world_size()
    if n == 1:
        return [value]
    gathered: list[object] = [None] * n
    dist.all_gather_object(gathered, value)
    return gathered
