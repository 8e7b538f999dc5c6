"""This process's place in the job: ranks, the sequence-parallel group, the device; and small collectives.

Layout: the ranks of one sequence-parallel (SP) group are consecutive and share one sample, each holding
SEQ_LEN / SP of its tokens; data-parallel (DP) rank = rank // SP picks the sample. Expert-parallel groups
are DeepSpeed's (the engine builds them from the MoE layers' ep_size).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from launcher.config import RunConfig


@dataclass(frozen=True)
class Placement:
    """Where this process sits. The sizes (world, data-parallel) are the RunConfig's: `cfg.world_size`,
    `cfg.dp_size`."""

    rank: int
    local_rank: int
    sp_size: int
    device: torch.device
    sp_group: object = None  # torch.distributed ProcessGroup of this rank's SP group; None when SP = 1

    @property
    def dp_rank(self) -> int:
        return self.rank // self.sp_size

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(cfg: RunConfig) -> Placement:
    """cfg: RunConfig. The launcher (cluster.py) sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT."""
    import deepspeed
    import torch.distributed as dist

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise RuntimeError(f"{name} is not set: start training through `python -m launcher` (or the "
                               "positional script), which sets the distributed variables for every process")
    local_rank = int(os.environ["LOCAL_RANK"])
    if cfg.device == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    deepspeed.init_distributed(dist_backend="nccl" if cfg.device == "cuda" else "gloo", verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != cfg.world_size:
        raise RuntimeError(f"the job has {world} processes but the run config expects {cfg.world_size} "
                           f"({cfg.num_nodes} nodes x {cfg.gpus_per_node}): were all nodes started with the same "
                           "GPUS_PER_NODE and WORLD_SIZE?")
    sp_group = None
    if cfg.sp_size > 1:
        # new_group is collective: every rank creates every group, and keeps its own.
        for start in range(0, world, cfg.sp_size):
            group = dist.new_group(list(range(start, start + cfg.sp_size)))
            if start <= rank < start + cfg.sp_size:
                sp_group = group
    return Placement(rank=rank, local_rank=local_rank, sp_size=cfg.sp_size, device=device, sp_group=sp_group)


def all_reduce_sum(values: list[float] | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Sum a short float64 vector over every rank (one collective for several numbers)."""
    import torch.distributed as dist

    t = torch.as_tensor(values, dtype=torch.float64, device=device).clone()  # clone: all_reduce is in place
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def shutdown_distributed() -> None:
    """Leave together: a process exiting while gloo's threads still serve a peer can abort ("terminate called
    without an active exception") and turn a finished run into a failed one."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def broadcast_from_main(obj):
    """Rank 0's `obj` on every rank (a small picklable value)."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj
