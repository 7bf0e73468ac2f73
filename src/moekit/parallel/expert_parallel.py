"""Expert parallelism on ``torch.distributed`` (GShard, Lepikhin et al. 2020), combined with data
parallelism on a (dp, ep) device mesh.

The experts of every MoE layer are split over the P ranks of an expert-parallel (EP) group: EP
rank p holds experts [p*El, (p+1)*El). Each rank routes its own tokens, exchanges per-expert
counts, sends each routed slot's row to the rank holding its expert with one uneven
``all_to_all_single``, runs its local experts with the same grouped path as one process, and
sends the results back to be combined. The model code stays single-device:
:func:`~moekit.parallel.apply_expert_parallel` shards a built model (or one built on the meta device, then
materialised per rank), puts the all-to-all on each layer's experts as module hooks
(:class:`ExpertAllToAll`), and gives each layer the :class:`~moekit.layer.scope.LocalScope`
replacement through which its routing statistics become global: the layer has no parallel
branches.

What is global by default (``statistics="global"``: as one process would compute it on the
concatenated batch of all ranks): the balance / importance / load / z / entropy losses, the
stats (tokens per expert, dropped fraction, entropy, usage), the capacity limit with its drops
and re-routing, expert choice's token selection. Always global, whatever ``statistics``: the
sigmoid router's bias update (the bias is replicated state, so every rank must move it alike).
Router randomness (noisy gating, jitter, GShard's random second expert) is drawn for the global
batch on every rank and sliced, so it equals one process's too. Every layer call starts with one
small all-gather of the ranks' token counts and call settings: ranks that call a layer
differently (another top_k, train vs eval, grad mode, capacity factor) get a clear error instead
of a hang.

Parameters and gradients are PyTorch's: the expert weights are DTensors sharded on the expert
dimension over the mesh's ``ep`` dimension, and FSDP2 (``fully_shard``) shards them further over
``dp`` and every other parameter over all ranks (ZeRO-3), reducing the gradients during
``backward`` with a sum. The training objective is one process's on the global batch: each rank's
term (:meth:`ExpertParallel.loss`) is its summed task loss divided by every rank's token count,
plus its share of the auxiliary loss, so the sum of the ranks' gradients is the gradient of the
whole batch's mean loss, whatever each rank's count (masked targets included): torchtitan's
recipe. An expert's gradient on its holder sums the contributions of every rank of its EP group
(the all-to-all's backward carries them back) and FSDP's sum over the expert's ``dp`` replicas
completes it: no scaling by hand. Routing statistics summed over ranks keep their sum's exact
adjoint in the backward (:class:`_AllSum`), so each rank adds 1/world of its auxiliary loss.

Shape legend: T local tokens, D width, E experts, P EP ranks, El = E / P experts per rank,
R rows of the local dispatch plan, N rows received by this rank's experts.
"""

from __future__ import annotations

import hashlib
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from ..config import check_positive
from ..layer.experts import GroupedExperts
from ..layer.moe import MoE
from .collectives import all_gather_objects, drain_at_exit, run_collective
from .dispatch import ExpertAllToAll
from .handle import ExpertParallel
from .mesh import flat_mesh, make_mesh
from .stats import _LayerScope

STATISTICS = ("global", "expert", "local")


def _moe_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MoE)]


def _validate(model: nn.Module, ep: int, statistics: str) -> None:
    """Everything that can be checked before any communication."""
    if statistics not in STATISTICS:
        raise ValueError(f"statistics must be one of {', '.join(map(repr, STATISTICS))}; got {statistics!r}")
    scalars = [n for n, p in model.named_parameters() if p.dim() == 0]
    if scalars:
        raise ValueError(
            f"parameter {scalars[0]} is a scalar (0-d): FSDP2 shards parameters along their first "
            f"dimension; make it a tensor of shape (1,)"
        )
    for name, moe in _moe_layers(model):
        where = f"MoE layer {name or '(root)'}"
        if moe.scope.spans_ranks:
            raise ValueError(f"{where} is already expert-parallel")
        if not isinstance(moe.experts, GroupedExperts):
            raise ValueError(
                f"{where}: expert parallelism needs the stacked FFN experts, not a heterogeneous expert list"
            )
        if moe.cfg.num_experts % ep:
            raise ValueError(
                f"{where} has num_experts={moe.cfg.num_experts}, which the expert-parallel size {ep} must divide"
            )
        if moe.cfg.revive_after is not None:
            raise ValueError(f"{where}: revive_after (dead-expert revival) is not supported with expert parallelism")


def _fingerprint(model: nn.Module, layout: str, statistics: str, sync_init: bool) -> str:
    """What every rank must agree on: the layout, the tensors, and each MoE layer's config (it
    decides which collectives a forward runs: capacity, expert choice and re-routing gather rows)."""
    h = hashlib.sha256(f"{layout}:{statistics}:{sync_init};".encode())
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
    for name, moe in _moe_layers(model):
        h.update(f"{name}:{moe.cfg!r};".encode())
    return h.hexdigest()[:16]


def _shard_experts(experts: GroupedExperts, ep_mesh, lo: int, El: int) -> None:
    """Replace the stacked expert weights by DTensors sharded on the expert dimension over
    ``ep_mesh`` (``Shard(0)``), each rank holding experts [lo, lo + El)."""
    with torch.no_grad():  # the shards keep the full tensors' requires_grad (frozen experts stay frozen)
        for pname in ("w_up", "w_down"):
            full = getattr(experts, pname)
            local = full[lo : lo + El].clone()
            shard = DTensor.from_local(
                local, ep_mesh, [Shard(0)], run_check=False, shape=full.shape, stride=full.stride()
            )
            setattr(experts, pname, nn.Parameter(shard, requires_grad=full.requires_grad))


def _expert_parallel(
    model: nn.Module, mesh, expert_parallel: Optional[int], statistics: str, sync_init: bool, tp: int = 1
):
    """The expert-parallel step: checks, the ranks' agreement, the initial broadcast, each MoE
    layer's sharded experts, hooks and scope; (handle, the flattened mesh)."""
    mesh = _checked_mesh(model, mesh, expert_parallel, statistics)
    drain_at_exit()
    ep = mesh.size(1)
    flat = flat_mesh(mesh)  # made once: slicing a flattened dimension again is deprecated
    group = flat.get_group()
    _agree_on_model(model, f"{ep}x{tp}", statistics, sync_init, group)
    handle = ExpertParallel(model, mesh, statistics, flat)
    on_meta = any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    if sync_init and not on_meta:  # a meta-built model is initialised alike on every rank by materialize_
        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                run_collective("initial broadcast", dist.broadcast, t.data, group=group, group_src=0)
    for name, moe in _moe_layers(model):
        _make_expert_parallel(moe, name, handle)
    return handle, flat


def _checked_mesh(model: nn.Module, mesh, expert_parallel: Optional[int], statistics: str):
    """The (dp, ep) mesh to use, after every check that needs no communication."""
    if mesh is None and expert_parallel is None:
        raise ValueError("pass a (dp, ep) mesh or expert_parallel=N")
    if mesh is not None and tuple(mesh.mesh_dim_names or ()) != ("dp", "ep"):
        raise ValueError(f"mesh must have dimensions ('dp', 'ep'); got {mesh.mesh_dim_names}")
    ep = expert_parallel if mesh is None else mesh.size(1)
    if not dist.is_initialized():
        raise ValueError("torch.distributed is not initialised: launch with torchrun and call init_distributed() first")
    check_positive("expert_parallel", ep, integer=True)
    assert ep is not None  # check_positive refused None
    ranks = dist.get_world_size() if mesh is None else mesh.size()
    if ranks % ep:
        raise ValueError(f"expert_parallel={ep} must divide the world size {ranks}")
    _validate(model, ep, statistics)
    if mesh is None:
        return make_mesh(ep, _device_type(model))
    if mesh.device_type == "meta":
        raise ValueError(
            "mesh must be made for the device the parameters will live on ('cpu' or 'cuda'), not 'meta': "
            "build the model on meta if you like, but make the mesh with make_mesh(n, 'cpu' or 'cuda')"
        )
    return mesh


def _agree_on_model(model: nn.Module, layout: str, statistics: str, sync_init: bool, group) -> None:
    """The first communication: every rank of the mesh (``group``) must hold the same model and
    layout (else a clear error on every rank, before any collective could hang on a difference)."""
    prints = all_gather_objects("model check", _fingerprint(model, layout, statistics, sync_init), group)
    if len(set(prints)) > 1:
        bad = [r for r, p in enumerate(prints) if p != prints[0]]
        raise ValueError(
            f"ranks {bad} built a different model (parameter names, shapes or dtypes, or MoE layer configs) "
            f"or passed a different expert- or tensor-parallel size, statistics or sync_init than rank 0: "
            f"build the same model with the same settings on every rank"
        )


def _make_expert_parallel(moe: MoE, name: str, handle: ExpertParallel) -> None:
    """One layer: its experts sharded over ``ep``, the all-to-all hooks on them, and the scope
    through which its routing statistics span the ranks."""
    stats_group, stats_size = {
        "global": (handle.group, handle.world_size),
        "expert": (handle.ep_group, handle.ep_size),
        "local": (None, 1),
    }[handle.statistics]
    E = moe.cfg.num_experts
    El = E // handle.ep_size
    assert isinstance(moe.experts, GroupedExperts)  # checked with the model
    _shard_experts(moe.experts, handle.mesh["ep"], handle.ep_rank * El, El)
    moe.experts.num_experts = El
    moe.scope = _LayerScope(stats_group, stats_size, handle.group, handle.world_size)
    ExpertAllToAll(handle.ep_group, E).attach(moe.experts)


def _device_type(model: nn.Module) -> str:
    """The device type of the model's parameters; for a meta-built model, the process group's
    (NCCL: cuda, else cpu), since the mesh must describe where the tensors will live."""
    p = next(iter(model.parameters()), None)
    if p is None or p.is_meta:
        return "cuda" if dist.get_backend() == "nccl" else "cpu"
    return p.device.type
