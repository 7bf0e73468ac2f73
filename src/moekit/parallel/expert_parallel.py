"""Expert parallelism on ``torch.distributed`` (GShard, Lepikhin et al. 2020), combined with data
parallelism on a (dp, ep) device mesh.

The experts of every MoE layer are split over the P ranks of an expert-parallel (EP) group: EP
rank p holds experts [p*El, (p+1)*El). Each rank routes its own tokens, exchanges per-expert
counts, sends each routed slot's row to the rank holding its expert with one uneven
``all_to_all_single``, runs its local experts with the same grouped path as one process, and
sends the results back to be combined. The model code stays single-device:
:func:`apply_expert_parallel` shards a built model (or one built on the meta device, then
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
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Shard

from ..config import AC_MODES, check_positive
from ..layer.experts import GroupedExperts
from ..layer.moe import MoE
from .collectives import all_gather_objects, drain_at_exit, run_collective
from .dispatch import ExpertAllToAll
from .fsdp import _fully_shard
from .mesh import flat_mesh, make_mesh
from .stats import _LayerScope, _summed
from .tensor_parallel import apply_tensor_parallel, make_tp_mesh, tensor_parallel_problem

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


class ExpertParallel:
    """The expert × data parallel layout of one model (made by :func:`apply_expert_parallel`):
    its mesh and groups, which parameters are expert shards, and the few collectives training
    needs besides FSDP's own."""

    def __init__(self, model: nn.Module, mesh, statistics: str, flat=None):
        """``flat``: the mesh's ranks as one dimension (made from ``mesh`` when not given)."""
        self.model, self.mesh, self.statistics = model, mesh, statistics
        self.flat_mesh = flat if flat is not None else flat_mesh(mesh)
        self.ep_group, self.dp_group = mesh.get_group("ep"), mesh.get_group("dp")
        self.ep_size, self.dp_size = mesh.size(1), mesh.size(0)
        self.ep_rank, self.dp_rank = mesh.get_local_rank("ep"), mesh.get_local_rank("dp")
        # every rank of the mesh (all ranks, or a pipeline stage's): the scope of moekit's own
        # collectives, never the default group
        self.group = self.flat_mesh.get_group()
        self.world_size, self.rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        self.tp_mesh = None  # the (fsdp, tp) mesh under tensor parallelism
        self.tp_size, self.tp_rank = 1, 0

    def set_tensor_parallel(self, tp_mesh) -> None:
        self.tp_mesh, self.tp_size, self.tp_rank = tp_mesh, tp_mesh.size(1), tp_mesh.get_local_rank("tp")

    @property
    def data_rank(self) -> int:
        """Which of :attr:`data_size` parts of a global batch this rank reads (the ranks of a
        tensor-parallel group read the same part)."""
        return self.rank if self.tp_mesh is None else self.tp_mesh.get_local_rank("fsdp")

    @property
    def data_size(self) -> int:
        return self.world_size // self.tp_size

    def positions(self, t_BS: Tensor) -> Tensor:
        """This rank's positions of per-position values ``t_BS`` (the model's logits cover only
        those under tensor parallelism); ``t_BS`` itself otherwise."""
        from .tensor_parallel import positions

        return t_BS if self.tp_size == 1 else positions(t_BS, self.tp_rank, self.tp_size)

    # ------------------------------------------------------------------ the objective
    def loss(self, out) -> Tensor:
        """This rank's term of the training objective for a language model's output (``out.loss_sum``,
        ``out.n_targets``, ``out.aux_loss``): :meth:`global_mean` of the task loss plus
        :meth:`aux_share` of the auxiliary loss. FSDP sums the ranks' gradients: they are the
        gradients one process computes for the whole batch's mean loss."""
        return self.global_mean(out.loss_sum, out.n_targets) + self.aux_share(out.aux_loss)

    def global_mean(self, sum_local: Tensor, count_local: Tensor) -> Tensor:
        """``sum_local`` divided by the sum over ranks of ``count_local`` (one small all-reduce, no
        gradient): each rank's share of the global batch's mean, whatever each rank's count."""
        count = self.sum(count_local.detach().to(torch.float64).reshape(1))
        return sum_local / count.to(sum_local.device, sum_local.dtype).squeeze(0)

    def aux_share(self, aux: Tensor) -> Tensor:
        """A rank's share of the auxiliary loss it computed: 1 / world of it. A loss of statistics
        summed over a group of ranks (every rank of the group computes the same value) gets the
        group's gradient back through the sum's exact adjoint (:class:`_AllSum`); one of local
        statistics (e.g. a hierarchical layer's primary gate) is averaged over the ranks."""
        return aux / self.world_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ gradients
    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        """Clip by the norm of the whole (unsharded) model's gradient, as one process would;
        returns that norm. PyTorch's ``get_total_norm`` per mesh (the experts live on the 2-D
        (dp, ep) mesh, the rest on the flattened one, and one DTensor op cannot mix meshes), the
        parts combined, then ``clip_grads_with_norm_``: torchtitan's recipe for EP."""
        total = self.grad_norm()
        self.clip_grads_with_norm_(max_norm, total)
        return total.float().cpu()

    @torch.no_grad()
    def grad_norm(self) -> Tensor:
        """The norm of the whole (unsharded) model's gradient (float64; collective)."""
        norms = []
        for params in self._grads_by_mesh().values():
            n = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
            norms.append((n.full_tensor() if isinstance(n, DTensor) else n).double().cpu())
        return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros((), dtype=torch.float64)

    @torch.no_grad()
    def clip_grads_with_norm_(self, max_norm: float, total: Tensor) -> None:
        """Scale every gradient by ``max_norm / total`` when that is below 1."""
        for params in self._grads_by_mesh().values():
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total.to(params[0].grad.device, torch.float32))

    def _grads_by_mesh(self) -> dict:
        by_mesh: dict = {}
        for p in self.model.parameters():
            if p.grad is not None:
                by_mesh.setdefault(_mesh_key(p.grad), []).append(p)
        return by_mesh

    # ------------------------------------------------------------------ small collectives
    def mean(self, value: float) -> float:
        """Mean of a Python number over all ranks (for logging)."""
        t = torch.tensor([float(value)], dtype=torch.float64, device=self._device())
        run_collective("metric all-reduce", dist.all_reduce, t, group=self.group)
        return float(t) / self.world_size

    def sum(self, t: Tensor) -> Tensor:
        """Sum of a tensor over all ranks (a copy, on ``t``'s device)."""
        return _summed(t.to(self._device()), "all-reduce", self.group).to(t.device)

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on any (e.g. a Ctrl-C seen by one rank)."""
        t = torch.tensor([int(bool(flag))], device=self._device())
        run_collective("flag all-reduce", dist.all_reduce, t, op=dist.ReduceOp.MAX, group=self.group)
        return bool(t)

    def barrier(self) -> None:
        run_collective("barrier", dist.barrier, group=self.group)

    def _device(self) -> torch.device:
        p = next(iter(self.model.parameters()), None)
        return p.device if p is not None else torch.device("cpu")

    # ------------------------------------------------------------------ full (one-process) state
    def full_state_dict(self) -> dict:
        """The single-process state dict, every tensor whole on every rank (collective). It loads
        into an unsharded model as is."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))

    def load_full_state_dict(self, sd: dict) -> None:
        """Load a single-process state dict (from any layout): each rank keeps its part."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        # a copy: PyTorch replaces the dict's values by this rank's shards
        set_model_state_dict(self.model, dict(sd), options=StateDictOptions(full_state_dict=True))

    def full_optimizer_state_dict(self, opt: torch.optim.Optimizer) -> dict:
        """The optimizer state as a single process holds it (``Optimizer.state_dict()``'s format,
        parameters by index; collective)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        by_name: dict[str, Any] = get_optimizer_state_dict(
            self.model, opt, options=StateDictOptions(full_state_dict=True)
        )
        index = {name: i for i, name in enumerate(_optimizer_names(self.model, opt))}
        return {
            "state": {index[n]: st for n, st in by_name["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in by_name["param_groups"]],
        }

    def load_full_optimizer_state_dict(self, opt: torch.optim.Optimizer, sd: dict) -> None:
        """Load a single-process optimizer state dict (parameters by index) into this layout.
        Clears the parameters' gradients (PyTorch's loader initialises the state with a step)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        opt.zero_grad(set_to_none=True)
        names = _optimizer_names(self.model, opt)
        by_name: dict[str, Any] = {  # new dicts: PyTorch replaces their values by this rank's shards
            "state": {names[int(i)]: dict(st) for i, st in sd["state"].items()},
            "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in sd["param_groups"]],
        }
        set_optimizer_state_dict(self.model, opt, by_name, options=StateDictOptions(full_state_dict=True))


def _mesh_key(t: Tensor):
    """What groups tensors for one DTensor reduction: their mesh (None for a plain tensor)."""
    return id(t.device_mesh) if isinstance(t, DTensor) else None


def _optimizer_names(model: nn.Module, opt: torch.optim.Optimizer) -> list[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in opt.param_groups for p in g["params"]]


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


def parallelize(
    model: nn.Module,
    mesh=None,
    *,
    expert_parallel: Optional[int] = None,
    tensor_parallel: int = 1,
    activation_checkpointing: str = "none",
    compile: bool = False,
    statistics: str = "global",
    sync_init: bool = True,
    param_dtype: Optional[torch.dtype] = None,
) -> ExpertParallel:
    """Apply moekit's parallel dimensions to a built model, in torchtitan's order: expert
    parallelism (the experts of every :class:`~moekit.MoE` layer DTensors sharded on the expert
    dimension over the mesh's ``ep``, the token all-to-all as module hooks, the routing
    statistics' scope), then activation checkpointing (``"full"`` or ``"selective"``: a model with
    an ``activation_checkpointing`` attribute, like the LM), then ``torch.compile`` of each
    transformer block (``compile``: a model with ``blocks``; the expert all-to-all, the routing
    statistics' collectives and their host reads run eagerly between the compiled graphs), then
    FSDP2 (``fully_shard``) over the rest (see :func:`~moekit.parallel.fsdp._fully_shard`).
    Tensor parallelism comes after EP (:mod:`moekit.parallel.tensor_parallel`).

    Args:
        model: the single-device model, built identically on every rank, or built on the meta
            device: then call ``model.materialize_(device)`` afterwards (no rank ever holds the
            whole model; every layout gets the single-process initial values).
        mesh: a (dp, ep) mesh (:func:`~moekit.parallel.make_mesh`, or the ``("dp", "ep")`` slice
            of a larger one: moekit's collectives stay on its ranks), or None with
            ``expert_parallel`` to make one over all ranks.
        tensor_parallel: ranks per tensor-parallel group (consecutive ranks, which must read the
            same batch: :attr:`ExpertParallel.data_rank`): the language model's attention heads,
            dense FFNs and shared experts split between them, the sequence split between them
            everywhere else. The EP groups are laid out over all ranks independently.
        statistics: where routing statistics and capacity are decided: "global" (all the mesh's
            ranks: the same as one process on the global batch), "expert" (within each EP group,
            GShard's groups), or "local" (each rank alone). The sigmoid router's bias update uses
            the global load in every case, so the replicated bias stays equal on all ranks.
        sync_init: broadcast the mesh's first rank's parameters and buffers first, so replicas
            start equal (skipped for a model on the meta device).
        param_dtype: FSDP's mixed-precision policy (e.g. ``torch.bfloat16`` on GPUs: bf16
            all-gathers and compute, gradients reduced in float32). It casts every parameter and
            each block's input, so the embeddings, norms and residual stream run in bf16 too: a
            different run from one process under autocast (what ``moekit train`` does: None,
            the parameters' own dtype).

    Returns:
        The :class:`ExpertParallel` handle. Gradients are summed by FSDP during ``backward``
        (train on ``handle.loss(out)``); clip with ``handle.clip_grad_norm_``. Build the
        optimizer after this call. A model without MoE layers gets plain FSDP data parallelism.
    """
    if activation_checkpointing not in AC_MODES:
        modes = ", ".join(map(repr, AC_MODES))
        raise ValueError(f"activation_checkpointing must be one of {modes}; got {activation_checkpointing!r}")
    if activation_checkpointing != "none" and not hasattr(model, "activation_checkpointing"):
        raise ValueError(
            f"activation_checkpointing={activation_checkpointing!r}: {type(model).__name__} has no "
            "activation_checkpointing attribute (moekit's LM has; wrap other modules with torch.utils.checkpoint)"
        )
    blocks = getattr(model, "blocks", None)
    if compile and not isinstance(blocks, (nn.ModuleList, list)):
        raise ValueError(f"compile=True compiles each transformer block: {type(model).__name__} has no blocks")
    _check_tensor_parallel(model, tensor_parallel, activation_checkpointing, compile)
    handle, flat = _expert_parallel(model, mesh, expert_parallel, statistics, sync_init, tensor_parallel)
    tp_groups, tp_mesh = [], None
    if tensor_parallel > 1:
        tp_mesh = make_tp_mesh(tensor_parallel, handle.mesh.device_type)
        tp_groups = apply_tensor_parallel(model, tp_mesh["tp"])
        handle.set_tensor_parallel(tp_mesh)
    if activation_checkpointing != "none":
        setattr(model, "activation_checkpointing", activation_checkpointing)  # noqa: B010 (a plain attribute)
    if compile:
        assert isinstance(blocks, (nn.ModuleList, list))  # checked above
        for block in blocks:
            block.compile()  # in place: FSDP2 then wraps the compiled block, as torchtitan does
    _fully_shard(model, handle.mesh, flat, [m for _, m in _moe_layers(model)], param_dtype, tp_groups, tp_mesh)
    return handle


def _check_tensor_parallel(model: nn.Module, tp: int, activation_checkpointing: str, compile: bool) -> None:
    check_positive("tensor_parallel", tp, integer=True)
    if tp == 1:
        return
    if dist.is_initialized() and dist.get_world_size() % tp:
        raise ValueError(f"tensor_parallel={tp} must divide the world size {dist.get_world_size()}")
    why = tensor_parallel_problem(model, tp)
    if why:
        raise ValueError(why)
    if compile and activation_checkpointing == "selective":
        # selective checkpointing's op cache misses in the recomputation (PyTorch's "invocation
        # index ... not found in storage"): measured with the sequence-parallel collectives
        raise ValueError(
            "tensor_parallel > 1 with compile=True takes activation_checkpointing 'none' or 'full', not 'selective'"
        )


def apply_expert_parallel(
    model: nn.Module,
    mesh=None,
    *,
    expert_parallel: Optional[int] = None,
    statistics: str = "global",
    sync_init: bool = True,
    param_dtype: Optional[torch.dtype] = None,
) -> ExpertParallel:
    """:func:`parallelize` with expert and data parallelism only (FSDP2 over the rest)."""
    return parallelize(
        model,
        mesh,
        expert_parallel=expert_parallel,
        statistics=statistics,
        sync_init=sync_init,
        param_dtype=param_dtype,
    )


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
