"""The handle of a parallel layout (:class:`ExpertParallel`, made by
:func:`~moekit.parallel.parallelize`): its meshes and groups, the training objective's per-rank
term, gradient clipping by the whole model's norm, the few small collectives training needs
besides FSDP's own, and the full (one-process) state dict and optimizer state."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from .collectives import run_collective
from .mesh import flat_mesh
from .stats import _summed


class RankGroup:
    """The few small collectives training needs besides FSDP's own, over a handle's ``group``
    (``rank``, ``world_size``; tensors made on the device of ``model``'s parameters)."""

    model: nn.Module
    group: Any
    rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

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


class ExpertParallel(RankGroup):
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
        self.tp_mesh = None  # the (fsdp, tp) mesh under tensor parallelism (set by parallelize)

    @property
    def tp_size(self) -> int:
        return 1 if self.tp_mesh is None else self.tp_mesh.size(1)

    @property
    def tp_rank(self) -> int:
        return 0 if self.tp_mesh is None else self.tp_mesh.get_local_rank("tp")

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
    def grad_norm(self, exclude: Sequence[Tensor] = ()) -> Tensor:
        """The norm of the whole (unsharded) model's gradient (float64; collective), leaving out
        the parameters in ``exclude`` (e.g. a tied weight counted by another pipeline stage)."""
        norms = []
        left_out = {id(p) for p in exclude}
        for params in self._grads_by_mesh().values():
            grads = [p.grad for p in params if id(p) not in left_out]
            if not grads:
                continue
            n = torch.nn.utils.get_total_norm(grads, 2.0)
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
        index = {name: i for i, name in enumerate(optimizer_names(self.model, opt))}
        return {
            "state": {index[n]: st for n, st in by_name["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in by_name["param_groups"]],
        }

    def load_full_optimizer_state_dict(self, opt: torch.optim.Optimizer, sd: dict) -> None:
        """Load a single-process optimizer state dict (parameters by index) into this layout.
        Clears the parameters' gradients (PyTorch's loader initialises the state with a step)."""
        load_optimizer_by_names(self.model, opt, sd, optimizer_names(self.model, opt))


def load_optimizer_by_names(
    model: nn.Module, opt: torch.optim.Optimizer, sd: dict, names: Sequence[Optional[str]]
) -> None:
    """Load a single-process optimizer state dict (parameters by index; ``names[i]``: the name in
    ``model`` of parameter ``i``, None for one ``model`` does not hold) into ``model``'s
    (sharded) optimizer with PyTorch's ``set_optimizer_state_dict``. Clears the gradients."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    opt.zero_grad(set_to_none=True)
    by_name: dict[str, Any] = {  # new dicts: PyTorch replaces their values by this rank's shards
        "state": {names[int(i)]: dict(st) for i, st in sd["state"].items() if names[int(i)] is not None},
        "param_groups": [
            {**g, "params": [names[int(i)] for i in g["params"] if names[int(i)] is not None]}
            for g in sd["param_groups"]
        ],
    }
    set_optimizer_state_dict(model, opt, by_name, options=StateDictOptions(full_state_dict=True))


def _mesh_key(t: Tensor):
    """What groups tensors for one DTensor reduction: their mesh (None for a plain tensor)."""
    return id(t.device_mesh) if isinstance(t, DTensor) else None


def optimizer_names(model: nn.Module, opt: torch.optim.Optimizer) -> list[str]:
    """The names in ``model`` of ``opt``'s parameters, by index (``Optimizer.state_dict()``'s order)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in opt.param_groups for p in g["params"]]


__all__ = ["ExpertParallel", "RankGroup", "load_optimizer_by_names", "optimizer_names"]
