"""Tensor parallelism for the language model (Megatron-LM, Shoeybi et al. 2019) with sequence
parallelism between the sharded maps (Korthikanti et al. 2022), on DTensor's ParallelStyles.

Within a tensor-parallel (TP) group of ``tp`` ranks, which all read the same batch:

- the residual stream is split along the sequence: each rank holds positions
  ``[r*S/tp, (r+1)*S/tp)`` of every sequence (the embedding's output is cut to them), and the
  norms, the MoE layers (router, routed experts, statistics), the final norm, the head and the
  loss run on those positions only, like data-parallel ranks on their own tokens;
- each attention gathers the whole sequence, computes its share of the heads (``wq``, ``wk``,
  ``wv`` by output rows: PyTorch's ``ColwiseParallel``) and reduce-scatters ``wo``'s partial sums
  back to the positions (``RowwiseParallel`` to ``Shard(1)``);
- each dense FFN and each MoE layer's shared experts do the same by hidden units: ``w_gate`` and
  ``w_up`` by columns, ``w_down`` by rows (:class:`_HiddenSharded`).

So every parameter outside the sharded maps gets from each rank the gradient of that rank's
positions, and FSDP's sum over all ranks completes it; a sharded map's shard gets the whole
sequence's gradient on its rank, and FSDP sums it over the ranks holding the same shard. The
sharded maps are DTensors on the ``tp`` dimension of their own (``fsdp``, ``tp``) mesh, so DCP
saves them as their full tensors and reshards them to any layout.

Shape legend: B batch, S sequence (S/tp per rank), D width, T = B*S/tp local tokens.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    parallelize_module,
)

from ..layer.experts import FeedForward
from ..layer.moe import MoE


def make_tp_mesh(tensor_parallel: int, device_type: str):
    """A (``fsdp``, ``tp``) mesh over all ranks: TP groups are consecutive ranks (one node), and
    ``fsdp`` runs across them (the ranks holding the same shards)."""
    from torch.distributed.device_mesh import init_device_mesh

    W = dist.get_world_size()
    return init_device_mesh(device_type, (W // tensor_parallel, tensor_parallel), mesh_dim_names=("fsdp", "tp"))


def tensor_parallel_problem(model: nn.Module, tp: int) -> str | None:
    """Why ``model`` cannot be split ``tp`` ways (None when it can); needs no communication."""
    from ..models.lm import MoETransformer

    if not isinstance(model, MoETransformer):
        return f"tensor parallelism shards moekit's language model (MoETransformer), not {type(model).__name__}"
    if getattr(model, "_pruned", False):
        return "a pipeline stage cannot be tensor-parallel yet"
    cfg = model.cfg
    heads = {"n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads or cfg.n_heads}
    for name, n in heads.items():
        if n % tp:
            return f"{name}={n} must be divisible by tensor_parallel={tp} (each rank computes whole heads)"
    if cfg.qk_norm == "full":
        return "qk_norm='full' normalises over all heads at once, which no rank holds under tensor parallelism"
    for name, m in model.named_modules():
        if isinstance(m, FeedForward) and m.hidden_dim % tp:
            return f"{name}: hidden width {m.hidden_dim} must be divisible by tensor_parallel={tp}"
    return None


def apply_tensor_parallel(model: nn.Module, tp_mesh) -> list[list[nn.Module]]:
    """Shard ``model``'s attention projections, dense FFNs and shared experts over ``tp_mesh``
    and put the sequence split on it (hooks). Returns the groups of sharded modules, which FSDP
    wraps over the mesh's other dimension."""
    from ..models.lm import Attention, MoETransformer

    assert isinstance(model, MoETransformer)  # tensor_parallel_problem checked it
    rank, tp = tp_mesh.get_local_rank(), tp_mesh.size()
    groups: list[list[nn.Module]] = []
    for block in model.blocks:
        attn = block.attn
        assert isinstance(attn, Attention)
        parallelize_module(
            attn,
            tp_mesh,
            {
                "wq": _local_data(ColwiseParallel()),
                "wk": _local_data(ColwiseParallel()),
                "wv": _local_data(ColwiseParallel()),
                "wo": _local_data(RowwiseParallel(output_layouts=Shard(1))),
            },
        )
        # (x, cos, sin, cache, layer, positions): the whole sequence, as a DTensor, for wq/wk/wv
        rest = (None,) * 5
        PrepareModuleInput(
            input_layouts=(Shard(1), *rest), desired_input_layouts=(Replicate(), *rest), use_local_output=False
        )._apply(attn, tp_mesh)
        groups.append([attn.wq, attn.wk, attn.wv, attn.wo])
        if isinstance(block.ffn, FeedForward):
            parallelize_module(block.ffn, tp_mesh, _HiddenSharded(seq_dim=1))
            groups.append([block.ffn])
        elif isinstance(block.ffn, MoE):
            if isinstance(block.ffn.shared, FeedForward):  # on the layer's (T, D) token rows
                parallelize_module(block.ffn.shared, tp_mesh, _HiddenSharded(seq_dim=0))
                groups.append([block.ffn.shared])
            block.ffn.register_forward_pre_hook(_TokenIdsOfPositions(rank, tp), with_kwargs=True)
    model.embed.register_forward_hook(lambda _m, _args, x_BSD: positions(x_BSD, rank, tp))
    model.register_forward_pre_hook(_TargetsOfPositions(rank, tp), with_kwargs=True)
    return groups


def _local_data(style: ParallelStyle) -> ParallelStyle:
    """``style`` sharding each rank's own copy of the parameters (every rank holds the same
    model: no scatter from one rank, and a meta-built model stays on meta)."""
    style.src_data_rank = None
    return style


def positions(t_BS: Tensor, rank: int, tp: int) -> Tensor:
    """This rank's positions of every sequence (a slice: the other positions' gradient is zero)."""
    S = t_BS.shape[1]
    if S % tp:
        raise ValueError(f"sequence length {S} must be divisible by tensor_parallel={tp} (each rank takes S/tp)")
    return t_BS.narrow(1, rank * (S // tp), S // tp)


class _TargetsOfPositions:
    """The model's forward pre-hook: the loss runs on this rank's positions; no KV cache (decoding
    is one process's)."""

    def __init__(self, rank: int, tp: int):
        self.rank, self.tp = rank, tp

    def __call__(self, _model, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if kwargs.get("cache") is not None:
            raise ValueError("a tensor-parallel model decodes with no KV cache: generate with the unsharded model")
        if len(args) > 1 and args[1] is not None:
            args = (args[0], positions(args[1], self.rank, self.tp), *args[2:])
        elif kwargs.get("targets_BS") is not None:
            kwargs = {**kwargs, "targets_BS": positions(kwargs["targets_BS"], self.rank, self.tp)}
        return args, kwargs


class _TokenIdsOfPositions:
    """An MoE layer's forward pre-hook: its token ids (hash routing) are this rank's positions'."""

    def __init__(self, rank: int, tp: int):
        self.rank, self.tp = rank, tp

    def __call__(self, _moe, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        ids = kwargs.get("token_ids")
        if ids is not None and ids.dim() == 2:
            kwargs = {**kwargs, "token_ids": positions(ids, self.rank, self.tp)}
        return args, kwargs


class _HiddenSharded(ParallelStyle):
    """A :class:`~moekit.layer.experts.FeedForward` split by hidden units: ``w_gate`` and ``w_up``
    by columns, ``w_down`` by rows; its input gathered along ``seq_dim`` from the ranks and its
    partial sums reduce-scattered back (Megatron's MLP with sequence parallelism)."""

    def __init__(self, seq_dim: int):
        super().__init__()
        self.seq_dim = seq_dim
        self.src_data_rank = None

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        if not isinstance(module, FeedForward):
            raise TypeError(f"expected a moekit FeedForward; got {type(module).__name__}")
        # (PyTorch's annotation says the input and output functions return None; they return the
        # replacements, as its docstring says)
        gather, scatter = self._gather_input, self._scatter_output
        if self.seq_dim == 0:  # a shared expert's token rows, whose count dynamo traces as a symbol
            # that DTensor's redistribution cannot take: these collectives run between the graphs
            gather, scatter = torch.compiler.disable(gather), torch.compiler.disable(scatter)
        return distribute_module(
            module,
            device_mesh,
            self._shard_params,
            gather,  # type: ignore[arg-type]
            scatter,  # type: ignore[arg-type]
        )

    def _shard_params(self, _name: str, module: nn.Module, mesh) -> None:
        if not isinstance(module, FeedForward):
            return
        for pname, dim in (("w_gate", 1), ("w_up", 1), ("w_down", 0)):
            p = getattr(module, pname)
            if p is None or isinstance(p, DTensor):
                continue
            shard = distribute_tensor(p.detach(), mesh, [Shard(dim)], src_data_rank=self.src_data_rank)
            module.register_parameter(pname, nn.Parameter(shard, requires_grad=p.requires_grad))

    def _gather_input(self, _module, inputs: tuple, mesh) -> tuple:
        x = DTensor.from_local(inputs[0], mesh, [Shard(self.seq_dim)], run_check=False)
        # each rank's hidden units add their part to the input's gradient: a reduce-scatter back
        return (x.redistribute(mesh, [Replicate()]).to_local(grad_placements=[Partial()]), *inputs[1:])

    def _scatter_output(self, _module, y: Any, mesh) -> Tensor:
        partial = DTensor.from_local(y, mesh, [Partial()], run_check=False)
        return partial.redistribute(mesh, [Shard(self.seq_dim)]).to_local()


__all__ = ["apply_tensor_parallel", "make_tp_mesh", "positions", "tensor_parallel_problem"]
