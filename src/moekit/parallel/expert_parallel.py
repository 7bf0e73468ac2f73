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
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Shard

from ..config import check_positive
from ..layer.experts import GroupedExperts
from ..layer.moe import MoE
from ..layer.scope import LocalScope
from .collectives import all_gather_objects, drain_at_exit, run_collective

STATISTICS = ("global", "expert", "local")


def _summed(t: Tensor, what: str, group=None) -> Tensor:
    """A copy of ``t`` summed over the ranks of ``group`` (all ranks when None)."""
    out = t.clone()
    run_collective(what, dist.all_reduce, out, group=group)
    return out


# ---------------------------------------------------------------------------- autograd collectives
class _AllToAll(torch.autograd.Function):
    """Uneven all-to-all of rows; the backward sends the row gradients back the same way."""

    @staticmethod
    def forward(ctx, x_ND, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x_ND.new_empty((sum(out_splits), *x_ND.shape[1:]))
        run_collective(
            "expert-parallel all-to-all",
            dist.all_to_all_single,
            out,
            x_ND.contiguous(),
            out_splits,
            in_splits,
            group=group,
        )
        return out

    @staticmethod
    def backward(ctx, g_ND):
        out_splits, in_splits = ctx.splits
        gx = g_ND.new_empty((sum(in_splits), *g_ND.shape[1:]))
        run_collective(
            "expert-parallel all-to-all (backward)",
            dist.all_to_all_single,
            gx,
            g_ND.contiguous(),
            in_splits,
            out_splits,
            group=ctx.group,
        )
        return gx, None, None, None


class _AllSum(torch.autograd.Function):
    """All-reduce (sum) of a statistic that every rank of the group then uses the same way.

    The exact adjoint is an all-reduce of the group's gradients; since they are identical on every
    rank (each holds 1/world of the objective: :meth:`ExpertParallel.aux_share`) it equals
    ``grad * group_size``, computed without communicating."""

    @staticmethod
    def forward(ctx, v, group, size):
        ctx.size = size
        return _summed(v, "all-reduce of routing statistics", group)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.size, None, None


@dataclass(frozen=True)
class _Handle:
    """What the experts' forward hook needs from the matching pre-hook."""

    x_ND: Tensor  # the rows this rank's experts received (in local-expert order)
    inverse_N: Tensor  # row of the received order for each row in local-expert order
    send: list  # rows sent to each EP rank
    recv: list  # rows received from each EP rank
    n_send: int
    R: int  # rows the layer handed to the experts (sum(counts_E) of them real)


class ExpertAllToAll:
    """Expert parallelism as module hooks on a layer's experts (GShard's all-to-all dispatch).

    The layer calls its experts as ``experts(x_RD, counts_E, backend)`` with the rows in global
    expert order. The pre-hook sends each expert's rows to the rank holding it (one uneven
    all-to-all after exchanging the counts) and hands the experts the rows of their El local
    experts, grouped by expert; the forward hook sends the results back the same way, so the layer
    gets ``y_RD`` in its own order. The layer's code is the single-process code."""

    def __init__(self, group, num_experts: int):
        self.group = group
        self.P = dist.get_world_size(group)
        self.El = num_experts // self.P
        self._pending: Optional[_Handle] = None  # set by the pre-hook, taken by the forward hook of the same call

    def attach(self, experts: nn.Module) -> None:
        experts.register_forward_pre_hook(self._before)
        experts.register_forward_hook(self._after, always_call=True)

    def _before(self, module: nn.Module, args: tuple) -> tuple:
        x_RD, counts_E, *rest = args
        self._pending = None  # a call that raised before its forward hook ran leaves nothing behind
        x_ND, counts_El, handle = self.dispatch(x_RD, counts_E)
        self._pending = handle
        return (x_ND, counts_El, *rest)

    def _after(self, module: nn.Module, args: tuple, y_ND: Optional[Tensor]) -> Optional[Tensor]:
        """The combine of this call's rows; also run (``always_call``) when the experts or a later
        pre-hook raised, with ``y_ND`` None: then it only drops the call's handle (the received rows
        and their graph), and the error goes on to the caller."""
        h, self._pending = self._pending, None
        if y_ND is None:
            return None
        if h is None:
            raise RuntimeError("expert-parallel experts: the forward hook ran without its pre-hook's dispatch")
        return self.combine(y_ND, h, module)

    def dispatch(self, x_RD: Tensor, counts_E: Tensor) -> tuple[Tensor, Tensor, _Handle]:
        """(rows of this rank's experts in local-expert order, rows per local expert, handle)."""
        P, El = self.P, self.El
        recv_PL = torch.empty_like(counts_E)
        run_collective("expert-parallel count exchange", dist.all_to_all_single, recv_PL, counts_E, group=self.group)
        host = torch.cat([counts_E.view(P, El).sum(1), recv_PL]).tolist()  # one host sync: split sizes
        send, recv_host = host[:P], host[P:]
        recv = [sum(recv_host[p * El : (p + 1) * El]) for p in range(P)]
        n_send, N = sum(send), sum(recv)
        x_ND = _AllToAll.apply(x_RD[:n_send], recv, send, self.group)  # rows by (source rank, local expert)
        # reorder to (local expert, source rank) so each expert's rows are contiguous
        C_PL = recv_PL.view(P, El)
        lens_LP = C_PL.t().reshape(-1)
        src_start_LP = (C_PL.reshape(-1).cumsum(0) - C_PL.reshape(-1)).view(P, El).t().reshape(-1)
        dst_start_LP = lens_LP.cumsum(0) - lens_LP
        perm_N = torch.repeat_interleave(src_start_LP - dst_start_LP, lens_LP, output_size=N)
        perm_N = perm_N + torch.arange(N, device=perm_N.device)
        inverse_N = torch.empty_like(perm_N).scatter_(0, perm_N, torch.arange(N, device=perm_N.device))
        x_ND = x_ND[perm_N]
        return x_ND, C_PL.sum(0), _Handle(x_ND, inverse_N, send, recv, n_send, x_RD.shape[0])

    def combine(self, y_ND: Tensor, h: _Handle, experts: nn.Module) -> Tensor:
        """The experts' rows back on the ranks that sent them, in the layer's row order."""
        if torch.is_grad_enabled():
            # Every rank must run the same collectives in backward. A rank whose experts got no
            # rows may get an output with no graph (or none back to the received rows or to the
            # weights); tie it to both, and make it require grad, so its backward all-to-alls run
            # like everyone else's and FSDP's reduction over the expert's replicas gets (zero)
            # gradients from it too.
            if y_ND.shape[0] == 0:
                held = [p.to_local() if isinstance(p, DTensor) else p for p in experts.parameters() if p.requires_grad]
                ties = ([h.x_ND] if h.x_ND.requires_grad else []) + held
                if ties:
                    y_ND = y_ND + sum(t.sum() for t in ties) * 0
            if not y_ND.requires_grad:
                y_ND = y_ND.detach().requires_grad_()
        y_back = _AllToAll.apply(y_ND[h.inverse_N], h.send, h.recv, self.group)
        return F.pad(y_back, (0, 0, 0, h.R - h.n_send)) if h.R > h.n_send else y_back


class _LayerScope(LocalScope):
    """What one MoE layer sees of the parallel layout (``MoE.scope``): the statistics group's row
    gather and differentiable sums, and a sum over all ranks."""

    spans_ranks = True

    def __init__(self, stats_group, stats_size: int, group, world_size: int):
        """``group``: every rank of the model's mesh (``world_size`` of them), the scope of the call
        check, the global draws and :meth:`world_sum`: not the default group, so a model on part
        of the ranks (a pipeline stage, an evaluation on some) talks to its own ranks only."""
        self.stats_group, self.stats_size = stats_group, stats_size
        self.group, self.world_size = group, world_size
        self._rows: list[int] = []  # tokens of each rank in the current call (mesh order)
        self._rows_of: dict[int, int] = {}  # the same, by global rank

    def begin_call(self, num_tokens: int, settings: tuple, device: torch.device) -> None:
        """One small all-gather over all ranks per layer call: every rank's token count (for the
        random draws) and settings, compared before any other collective can hang on a mismatch."""
        code = [num_tokens] + [-1 if v is None else int(round(float(v) * 1e6)) for v in settings]
        mine = torch.tensor(code, dtype=torch.int64, device=device)  # on the input's device: NCCL needs CUDA tensors
        every = [torch.empty_like(mine) for _ in range(self.world_size)]
        run_collective("layer-call check", dist.all_gather, every, mine, group=self.group)
        codes = torch.stack(every).tolist()  # the call's one read to the host (a sync on a GPU)
        rows = [c[0] for c in codes]
        if any(c[1:] != code[1:] for c in codes):
            names = ("top_k", "training", "grad enabled", "capacity factor x1e6 (-1: none)")
            table = "; ".join(
                f"rank {r}: " + ", ".join(f"{n}={v}" for n, v in zip(names, c[1:])) for r, c in enumerate(codes)
            )
            raise ValueError(
                f"an expert-parallel MoE layer was called differently on different ranks ({table}): "
                f"every rank must call the model alike (same top_k, train/eval mode, grad mode, "
                f"capacity factor)"
            )
        self._rows = rows
        self._rows_of = dict(zip(dist.get_process_group_ranks(self.group), rows))  # by global rank

    def random_rows(self, draw, like_TX: Tensor) -> Tensor:
        """Random values drawn for the global batch (every rank draws the same), this rank's rows
        kept: routing noise then equals one process's on the concatenated batch."""
        if self.world_size == 1 or not self._rows:
            return draw(torch.empty_like(like_TX))
        start = sum(self._rows[: dist.get_rank(self.group)])
        full = draw(like_TX.new_empty((sum(self._rows), *like_TX.shape[1:])))
        return full[start : start + like_TX.shape[0]]

    def gather_rows(self, t: Tensor) -> tuple[Tensor, int]:
        """All ranks' rows (one per token of the call) in rank order and where the local ones
        start. The local rows are ``t`` itself (they keep their graph); the others are constants.
        Each rank's row count is its token count, which the call check already brought to the
        host: no count gather and no second read."""
        if self.stats_size == 1:
            return t, 0
        g, W = self.stats_group, self.stats_size
        if self._rows_of:
            sizes = [self._rows_of[r] for r in dist.get_process_group_ranks(g)]
        else:  # called outside a layer call (no call check): gather the counts
            n = torch.tensor([t.shape[0]], device=t.device)
            parts: list = [torch.empty_like(n) for _ in range(W)]
            run_collective("row-count gather", dist.all_gather, parts, n, group=g)
            sizes = torch.cat(parts).tolist()
        pad = max(sizes) - t.shape[0]
        mine = F.pad(t.detach(), (0, 0) * (t.dim() - 1) + (0, pad)) if pad else t.detach().contiguous()
        parts = [torch.empty_like(mine) for _ in range(W)]
        run_collective("routing gather", dist.all_gather, parts, mine, group=g)
        me = dist.get_rank(g)
        rows = [t if i == me else parts[i][: sizes[i]] for i in range(W)]
        return torch.cat(rows), sum(sizes[:me])

    def all_sum(self, v: Tensor) -> Tensor:
        if self.stats_size == 1:
            return v
        if v.requires_grad:
            return _AllSum.apply(v, self.stats_group, self.stats_size)
        return _summed(v, "all-reduce of routing statistics", self.stats_group)

    def world_sum(self, v: Tensor) -> Tensor:
        """Sum over all ranks (not differentiable): for replicated state, which every rank must
        update alike whatever the statistics group."""
        return _summed(v, "all-reduce over all ranks", self.group) if self.world_size > 1 else v.clone()

    def all_sum_dict(self, sums: dict) -> dict:
        """One all-reduce for a dict of same-dtype tensors."""
        keys = list(sums)
        flat = self.all_sum(torch.cat([sums[k].reshape(-1) for k in keys]))
        return dict(zip(keys, flat.split([sums[k].numel() for k in keys])))


# ---------------------------------------------------------------------------- mesh and setup
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


def _fingerprint(model: nn.Module, ep: int, statistics: str, sync_init: bool) -> str:
    """What every rank must agree on: the layout, the tensors, and each MoE layer's config (it
    decides which collectives a forward runs: capacity, expert choice and re-routing gather rows)."""
    h = hashlib.sha256(f"{ep}:{statistics}:{sync_init};".encode())
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
    for name, moe in _moe_layers(model):
        h.update(f"{name}:{moe.cfg!r};".encode())
    return h.hexdigest()[:16]


class ExpertParallel:
    """The expert × data parallel layout of one model (made by :func:`apply_expert_parallel`):
    its mesh and groups, which parameters are expert shards, and the few collectives training
    needs besides FSDP's own."""

    def __init__(self, model: nn.Module, mesh, statistics: str, flat_mesh=None):
        """``flat_mesh``: the mesh's ranks as one dimension (made from ``mesh`` when not given)."""
        self.model, self.mesh, self.statistics = model, mesh, statistics
        self.flat_mesh = flat_mesh if flat_mesh is not None else _flat_mesh(mesh)
        self.ep_group, self.dp_group = mesh.get_group("ep"), mesh.get_group("dp")
        self.ep_size, self.dp_size = mesh.size(1), mesh.size(0)
        self.ep_rank, self.dp_rank = mesh.get_local_rank("ep"), mesh.get_local_rank("dp")
        # every rank of the mesh (all ranks, or a pipeline stage's): the scope of moekit's own
        # collectives, never the default group
        self.group = self.flat_mesh.get_group()
        self.world_size, self.rank = dist.get_world_size(self.group), dist.get_rank(self.group)

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
        by_mesh: dict = {}
        for p in self.model.parameters():
            if p.grad is not None:
                by_mesh.setdefault(_mesh_key(p.grad), []).append(p)
        norms = []
        for params in by_mesh.values():
            n = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
            norms.append((n.full_tensor() if isinstance(n, DTensor) else n).double())
        total = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros((), dtype=torch.float64)
        for params in by_mesh.values():
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total.to(params[0].grad.device, torch.float32))
        return total.float().cpu()

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


def _flat_mesh(mesh):
    """All ranks as one mesh dimension ("dp_ep"), for the parameters every rank shards."""
    try:
        return mesh["dp_ep"]
    except (KeyError, RuntimeError, ValueError):
        return mesh._flatten("dp_ep")


def _expert_shard_dim(dp: int):
    """FSDP's placement for a stacked expert weight over ``dp`` ranks: its expert dimension when
    every rank gets a whole number of this EP rank's experts, else its first feature dimension
    (dim 0 would leave some DP ranks with no expert at all and others with all of them, weights,
    gradients and AdamW moments alike, as torchtitan notes)."""
    from torch.distributed.tensor import Shard

    def placement(p: Tensor):
        local = p.to_local() if isinstance(p, DTensor) else p
        if local.dim() < 2 or local.shape[0] % dp == 0:
            return Shard(0)
        return Shard(1) if local.shape[1] % dp == 0 else None

    return placement


def _fully_shard(model: nn.Module, mesh, world, moes: list[MoE], param_dtype: Optional[torch.dtype]) -> None:
    """FSDP2 (``fully_shard``, ZeRO-3): each MoE layer's experts over the ranks that replicate
    them (mesh ``dp``), then each transformer block and the rest over all ranks, as torchtitan
    composes EP with FSDP. Every gradient is reduced with a plain sum (a divide factor of 1, and
    sum-type collectives, which gloo has: torch's default for a factor would be NCCL's
    PREMUL_SUM): the ranks' loss terms are already divided by the global token count
    (:meth:`ExpertParallel.loss`)."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype is not None else None
    kw: dict[str, Any] = {"mp_policy": mp} if mp is not None else {}
    dp = mesh["dp"].size()
    sharded: list[Any] = []  # FSDPModule subclasses of the modules' own classes
    for moe in moes:
        sharded.append(fully_shard(moe.experts, mesh=mesh["dp"], shard_placement_fn=_expert_shard_dim(dp), **kw))
    for block in getattr(model, "blocks", []):
        sharded.append(fully_shard(block, mesh=world, **kw))
    sharded.append(fully_shard(model, mesh=world, **kw))
    for m in sharded:
        assert isinstance(m, FSDPModule)
        m.set_gradient_divide_factor(1.0)
        m.set_force_sum_reduction_for_comms(True)
    # explicit prefetch (torchtitan's): each block's all-gather is issued by the block before it
    # (in backward: after it), so an MoE layer's host sync for its split sizes does not hold back
    # the next block's parameters
    blocks = [b for b in getattr(model, "blocks", []) if isinstance(b, FSDPModule)]
    for before, after in zip(blocks, blocks[1:]):
        before.set_modules_to_forward_prefetch([after])
        after.set_modules_to_backward_prefetch([before])


def apply_expert_parallel(
    model: nn.Module,
    mesh=None,
    *,
    expert_parallel: Optional[int] = None,
    statistics: str = "global",
    sync_init: bool = True,
    param_dtype: Optional[torch.dtype] = None,
) -> ExpertParallel:
    """Shard a built model over a (dp, ep) mesh (from :func:`make_mesh`; or pass
    ``expert_parallel`` to make one): the experts of every :class:`~moekit.MoE` layer become
    DTensors sharded on the expert dimension over ``ep`` with the token all-to-all as module hooks,
    and FSDP2 (``fully_shard``) shards every parameter further (see :func:`_fully_shard`).

    Args:
        model: the single-device model, built identically on every rank, or built on the meta
            device: then call ``model.materialize_(device)`` afterwards (no rank ever holds the
            whole model; every layout gets the single-process initial values).
        statistics: where routing statistics and capacity are decided: "global" (all ranks: the
            same as one process on the global batch), "expert" (within each EP group, GShard's
            groups), or "local" (each rank alone). The sigmoid router's bias update uses the
            global load in every case, so the replicated bias stays equal on all ranks.
        sync_init: broadcast rank 0's parameters and buffers first, so replicas start equal
            (skipped for a model on the meta device).
        param_dtype: FSDP's mixed-precision policy (e.g. ``torch.bfloat16`` on GPUs: bf16
            all-gathers and compute, gradients reduced in float32). It casts every parameter and
            each block's input, so the embeddings, norms and residual stream run in bf16 too: a
            different run from one process under autocast (what ``moekit train`` does: None,
            the parameters' own dtype).

    Returns:
        The :class:`ExpertParallel` handle. Gradients are reduced by FSDP during ``backward``;
        clip with ``handle.clip_grad_norm_``. Build the optimizer after this call. A model
        without MoE layers gets plain FSDP data parallelism.
    """
    mesh = _checked_mesh(model, mesh, expert_parallel, statistics)
    drain_at_exit()
    ep = mesh.size(1)
    flat = _flat_mesh(mesh)  # made once: slicing a flattened dimension again is deprecated
    group = flat.get_group()
    _agree_on_model(model, ep, statistics, sync_init, group)
    handle = ExpertParallel(model, mesh, statistics, flat)
    on_meta = any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    if sync_init and not on_meta:  # a meta-built model is initialised alike on every rank by materialize_
        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                run_collective("initial broadcast", dist.broadcast, t.data, group=group, group_src=0)
    moes = _moe_layers(model)
    for name, moe in moes:
        _make_expert_parallel(moe, name, handle)
    _fully_shard(model, mesh, flat, [m for _, m in moes], param_dtype)
    return handle


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


def _agree_on_model(model: nn.Module, ep: int, statistics: str, sync_init: bool, group) -> None:
    """The first communication: every rank of the mesh (``group``) must hold the same model and
    layout (else a clear error on every rank, before any collective could hang on a difference)."""
    prints = all_gather_objects("model check", _fingerprint(model, ep, statistics, sync_init), group)
    if len(set(prints)) > 1:
        bad = [r for r, p in enumerate(prints) if p != prints[0]]
        raise ValueError(
            f"ranks {bad} built a different model (parameter names, shapes or dtypes, or MoE layer configs) "
            f"or passed a different expert-parallel size, statistics or sync_init than rank 0: "
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
