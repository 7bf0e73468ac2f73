"""The process group and the device mesh: joining the group torchrun describes, the (dp, ep) mesh,
and the mesh's ranks as one dimension (every rank of a model's layout: the group of moekit's own
collectives, and FSDP's mesh for the parameters every rank shards)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ..config import check_positive
from .collectives import drain_at_exit, run_collective


def barrier() -> None:
    """Wait for every rank (under the process-group timeout)."""
    run_collective("barrier", dist.barrier)


def init_distributed(device: str = "cpu", timeout_s: float = 600.0) -> tuple[int, int, torch.device]:
    """Join the process group that ``torchrun`` describes in the environment (gloo on CPU, NCCL
    on CUDA), with a collective timeout so a dead peer becomes an error, not a hang.
    Returns ``(rank, world_size, device)``; a no-op when already initialised."""
    import os

    if "WORLD_SIZE" not in os.environ:
        raise ValueError("expert parallelism needs a torchrun launch: torchrun --nproc-per-node N -m moekit train ...")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    drain_at_exit()
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), **kwargs)
        # every rank's connections are complete before any returns: a rank that then stops at
        # once (a setup error) cannot cut a peer still connecting ("Connection closed by peer")
        run_collective("process-group start", dist.barrier)
    return dist.get_rank(), dist.get_world_size(), dev


def make_mesh(expert_parallel: int, device_type: str = "cpu"):
    """A (dp, ep) :class:`~torch.distributed.device_mesh.DeviceMesh` over all ranks: EP groups are
    consecutive ranks (one node when EP fits in it), DP runs across them."""
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        raise ValueError("torch.distributed is not initialised: launch with torchrun and call init_distributed() first")
    W = dist.get_world_size()
    check_positive("expert_parallel", expert_parallel, integer=True)
    if W % expert_parallel:
        raise ValueError(f"expert_parallel={expert_parallel} must divide the world size {W}")
    return init_device_mesh(device_type, (W // expert_parallel, expert_parallel), mesh_dim_names=("dp", "ep"))


def flat_mesh(mesh):
    """All ranks as one mesh dimension ("dp_ep"), for the parameters every rank shards."""
    try:
        return mesh["dp_ep"]
    except (KeyError, RuntimeError, ValueError):
        return mesh._flatten("dp_ep")
