"""The one place that applies moekit's parallel dimensions to a model, in torchtitan's order:
expert parallelism (:mod:`.expert_parallel`), tensor parallelism (:mod:`.tensor_parallel`),
activation checkpointing, ``torch.compile`` per block, then FSDP2 (:mod:`.fsdp`). Each dimension
lives in its own module; this one checks the combination and calls them in order."""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch._dynamo
import torch.distributed as dist
from torch import nn

from ..config import AC_MODES, check_positive
from ..models.lm import MoETransformer
from .expert_parallel import _expert_parallel, _moe_layers
from .fsdp import _fully_shard
from .handle import ExpertParallel
from .pipeline import LMPipeline, PipelineParallel, pipeline_stage
from .tensor_parallel import apply_tensor_parallel, make_tp_mesh, tensor_parallel_problem


def parallelize(
    model: nn.Module,
    mesh=None,
    *,
    expert_parallel: Optional[int] = None,
    tensor_parallel: int = 1,
    activation_checkpointing: str = "none",
    compile: Union[bool, str] = False,
    statistics: str = "global",
    sync_init: bool = True,
    param_dtype: Optional[torch.dtype] = None,
) -> ExpertParallel:
    """Apply moekit's parallel dimensions to a built model, in torchtitan's order: expert
    parallelism (the experts of every :class:`~moekit.MoE` layer DTensors sharded on the expert
    dimension over the mesh's ``ep``, the token all-to-all as module hooks, the routing
    statistics' scope), then activation checkpointing (``"full"`` or ``"selective"``: a model with
    an ``activation_checkpointing`` attribute, like the LM), then ``torch.compile`` of each
    transformer block (``compile``: a model with ``blocks``; True for inductor, or the name of
    another ``torch.compile`` backend, e.g. ``"aot_eager"`` to tell a tracing problem from a
    code-generation one, as torchtitan's ``compile.backend``; the expert all-to-all, the routing
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
    backend = _compile_backend(compile)
    if backend and not isinstance(blocks, (nn.ModuleList, list)):
        raise ValueError(f"compile={compile!r} compiles each transformer block: {type(model).__name__} has no blocks")
    _check_tensor_parallel(model, tensor_parallel, activation_checkpointing, bool(backend))
    handle, flat = _expert_parallel(model, mesh, expert_parallel, statistics, sync_init, tensor_parallel)
    tp_groups, tp_mesh = [], None
    if tensor_parallel > 1:
        tp_mesh = make_tp_mesh(tensor_parallel, handle.mesh.device_type)
        tp_groups = apply_tensor_parallel(model, tp_mesh["tp"])
        handle.tp_mesh = tp_mesh
    if activation_checkpointing != "none":
        setattr(model, "activation_checkpointing", activation_checkpointing)  # noqa: B010 (a plain attribute)
    if backend:
        assert isinstance(blocks, (nn.ModuleList, list))  # checked above
        for block in blocks:
            block.compile(backend=backend)  # in place: FSDP2 then wraps the compiled block, as torchtitan does
    _fully_shard(model, handle.mesh, flat, [m for _, m in _moe_layers(model)], param_dtype, tp_groups, tp_mesh)
    return handle


def _compile_backend(compile: Union[bool, str]) -> Optional[str]:
    """The ``torch.compile`` backend ``compile`` names (True: inductor), or None (False)."""
    if isinstance(compile, bool):
        return "inductor" if compile else None
    if not isinstance(compile, str) or compile not in torch._dynamo.list_backends(exclude_tags=()):
        raise ValueError(
            "compile must be True (inductor), False, or the name of a torch.compile backend such as 'aot_eager' "
            f"(torch._dynamo.list_backends(exclude_tags=()) lists them); got {compile!r}"
        )
    return compile


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


def parallelize_pipeline(
    model: MoETransformer,
    mesh,
    n_microbatches: int,
    *,
    schedule: str = "1f1b",
    activation_checkpointing: str = "none",
    compile: Union[bool, str] = False,
    param_dtype: Optional[torch.dtype] = None,
) -> PipelineParallel:
    """Pipeline parallelism over a ``(pp, dp, ep)`` mesh of every rank
    (:func:`~moekit.parallel.make_mesh` with ``pipeline_parallel``): ``model`` (built the same on
    every rank, or on the meta device: then ``handle.model.materialize_(device)``) pruned to this
    rank's stage (:func:`~moekit.parallel.pipeline.pipeline_stage`), the stage given to
    :func:`parallelize` on its ``(dp, ep)`` slice (experts over ``ep``, activation checkpointing,
    compile per block, FSDP2 over the slice), and the pipeline of the ranks at this slice position
    (:class:`~moekit.parallel.pipeline.LMPipeline`, ``n_microbatches`` per step). Returns the
    layout's :class:`~moekit.parallel.pipeline.PipelineParallel` handle; train with
    ``handle.pipe.step``, clip with ``handle.pipe.clip_grad_norm_``."""
    stage_index, n_stages = mesh.get_local_rank("pp"), mesh.size(0)
    stage = pipeline_stage(model, stage_index, n_stages, n_microbatches)
    stage_parallel = parallelize(
        stage,
        mesh["dp", "ep"],
        activation_checkpointing=activation_checkpointing,
        compile=compile,
        param_dtype=param_dtype,
    )
    pipe = LMPipeline(
        stage, stage_index, n_stages, n_microbatches, mesh.get_group("pp"), schedule, stage_parallel, param_dtype
    )
    return PipelineParallel(pipe, mesh, stage_parallel)


__all__ = ["apply_expert_parallel", "parallelize", "parallelize_pipeline"]
