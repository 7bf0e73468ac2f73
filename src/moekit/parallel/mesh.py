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


def make_mesh(expert_parallel: int, device_type: str = "cpu", pipeline_parallel: int = 1):
    """A (dp, ep) :class:`~torch.distributed.device_mesh.DeviceMesh` over all ranks: EP groups are
    consecutive ranks (one node when EP fits in it), DP runs across them. With
    ``pipeline_parallel`` > 1 a (pp, dp, ep) mesh: stage i on the i-th block of consecutive ranks."""
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        raise ValueError("torch.distributed is not initialised: launch with torchrun and call init_distributed() first")
    W = dist.get_world_size()
    check_positive("expert_parallel", expert_parallel, integer=True)
    check_positive("pipeline_parallel", pipeline_parallel, integer=True)
    if W % pipeline_parallel:
        raise ValueError(f"pipeline_parallel={pipeline_parallel} must divide the world size {W}")
    per_stage = W // pipeline_parallel
    if per_stage % expert_parallel:
        raise ValueError(
            f"expert_parallel={expert_parallel} must divide the {per_stage} ranks of each pipeline stage"
            if pipeline_parallel > 1
            else f"expert_parallel={expert_parallel} must divide the world size {W}"
        )
    if pipeline_parallel == 1:
        return init_device_mesh(device_type, (W // expert_parallel, expert_parallel), mesh_dim_names=("dp", "ep"))
    shape = (pipeline_parallel, per_stage // expert_parallel, expert_parallel)
    return init_device_mesh(device_type, shape, mesh_dim_names=("pp", "dp", "ep"))


def flat_mesh(mesh):
    """All ranks as one mesh dimension ("dp_ep"), for the parameters every rank shards."""
    try:
        return mesh["dp_ep"]
    except (KeyError, RuntimeError, ValueError):
        return mesh._flatten("dp_ep")
