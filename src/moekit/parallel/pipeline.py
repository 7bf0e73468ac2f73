"""Pipeline parallelism for moekit's language model on ``torch.distributed.pipelining``: the
blocks split into consecutive stages, one per rank of a pipeline group, run by a 1F1B schedule
(PipeDream-Flush, Narayanan et al. 2021) or GPipe's (Huang et al. 2019) over microbatches.

:func:`pipeline_stage` keeps of a built :class:`~moekit.models.MoETransformer` what one stage
runs (the embedding on the first, its blocks, the final norm and head on the last; the other
blocks become empty placeholders, so every parameter keeps its one-process name and a stage's
state dict is the whole model's restricted to it). :class:`LMPipeline` steps the schedule.

The objective is one process's gradient accumulation over the same microbatches: each
microbatch adds its summed cross-entropy divided by the whole batch's counted targets, plus its
stages' auxiliary losses divided by the number of microbatches. A stage's auxiliary loss joins
the backward through its output (:class:`_WithAuxLoss`, the trick Megatron-Core's MoE uses):
its gradient arrives with the output's, so the schedule needs no extra communication.

Tied input and output embeddings: the first and the last stage each hold the weight, and
:meth:`LMPipeline.step` sums its two gradients between them (Megatron-LM's embedding group), so
both copies take the same optimizer steps.

With expert and data parallelism (PP x EP x DP): each stage runs on a ``(dp, ep)`` slice of a
``(pp, dp, ep)`` mesh, the stage itself given to :func:`~moekit.parallel.parallelize` on that
slice (the stage is FSDP2's root: its embedding, norm and head are gathered when it runs), and
each slice position is one pipeline (``group``: the ranks of one ``(dp, ep)`` position) reading
its own rows. :class:`LMPipeline` then divides by the targets counted on every rank of the last
stage and each rank adds its share of the auxiliary losses (``parallel``: the stage's handle).

:func:`~moekit.parallel.parallelize_pipeline` builds all of it over a ``(pp, dp, ep)`` mesh of
every rank and returns :class:`PipelineParallel`, the layout's handle (what ``moekit train
--pipeline-parallel`` trains with). Tied embeddings: the first and last stage of each pipeline
hold the same FSDP shard of the weight and sum its gradients.

Not here: a balance loss pooled over all layers (``balance_pooling="model"``), hash routing (it
reads the token ids, which only the first stage has), tensor parallelism on a stage.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from ..config import PIPELINE_SCHEDULES
from ..models.lm import IGNORE_INDEX, MoETransformer, _checkpointed, summed_cross_entropy
from .collectives import all_gather_objects, run_collective
from .handle import RankGroup, load_optimizer_by_names

SCHEDULES = PIPELINE_SCHEDULES


class _Skipped(nn.Module):
    """A block another stage runs (keeps the block list's numbering: the parameters' names)."""


class _WithAuxLoss(torch.autograd.Function):
    """``x`` unchanged; in the backward, ``aux`` gets the gradient ``scale`` as if ``scale * aux``
    had been added to the loss."""

    @staticmethod
    def forward(ctx, x: Tensor, aux: Tensor, scale: float) -> Tensor:
        ctx.scale, ctx.aux_shape, ctx.aux_dtype = scale, aux.shape, aux.dtype
        return x.clone()

    @staticmethod
    def backward(ctx, g: Tensor):
        return g, torch.full(ctx.aux_shape, ctx.scale, dtype=ctx.aux_dtype, device=g.device), None


class LMStage(nn.Module):
    """One pipeline stage of a language model: ``forward(x)`` takes token ids (first stage) or
    the residual stream ``(B, S, D)`` and returns the residual stream or, on the last stage, the
    logits. Holds the model (pruned to the stage) as ``model``.

    ``routing``: None, or a list to which each forward appends one :class:`RoutingRecord` per MoE
    block it ran (what a trainer logs: a schedule's outputs never reach its caller)."""

    def __init__(self, model: MoETransformer, start: int, stop: int, first: bool, last: bool, aux_scale: float):
        super().__init__()
        self.model, self.start, self.stop, self.first, self.last = model, start, stop, first, last
        self.aux_scale = aux_scale
        self.routing: Optional[list[RoutingRecord]] = None

    @contextmanager
    def recording(self) -> Iterator[list[RoutingRecord]]:
        """A list that every forward inside the ``with`` block fills with its routing records."""
        records: list[RoutingRecord] = []
        self.routing = records
        try:
            yield records
        finally:
            self.routing = None

    @property
    def activation_checkpointing(self) -> str:
        """The model's (``"none"``, ``"full"`` or ``"selective"``): the stage's blocks re-run in the backward."""
        return self.model.activation_checkpointing

    @activation_checkpointing.setter
    def activation_checkpointing(self, mode: str) -> None:
        self.model.activation_checkpointing = mode

    @property
    def blocks(self) -> list[nn.Module]:
        """The blocks this stage runs (what :func:`~moekit.parallel.parallelize` wraps or compiles one by one)."""
        return [self.model.blocks[i] for i in range(self.start, self.stop)]

    def forward(self, x: Tensor) -> Tensor:
        m = self.model
        S = x.shape[1]
        cos, sin = m.rope_cos[:S], m.rope_sin[:S]
        if self.first:
            x = m.embed(x)
        aux: Optional[Tensor] = None
        mode = m.activation_checkpointing
        checkpointed = mode != "none" and self.training and torch.is_grad_enabled()
        for i, block in zip(range(self.start, self.stop), self.blocks):
            if checkpointed:
                x, res = _checkpointed(block, mode, x, cos, sin, None, None)
            else:
                x, res = block(x, cos, sin, None, None, None)
            if res is None:
                continue
            if torch.is_grad_enabled():
                aux = res.aux_loss if aux is None else aux + res.aux_loss
            if self.routing is not None:
                self.routing.append(RoutingRecord.of(i, res))
        if aux is not None and aux.requires_grad:
            x = _WithAuxLoss.apply(x, aux, self.aux_scale)
        return m._logits(x) if self.last else x


@dataclass(frozen=True)
class RoutingRecord:
    """What one MoE block of a stage did in one forward (detached tensors, read when logged): its
    layer index, the tokens each expert took ``(E,)``, the fraction of routed slots dropped, and
    its auxiliary loss (None without gradients: evaluation)."""

    layer: int
    tokens_per_expert: Tensor
    dropped_fraction: Tensor
    aux_loss: Optional[Tensor]

    @classmethod
    def of(cls, layer: int, res) -> RoutingRecord:
        aux = res.aux_loss.detach() if torch.is_grad_enabled() else None
        stats = res.stats
        return cls(layer, stats["tokens_per_expert"].detach(), torch.as_tensor(stats["dropped_fraction"]).detach(), aux)


def stage_bounds(n_layers: int, n_stages: int) -> list[tuple[int, int]]:
    """Consecutive block ranges, one per stage, as even as the layers allow (earlier stages get
    the extra blocks: the last also runs the head)."""
    base, extra = divmod(n_layers, n_stages)
    bounds, lo = [], 0
    for s in range(n_stages):
        hi = lo + base + (1 if s < extra else 0)
        bounds.append((lo, hi))
        lo = hi
    return bounds


def check_pipelinable(model: MoETransformer, n_stages: int, n_microbatches: int) -> None:
    """ValueError naming what keeps ``model`` from being split into ``n_stages`` stages."""
    cfg = model.cfg
    if n_stages < 1 or n_stages > cfg.n_layers:
        raise ValueError(f"pipeline_parallel must be between 1 and the model's {cfg.n_layers} layers; got {n_stages}")
    if n_microbatches < n_stages:
        raise ValueError(
            f"microbatches must be at least the {n_stages} stages (1F1B fills the pipe); got {n_microbatches}"
        )
    if cfg.moe is not None and cfg.balance_pooling == "model":
        raise ValueError(
            'pipeline parallelism needs balance_pooling="layer": a balance loss pooled over all layers spans the stages'
        )
    if cfg.moe is not None and cfg.moe.router == "hash":
        raise ValueError(
            "pipeline parallelism cannot run hash routing: it reads the token ids, which only the first stage has"
        )


def pipeline_stage(model: MoETransformer, stage: int, n_stages: int, n_microbatches: int) -> LMStage:
    """Prune ``model`` (in place) to pipeline stage ``stage`` of ``n_stages`` and wrap it. Build the
    same model on every rank first: from the same seed, or on the meta device (then call
    ``stage.model.materialize_(device)``: the stage gets the one-process values and no rank ever
    holds the whole model)."""
    check_pipelinable(model, n_stages, n_microbatches)
    if not 0 <= stage < n_stages:
        raise ValueError(f"stage must be in [0, {n_stages}); got {stage}")
    start, stop = stage_bounds(model.cfg.n_layers, n_stages)[stage]
    first, last = stage == 0, stage == n_stages - 1
    for i in range(model.cfg.n_layers):
        if not start <= i < stop:
            model.blocks[i] = _Skipped()
    model._pruned = True  # materialize_ then draws the one-process values of what the stage holds
    if not first and not (last and model.cfg.tie_embeddings):  # tied: the last stage's output projection
        model.embed = None  # type: ignore[assignment]  # the stage's forward reads it on the first stage only
    if not last:
        model.norm = None  # type: ignore[assignment]  # and these on the last only
        model.head = None
    return LMStage(model, start, stop, first, last, 1.0 / n_microbatches)


class LMPipeline:
    """Training steps of a pipeline-parallel language model: :meth:`step` on every rank of the
    pipeline group (the first stage reads the token ids, the last the targets). The stages are
    given their microbatches' shapes up front (PipelineStage's static mode): its runtime shape
    inference would run the stage once more on the first microbatch (later stages on
    uninitialised inputs), counting routing statistics that one process never counts."""

    def __init__(
        self,
        stage: LMStage,
        stage_index: int,
        n_stages: int,
        n_microbatches: int,
        group=None,
        schedule: str = "1f1b",
        parallel=None,
        activation_dtype: Optional[torch.dtype] = None,
    ):
        """``group``: the pipeline's ranks, stage i on its i-th (default: all ranks).
        ``parallel``: the stage's expert/data-parallel handle, when :func:`~moekit.parallel.parallelize`
        was given the stage on its ranks' ``(dp, ep)`` slice. ``activation_dtype``: the dtype of the
        residual stream the stages send each other (default: the parameters'; FSDP's
        ``param_dtype`` when it computes in another)."""
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(map(repr, SCHEDULES))}; got {schedule!r}")
        self.activation_dtype = activation_dtype
        self.stage, self.stage_index, self.n_stages = stage, stage_index, n_stages
        self.parallel = parallel
        if parallel is not None:  # each rank of the stage's slice adds its share of the auxiliary losses
            stage.aux_scale = 1.0 / (n_microbatches * parallel.world_size)
        self.partial_model = True  # for moekit.train.distcp: each rank saves and loads its stage's part
        self.n_microbatches, self.group, self.schedule = n_microbatches, group, schedule
        self._tied_group = self._embedding_group() if stage.model.cfg.tie_embeddings and n_stages > 1 else None
        self._schedules: dict[tuple[int, int], Any] = {}  # per batch shape
        self._n_targets: Optional[Tensor] = None

    def _embedding_group(self):
        """This pipeline's group of its first and last stage. ``new_group`` is collective over all
        ranks, with the same arguments in the same order: every pipeline's pair (one per
        ``(dp, ep)`` position) is gathered and each made on every rank."""
        ranks = dist.get_process_group_ranks(self.group) if self.group is not None else range(dist.get_world_size())
        mine = (ranks[0], ranks[self.n_stages - 1])  # stage i runs on the group's rank i
        pairs = sorted(set(all_gather_objects("tied-embedding groups", mine)))
        groups = {pair: dist.new_group(list(pair)) for pair in pairs}
        return groups[mine]

    def _sum_tied_embedding(self) -> None:
        """The tied embedding's gradient summed over its two holders (first and last stage; under
        FSDP both hold the same shard of it, whose gradients are summed)."""
        if self._tied_group is None or not (self.stage.first or self.stage.last):
            return
        w = self.stage.model.embed.weight
        if w.grad is None:
            w.grad = torch.zeros_like(w)
        local = w.grad.to_local() if isinstance(w.grad, DTensor) else w.grad
        run_collective("tied-embedding gradient all-reduce", dist.all_reduce, local, group=self._tied_group)

    def _tied_copy(self) -> Optional[Tensor]:
        """The last stage's copy of a tied embedding (its gradient is counted once, on the first)."""
        return self.stage.model.embed.weight if self._tied_group is not None and self.stage.last else None

    def _sent_dtype(self) -> torch.dtype:
        """The dtype of the residual stream the stages exchange."""
        return self.activation_dtype or next(self.stage.parameters()).dtype

    def _schedule_for(self, B: int, S: int):
        """The schedule over a stage told its microbatches' shapes (made once per batch shape)."""
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        if (B, S) not in self._schedules:
            M = self.n_microbatches
            if B % M:
                raise ValueError(f"the batch of {B} sequences must split into {M} equal microbatches")
            b, cfg = B // M, self.stage.model.cfg
            dtype, device = self._sent_dtype(), next(self.stage.parameters()).device

            def hidden(width: int) -> Tensor:  # a float tensor: its gradient travels back
                return torch.empty(b, S, width, device="meta", dtype=dtype, requires_grad=True)

            inp = torch.empty(b, S, dtype=torch.long, device="meta") if self.stage.first else hidden(cfg.dim)
            out = hidden(cfg.vocab_size if self.stage.last else cfg.dim)
            pipe = PipelineStage(
                self.stage, self.stage_index, self.n_stages, device, input_args=inp, output_args=out, group=self.group
            )
            kind = Schedule1F1B if self.schedule == "1f1b" else ScheduleGPipe
            self._schedules[B, S] = kind(pipe, M, loss_fn=self._loss, scale_grads=False)
        return self._schedules[B, S]

    def _loss(self, logits_BSV: Tensor, targets_BS: Tensor) -> Tensor:
        """A microbatch's summed cross-entropy over the whole batch's counted targets."""
        assert self._n_targets is not None  # set by step before the schedule runs
        return summed_cross_entropy(logits_BSV, targets_BS) / self._n_targets

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        """Clip every stage's gradients by the norm of the whole model's (PyTorch's
        ``get_total_norm`` per stage, one all-reduce of the squares over the pipeline group, then
        ``clip_grads_with_norm_``), as one process would; returns that norm. torchtitan's recipe
        for pipeline parallelism."""
        params = [p for p in self.stage.parameters() if p.grad is not None]
        tied = self._tied_copy()  # counted on the first stage
        if self.parallel is not None:  # the stage's whole gradient, over its slice's shards
            sq = self.parallel.grad_norm(exclude=[tied] if tied is not None else []).double().square().reshape(1)
        else:
            counted = [p.grad for p in params if p is not tied and p.grad is not None]
            sq = torch.nn.utils.get_total_norm(counted, 2.0).double().cpu().square().reshape(1)
        run_collective("pipeline gradient-norm all-reduce", dist.all_reduce, sq, group=self.group)
        total = sq.sqrt().squeeze(0)
        if self.parallel is not None:
            self.parallel.clip_grads_with_norm_(max_norm, total)
        elif params:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total.to(params[0].device, torch.float32))
        return total.float()

    def evaluate(self, idx_BS: Optional[Tensor], targets_BS: Optional[Tensor]) -> Optional[Tensor]:
        """The batch's mean cross-entropy, forward only, the model in eval mode (no routing
        statistics counted, no auxiliary loss): on the last stage, else None. Arguments as
        :meth:`step`'s."""
        was_training = self.stage.training
        self.stage.eval()
        try:
            return self._run(idx_BS, targets_BS, train=False)
        finally:
            self.stage.train(was_training)

    @torch.no_grad()
    def token_losses(self, idx_BS: Optional[Tensor], targets_BS: Optional[Tensor]) -> Optional[Tensor]:
        """Each target's cross-entropy ``(B, S)`` (float64, from float32 or the logits' float64;
        masked targets 0), forward only, the model in eval mode: on the last stage, else None.
        Arguments as :meth:`step`'s; any number of sequences, none included (the pipelines of a
        ``(dp, ep)`` slice may get different numbers).

        The whole batch goes through the stages one after the other: a forward pass alone has
        nothing to interleave, and PyTorch's schedules cannot split a batch of no sequences, whose
        stages must still run for their slice's collectives (the experts' all-to-all, the routing
        statistics)."""
        given = idx_BS if idx_BS is not None else targets_BS
        if given is None:
            raise ValueError("give the batch's token ids or targets (every stage needs their shape)")
        if self.stage.last and targets_BS is None:
            raise ValueError("the last stage needs the batch's targets")
        was_training = self.stage.training
        self.stage.eval()
        try:
            logits_BSV = self._forward_through(idx_BS, *given.shape)
        finally:
            self.stage.train(was_training)
        if logits_BSV is None or targets_BS is None:
            return None
        logits = logits_BSV.flatten(0, 1)
        logits = logits if logits.dtype == torch.float64 else logits.float()
        targets = targets_BS.flatten().to(logits.device)
        losses = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="none")
        return losses.double().view(targets_BS.shape)

    def _forward_through(self, idx_BS: Optional[Tensor], B: int, S: int) -> Optional[Tensor]:
        """This stage's forward of the whole batch: its input from the previous stage (the token
        ids on the first), its output sent to the next; returns the logits on the last stage."""
        p = next(self.stage.parameters())
        dtype = self._sent_dtype()
        ranks = dist.get_process_group_ranks(self.group) if self.group is not None else range(dist.get_world_size())
        i = self.stage_index
        if self.stage.first:
            if idx_BS is None:
                raise ValueError("the first stage needs the batch's token ids")
            x = idx_BS.to(p.device)
        else:
            x = torch.empty(B, S, self.stage.model.cfg.dim, dtype=dtype, device=p.device)
            if B:
                run_collective("pipeline activation receive", dist.recv, x, src=ranks[i - 1])
        out = self.stage(x)
        if self.stage.last:
            return out
        if B:
            run_collective("pipeline activation send", dist.send, out.to(dtype).contiguous(), dst=ranks[i + 1])
        return None

    def step(self, idx_BS: Optional[Tensor], targets_BS: Optional[Tensor]) -> Optional[Tensor]:
        """Forward and backward of one batch (``idx_BS`` read by the first stage, ``targets_BS``
        by the last, both ``(B, S)``: every rank passes at least one of them, for the shape);
        the gradients accumulate into the stage's parameters. Returns the batch's mean loss on
        the last stage, else None (with ``parallel``: this rank's share of the mean over every
        rank's rows; their sum over the stage's ranks is the mean)."""
        return self._run(idx_BS, targets_BS, train=True)

    def _run(self, idx_BS: Optional[Tensor], targets_BS: Optional[Tensor], train: bool) -> Optional[Tensor]:
        if self.stage.first and idx_BS is None:
            raise ValueError("the first stage needs the batch's token ids")
        if self.stage.last and targets_BS is None:
            raise ValueError("the last stage needs the batch's targets")
        given = idx_BS if idx_BS is not None else targets_BS
        if given is None:
            raise ValueError("give the batch's token ids or targets (every stage needs their shape)")
        schedule = self._schedule_for(*given.shape)
        losses: list[Tensor] = []
        if self.stage.last:
            assert targets_BS is not None  # checked above
            n = (targets_BS != IGNORE_INDEX).sum()
            if self.parallel is not None:  # every pipeline's rows: one process's mean over the global batch
                n = self.parallel.sum(n.double().reshape(1)).squeeze(0)
            self._n_targets = n.clamp(min=1)
        args = (idx_BS,) if self.stage.first else ()
        kwargs = {"target": targets_BS, "losses": losses} if self.stage.last else {}
        (schedule.step if train else schedule.eval)(*args, **kwargs)
        if train:
            self._sum_tied_embedding()
        return torch.stack(losses).sum().detach() if self.stage.last else None


class PipelineParallel(RankGroup):
    """The handle of a pipeline-parallel layout over all ranks (made by
    :func:`~moekit.parallel.parallelize_pipeline`): on a ``(pp, dp, ep)`` mesh, this rank runs stage
    ``pp_rank`` of the language model (:attr:`stage`, its model :attr:`model`), parallelized on its
    ``(dp, ep)`` slice (:attr:`stage_parallel`), in the pipeline :attr:`pipe` of the ranks at its
    slice position. What training needs over every rank besides: the small collectives
    (:class:`~moekit.parallel.handle.RankGroup`, over all ranks), which rows of a global batch this
    rank's pipeline reads, the routing statistics of every stage, and loading a single-process
    state. :mod:`moekit.train.distcp` saves with it: each rank writes its stage's part of one
    checkpoint (``partial_model``), which loads on any layout."""

    partial_model = True
    statistics = "global"
    tp_size = 1

    def __init__(self, pipe: LMPipeline, mesh, stage_parallel):
        if mesh.size() != dist.get_world_size():
            raise ValueError(f"the pipeline's mesh must span all {dist.get_world_size()} ranks; it has {mesh.size()}")
        self.pipe, self.stage, self.mesh, self.stage_parallel = pipe, pipe.stage, mesh, stage_parallel
        self.model = pipe.stage.model
        self.group = dist.group.WORLD
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.pp_size, self.pp_rank = mesh.size(0), mesh.get_local_rank("pp")
        self.ep_size = stage_parallel.ep_size
        # the one-process optimizer's parameter names, by index (load_full_optimizer_state_dict)
        self.one_process_names: Optional[list[str]] = None

    @property
    def data_size(self) -> int:
        """How many parts a global batch is split into: one per pipeline (slice position)."""
        return self.stage_parallel.world_size

    @property
    def data_rank(self) -> int:
        return self.stage_parallel.rank

    def positions(self, t_BS: Tensor) -> Tensor:
        return t_BS

    def stages_of(self, obj: Any) -> list:
        """Every stage's picklable ``obj``, in stage order (gathered over this rank's pipeline: the
        ranks of a slice hold the same global routing statistics, so one pipeline tells them all)."""
        return all_gather_objects("pipeline stages gather", obj, self.pipe.group)

    def load_full_state_dict(self, sd: dict) -> None:
        """Load a single-process state dict: each rank keeps its part of its stage's tensors."""
        mine = set(self.model.state_dict())
        self.stage_parallel.load_full_state_dict({f"model.{k}": v for k, v in sd.items() if k in mine})

    def load_full_optimizer_state_dict(self, opt: torch.optim.Optimizer, sd: dict) -> None:
        """Load a single-process optimizer state dict (parameters by index: :attr:`one_process_names`
        says which parameter each index is) into this stage's optimizer."""
        if self.one_process_names is None:
            raise ValueError("set one_process_names (the one-process optimizer's parameter names) first")
        mine = {n for n, _ in self.model.named_parameters()}
        names = [f"model.{n}" if n in mine else None for n in self.one_process_names]
        load_optimizer_by_names(self.stage, opt, sd, names)


__all__ = [
    "LMPipeline",
    "LMStage",
    "PipelineParallel",
    "RoutingRecord",
    "SCHEDULES",
    "check_pipelinable",
    "pipeline_stage",
    "stage_bounds",
]
