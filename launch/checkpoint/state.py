"""What goes into a checkpoint besides the model: optimizer state by name, RNG states, pickled extras, and the
DTensor views that make DCP store TP/EP shards as global tensors; the process-group queries the others use."""
from __future__ import annotations

import io
import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


def model_state(model: torch.nn.Module, optimizer: Any, saving: bool = False) -> dict[str, torch.Tensor]:
    """The model's state dict with each parameter replaced by its float32 master where this rank keeps one, so a
    checkpoint holds the master weights (a bf16 run resumes bitwise, exports exactly, and loads float32 checkpoints
    and the reverse). ``saving``: a bf16 parameter whose master another rank keeps (ZeRO-1) is left out, so that
    rank's float32 value is the one written; loading fills such a parameter straight from the checkpoint
    (rounded to bf16, as its owner rounds the master)."""
    state = model.state_dict()
    masters = optimizer.master_params() if hasattr(optimizer, "master_params") else {}
    params = dict(model.named_parameters())
    for name in list(state):
        if name in masters:
            state[name] = masters[name]
        elif saving and name in params and getattr(optimizer, "master_elsewhere", lambda p: False)(params[name]):
            del state[name]
    return state


def optimizer_state(optimizer: Any) -> dict[str, torch.Tensor]:
    """``optim/{fqn}/{key}`` -> tensor for every parameter whose state this rank owns (needs group "names"). The
    float32 masters are the model's weights in the checkpoint (``model_state``), not optimizer state."""
    out: dict[str, torch.Tensor] = {}
    for group in optimizer.param_groups:
        names = group.get("names")
        if names is None or len(names) != len(group["params"]):
            raise ValueError("checkpoint: optimizer param groups need a 'names' list (muonclip.build_param_groups)")
        for name, p in zip(names, group["params"]):
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and key != "master":
                    out[f"optim/{name}/{key}"] = value
    return out


def rng_state(device: torch.device) -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def to_bytes(obj: Any) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def from_bytes(buf: Any) -> Any:
    if isinstance(buf, io.BytesIO):
        buf.seek(0)
        return torch.load(buf, weights_only=False)
    return buf


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if distributed() else 0


def shard_views(tensors: dict[str, Any], placements: dict[str, Any], groups: Any,
                row_shards: dict[str, Any] | None = None) -> dict[str, Any]:
    """Wrap tensors of expert-parallel ("expert": Shard(0) over ``groups.ep_group``; split by expert tensor
    parallelism too: [Shard(0), Shard(d)] over ep x etp) and tensor-parallel
    ("tp_sharded": Shard(dim) over the tp group) parameters, and their optimizer state, as DTensors sharing
    the local storage, so DCP saves/loads the global tensors. Replicated tensors are returned unchanged, but for the
    state of the ZeRO-1 sliced ones (``row_shards``: ``optimizer.row_shards()``; masters included: a tensor with
    fewer rows than the parameter), this rank's rows: Shard(0) over their group, torch.chunk's split.

    One mesh per (group, device type): ``DTensor.from_local`` copies a tensor of another device type onto its
    mesh's device, and DCP would load into that copy. With ``optim.offload_state`` a group holds host masters and
    moments beside device parameters (bf16 ones whose master another rank keeps, float32 ones without a master)."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Shard

    meshes: dict[tuple[int, str], Any] = {}
    out = dict(tensors)
    row_shards = row_shards or {}

    def mesh(group: Any, device_type: str) -> Any:
        if (id(group), device_type) not in meshes:
            meshes[id(group), device_type] = DeviceMesh.from_group(group, device_type)
        return meshes[id(group), device_type]

    for key, t in tensors.items():
        name = key[len("optim/"):].rsplit("/", 1)[0] if key.startswith("optim/") else key
        rows = row_shards.get(name)
        if rows is not None and t.ndim > 0 and tuple(t.shape) != tuple(rows.shape):  # this rank's rows
            stride = torch.empty(rows.shape, device="meta").stride()
            out[key] = DTensor.from_local(t, mesh(rows.group, t.device.type), [Shard(0)], run_check=False,
                                          shape=torch.Size(rows.shape), stride=stride)
            continue
        placement = placements.get(name)
        if placement is None or placement.kind == "replicated" or t.ndim == 0:
            continue
        if placement.kind == "expert" and placement.shard_dim is not None:  # expert tensor parallelism
            out[key] = _etp_view(t, placement, groups.ep_group, meshes)
            continue
        group, dim = ((groups.ep_group, 0) if placement.kind == "expert"
                      else (placement.tp_group, placement.shard_dim))
        if group is None or dist.get_world_size(group) == 1:
            continue
        out[key] = DTensor.from_local(t, mesh(group, t.device.type), [Shard(dim)], run_check=False)
    return out


def _etp_view(t: torch.Tensor, placement: Any, ep_group: Any, meshes: dict) -> Any:
    """An expert stack split by expert tensor parallelism as a DTensor: [Shard(0), Shard(d)] on the 2-D mesh of its
    ep group x etp group ([Shard(d)] over the etp group at ep 1). The etp peers are consecutive ranks
    (parallel/dims.py), so row e of the mesh is the etp group of the ep group's rank e."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Shard

    etp_group, dim = placement.tp_group, placement.shard_dim
    etp_ranks = dist.get_process_group_ranks(etp_group)
    ep_ranks = dist.get_process_group_ranks(ep_group) if ep_group is not None else [dist.get_rank()]
    key = (tuple(ep_ranks), tuple(etp_ranks), t.device.type)
    if key not in meshes:
        if len(ep_ranks) == 1:
            meshes[key] = DeviceMesh.from_group(etp_group, t.device.type)
        else:
            k = dist.get_rank(etp_group)
            ranks = torch.tensor([[r - k + j for j in range(len(etp_ranks))] for r in ep_ranks])
            assert ranks[dist.get_rank(ep_group)].tolist() == etp_ranks, (ranks, etp_ranks)
            meshes[key] = DeviceMesh.from_group([ep_group, etp_group], t.device.type, mesh=ranks,
                                                 mesh_dim_names=("ep", "etp"))
    placements = [Shard(dim)] if len(ep_ranks) == 1 else [Shard(0), Shard(dim)]
    return DTensor.from_local(t, meshes[key], placements, run_check=False)
