"""Where a process runs: device, rank, world, the parallel groups, and the process group itself.

Under torchrun the process group is created on a store of this attempt's own (``attempt_<restart count>/`` in the
torchrun agent's store): with ``--max-restarts`` a restarted attempt would otherwise read the groups' keys of
the failed one (torch 2.13: its gloo ``connectFullMesh`` then times out connecting to a dead rank).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from configs import JobConfig
from launch.watchdog import PG_GRACE_S
from parallel.dims import ParallelDims, ParallelGroups


@dataclass
class Runtime:
    """Where this process runs: device, rank, world and the parallel groups (``ParallelDims.build``)."""

    device: torch.device
    rank: int
    world_size: int
    pdims: ParallelDims
    groups: ParallelGroups
    owns_process_group: bool = False  # we initialised torch.distributed, so we tear it down

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def mean_over_dp(self, value: torch.Tensor) -> torch.Tensor:
        if self.groups.dp_size == 1:
            return value
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM, group=self.groups.dp_group)
        return value / self.groups.dp_size

    def shutdown(self) -> None:
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()


def resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("train.device is 'cuda' but no CUDA device is available; use --train.device=cpu")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_runtime(cfg: JobConfig) -> Runtime:
    """Join torchrun's process group (gloo on CPU, nccl on GPU) unless one exists; build parallel groups."""
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(cfg.train.device, int(os.environ.get("LOCAL_RANK", "0")))
    owns = False
    if env_world > 1 and not dist.is_initialized():  # the watchdog (launch/watchdog.py) fires before this timeout
        timeout = timedelta(seconds=cfg.train.dist_timeout_s + PG_GRACE_S)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=attempt_store(timeout),
                                rank=int(os.environ["RANK"]), world_size=env_world, timeout=timeout)
        owns = True
    world = dist.get_world_size() if dist.is_initialized() else 1
    p = cfg.parallel
    if world % (p.tp * p.pp * p.cp):
        raise ValueError(f"parallel.tp * parallel.pp * parallel.cp ({p.tp} * {p.pp} * {p.cp}) must divide the world "
                         f"size ({world})")
    pdims = ParallelDims(dp=p.data_parallel(world), tp=p.tp, ep=p.ep, pp=p.pp, cp=p.cp, sp=p.sequence_parallel,
                         etp=p.etp)
    pdims.check_world(world)
    groups = pdims.build(device.type)
    return Runtime(device, dist.get_rank() if world > 1 else 0, world, pdims, groups, owns)


def attempt_store(timeout: timedelta) -> dist.Store:
    """The rendezvous store (torchrun's agent store, else one hosted by rank 0) under this attempt's prefix."""
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT", "RANK") if k not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE is {os.environ['WORLD_SIZE']} but {', '.join(missing)} is not set: launch with "
                         "torchrun (or set MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK)")
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), int(os.environ["WORLD_SIZE"]),
                          is_master=not agent and os.environ["RANK"] == "0", timeout=timeout)
    return dist.PrefixStore(f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", store)
