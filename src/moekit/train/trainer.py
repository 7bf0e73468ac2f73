"""Train one language model (MoE or dense) with AdamW, a warm-up + cosine schedule, periodic
validation per domain, JSON-lines metrics, and exact, atomic checkpoints.

A run folder holds one sub-folder per model (``moe/``, ``dense/``), each with ``metrics.jsonl``,
``summary.json`` and the checkpoint: ``checkpoint.safetensors`` (one file) when trained on one
process, the folder ``checkpoint.dcp`` (one part per rank, :mod:`moekit.train.distcp`) when
trained under torchrun. Either resumes on any layout; :func:`find_checkpoint` says which is there.
A metrics row's ``tokens_per_s`` is its step's; the summary's is the steady state: the steps after
the first :data:`TIMING_WARMUP_STEPS` of the process (``tokens_per_s_steps`` says how many), so a
``--compile`` run's figure leaves its compilation out.

Stopping: Ctrl-C (SIGINT) and SIGTERM (what schedulers and ``docker stop`` send) both finish the
current step, write a checkpoint and raise :class:`TrainingInterrupted` (the CLI exits with
128 + the signal number: 130 after Ctrl-C, 143 after SIGTERM). A loss or gradient norm that is
not finite stops training before the step is applied, with :class:`TrainingDiverged`; a
checkpoint is never written with non-finite weights, so the last good one stays on disk.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

from .._io import atomic_write_text, remove_stale_temporaries
from ..config import LMConfig, TrainConfig, check_device_available
from ..data import TokenData, covering_windows, random_batches, window
from ..layer import after_optimizer_step
from ..models import MoETransformer
from ..models.lm import IGNORE_INDEX
from . import distcp
from .checkpoint import (
    CheckpointError,
    CheckpointWriteError,
    file_meta,
    file_step,
    load_checkpoint,
    read_model_into,
    save_checkpoint,
)
from .distcp import DCP_DIR, load_distributed, save_distributed

CHECKPOINT = "checkpoint.safetensors"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
TIMING_WARMUP_STEPS = 3  # a summary's tokens/s leaves out a process's first steps (torch.compile compiles in them)


class TrainingInterrupted(Exception):
    """Raised after Ctrl-C or SIGTERM once the checkpoint is safely written. ``signum``: the
    signal that stopped training (None: another rank's); ``exit_code``: 128 + it, the shell's
    convention (130 for Ctrl-C, 143 for SIGTERM)."""

    def __init__(self, message: str, signum: Optional[int] = None):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + (signum if signum is not None else signal.SIGINT)


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm stopped being finite (or the weights did): training stopped
    before applying the step, and the last checkpoint, written before, is kept."""


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _DeferredInterrupt:
    """Ctrl-C or SIGTERM during a training step takes effect once the step is complete and
    logged, so the checkpoint and the metrics agree; a second signal (a second or more later)
    stops at once (the last checkpoint is kept). Under torchrun the ranks agree on stopping at the
    same step. The previous handlers are restored on exit."""

    def __enter__(self) -> _DeferredInterrupt:
        self.requested, self.signum, self._old, self._first = False, None, {}, 0.0
        for sig in STOP_SIGNALS:
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: signals cannot reach us anyway
                pass
        return self

    def _handler(self, signum, frame) -> None:
        now = time.monotonic()
        # a repeat within a second is the same stop delivered twice: a scheduler that signals every
        # process (Slurm's scancel) while the launcher (torchrun, `moekit train --nproc`) forwards
        # it too. (A terminal's Ctrl-C reaches only the launcher: its workers run in sessions of
        # their own, and it forwards the signal; a second Ctrl-C makes it send SIGTERM.)
        if self.requested and now - self._first > 1.0:
            raise _HardInterrupt
        if not self.requested:
            self.requested, self.signum, self._first = True, signum, now

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "another rank"

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)


class _HardInterrupt(KeyboardInterrupt):
    pass


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at ``steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, cfg.beta2))


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> Optional[torch.dtype]:
    if cfg.autocast == "bf16" or (cfg.autocast == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def balance_of(tokens_per_expert: list) -> float:
    """Max load over mean load, averaged over MoE layers (1.0 = perfectly balanced)."""
    vals = [max(c) / (sum(c) / len(c)) for c in tokens_per_expert if sum(c) > 0]
    return sum(vals) / len(vals) if vals else 1.0


@torch.no_grad()
def evaluate(
    model: MoETransformer,
    data: TokenData,
    cfg: TrainConfig,
    device: torch.device,
    *,
    top_k: Optional[int] = None,
    parallel=None,
) -> dict:
    """Validation loss overall and per domain, and the tokens each expert received. The overall loss
    and the expert loads are those of ``cfg.eval_windows`` evenly spaced windows; a domain those
    windows miss gets its loss from extra windows inside it (:func:`~moekit.data.covering_windows`),
    so every domain of the validation split has a loss. With an expert-parallel ``parallel`` handle
    every batch of windows is split over the ranks (some may get none: they still join the
    collectives) and the sums are all-reduced, so the result is the single-process one."""
    was_training = model.training
    model.eval()
    starts, extra_W = covering_windows(data.val_domain_N, cfg.seq_len, cfg.eval_windows)
    n_dom = len(data.domains)
    sums = torch.zeros(2, n_dom + 1, dtype=torch.float64)  # (loss, tokens) x (each domain, the fixed windows)
    load: dict[int, torch.Tensor] = {}  # each MoE layer's tokens per expert, by layer index
    amp = autocast_dtype(cfg, device)
    # the domains the extra windows are for (only their tokens count there: the others have theirs)
    missing_D = torch.zeros(n_dom, dtype=torch.bool)
    missing_D[data.val_domain_N[starts[extra_W] + 1].long()] = True
    pipe = getattr(parallel, "pipe", None)  # pipeline parallel: the last stage has the logits
    if pipe is not None and top_k is not None:
        raise ValueError("top_k: a pipeline-parallel model is evaluated with its trained experts per token")
    for group, extra in ((starts[~extra_W], False), (starts[extra_W], True)):
        for i in range(0, group.numel(), cfg.batch_size):
            s = group[i : i + cfg.batch_size]
            if parallel is not None:
                s = s.tensor_split(parallel.data_size)[parallel.data_rank]
            x, y = window(data.val_ids_N, s, cfg.seq_len)
            dom = window(data.val_domain_N.long(), s, cfg.seq_len)[1]
            if parallel is not None:  # under tensor parallelism the logits are this rank's positions'
                y, dom = parallel.positions(y), parallel.positions(dom)
            dom = dom.flatten()
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                if pipe is not None:
                    tok_loss, layer_counts = _pipeline_eval(parallel, x.to(device), y.to(device))
                else:
                    tok_loss, layer_counts = _eval_forward(model, x.to(device), y.to(device), top_k)
            if tok_loss is not None:
                keep = missing_D[dom] if extra else torch.ones_like(dom, dtype=torch.bool)
                sums[0, :n_dom].index_add_(0, dom[keep], tok_loss[keep])
                sums[1, :n_dom] += torch.bincount(dom[keep], minlength=n_dom).double()
                if not extra:  # the fixed windows: the overall loss
                    sums[:, n_dom] += torch.stack([tok_loss.sum(), torch.tensor(float(tok_loss.numel()))])
            if not extra:  # and the expert loads
                for layer, counts in layer_counts.items():
                    load[layer] = load[layer] + counts if layer in load else counts
    model.train(was_training)
    if parallel is not None:
        sums = parallel.sum(sums)  # tokens_per_expert is global already
    if pipe is not None:  # each stage has its layers' loads
        load = _merged(parallel.stages_of(load))
    res: dict[str, Any] = {"val_loss": float(sums[0, n_dom] / sums[1, n_dom])}
    for d, name in enumerate(data.domains):
        if sums[1, d] > 0:
            res[f"val_loss_{name}"] = float(sums[0, d] / sums[1, d])
    if load:
        res["val_tokens_per_expert"] = [c.tolist() for c in load.values()]
    return res


def _eval_forward(model: MoETransformer, x: torch.Tensor, y: torch.Tensor, top_k: Optional[int]) -> tuple:
    """(each target's cross-entropy, flattened, float64; each MoE layer's tokens per expert by layer index)."""
    out = model(x, top_k=top_k)
    tok_loss = F.cross_entropy(out.logits.float().flatten(0, 1), y.flatten(), reduction="none").cpu().double()
    return tok_loss, {i: r.stats["tokens_per_expert"].cpu() for i, r in enumerate(out.moe) if r is not None}


def _pipeline_eval(par, x: torch.Tensor, y: torch.Tensor) -> tuple:
    """:func:`_eval_forward` on a pipeline stage: the losses on the last stage (else None), the
    loads of this stage's layers."""
    with par.stage.recording() as records:
        tok_loss = par.pipe.token_losses(x, y)
    counts = {r.layer: r.tokens_per_expert.cpu() for r in records}
    return (None if tok_loss is None else tok_loss.flatten().cpu()), counts


def metrics_row(line: str) -> Optional[dict]:
    """One ``metrics.jsonl`` row, or None when the line is not a JSON object with an integer
    ``step`` (a kill during a write tears the last line)."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) and isinstance(row.get("step"), int) else None


def read_metrics(sub_dir: Path) -> list[dict]:
    """The readable rows of a sub-run's ``metrics.jsonl`` (none when it has no such file)."""
    path = Path(sub_dir) / METRICS
    if not path.is_file():
        return []
    rows = (metrics_row(ln) for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip())
    return [r for r in rows if r is not None]


class Trainer:
    """Trains ``model_cfg`` on ``data`` into ``run_dir``."""

    _last_eval: dict  # the latest evaluate() row ({} before the first)

    def __init__(
        self,
        run_dir: Path,
        model_cfg: LMConfig,
        cfg: TrainConfig,
        data: TokenData,
        *,
        label: str = "moe",
        progress: bool = True,
        init_state: Optional[dict] = None,
        distributed: bool = False,
        device: Optional[torch.device] = None,
    ):
        self.dir = Path(run_dir)
        self.model_cfg, self.cfg, self.data, self.label = model_cfg, cfg, data, label
        self.device = device if device is not None else torch.device(cfg.device)
        check_device_available("device", str(self.device))
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        self.par: Any = None  # the layout's handle under torchrun (ExpertParallel, or PipelineParallel)
        self.pipe = None  # the pipeline (pipeline parallel)
        if distributed:
            self.model, self.par = self._build_sharded(model_cfg, init_state)
            self.pipe = getattr(self.par, "pipe", None)
        else:
            self.model = MoETransformer(model_cfg)
            if init_state is not None:  # fine-tuning: start from given weights
                self.model.load_state_dict(init_state)
            self.model = self.model.to(self.device)
            self.model.activation_checkpointing = cfg.activation_checkpointing  # parallelize sets it under torchrun
        self.main = self.par is None or self.par.is_main  # only the main rank writes files and shows progress
        self.progress = progress and self.main
        self.opt = make_optimizer(self.model, cfg)
        if self.pipe is not None:  # which one-process parameter a single-file checkpoint's index is
            self.par.one_process_names = _one_process_optimizer_names(model_cfg, cfg)
        # the training steps run the compiled module; weights, checkpoints and evaluation use the model itself
        self.step_model = torch.compile(self.model) if cfg.compile and self.par is None else self.model
        self.gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.step = 0
        self.saved_step: Optional[int] = None  # the step of the checkpoint on disk (None: none written)

    def _build_sharded(self, model_cfg: LMConfig, init_state: Optional[dict]):
        """Under torchrun: the model built on the meta device, its experts split over the
        expert-parallel ranks (with activation checkpointing and FSDP2: :func:`~moekit.parallel.parallelize`),
        then allocated and initialised per rank (the single-process values, in bounded blocks), so
        no rank ever holds the whole model."""
        import torch.distributed as dist

        from ..parallel import make_mesh, parallelize, parallelize_pipeline
        from .run import check_parallel_layout

        check_parallel_layout(self.cfg, [model_cfg], dist.get_world_size())  # every rank, before communicating
        with torch.device("meta"):
            model = MoETransformer(model_cfg)
        cfg = self.cfg
        # the mesh of the real device
        mesh = make_mesh(cfg.expert_parallel, self.device.type, pipeline_parallel=cfg.pipeline_parallel)
        # fp32 parameters under autocast, as one process trains (FSDP's bf16 param_dtype would also
        # put the embeddings, norms and residual stream in bf16: another training run)
        par: Any
        if cfg.pipeline_parallel > 1:
            par = parallelize_pipeline(
                model,
                mesh,
                cfg.microbatches,
                schedule=cfg.pipeline_schedule,
                activation_checkpointing=cfg.activation_checkpointing,
                compile=cfg.compile,
            )
        else:
            par = parallelize(
                model,
                mesh,
                tensor_parallel=cfg.tensor_parallel,
                activation_checkpointing=cfg.activation_checkpointing,
                compile=cfg.compile,
            )
        model.materialize_(self.device)
        if init_state is not None:  # fine-tuning: start from given weights
            par.load_full_state_dict(init_state)
        return model, par

    def _state_bytes(self) -> dict:
        """Bytes of training state this rank holds: parameters, their gradients (as held during a
        step), optimizer state; and the ranks (one process: 1)."""
        params = [_local(p) for p in self.model.parameters()]
        p_bytes = sum(p.numel() * p.element_size() for p in params)
        g_bytes = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
        o_bytes = sum(
            _local(v).numel() * v.element_size()
            for st in self.opt.state.values()
            for v in st.values()
            if torch.is_tensor(v)
        )
        return {
            "parameters": p_bytes,
            "gradients": g_bytes,
            "optimizer": o_bytes,
            "ranks": self.par.world_size if self.par is not None else 1,
        }

    # -------------------------------------------------------------- state
    def _rng(self) -> dict:
        rng = {"torch": torch.get_rng_state(), "data": self.gen.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return rng

    def _kept(self) -> str:
        if self.saved_step is None:
            return f"no checkpoint was written in {self.dir}"
        return f"the last checkpoint (step {self.saved_step}) in {self.dir} is kept"

    def save(self, finished: bool = False) -> None:
        """Write the checkpoint (collective under torchrun); TrainingDiverged instead if a weight is
        not finite, so the checkpoint on disk stays the last good one."""
        bad = next(
            (
                k
                for k, v in self.model.state_dict().items()
                if v.is_floating_point() and not bool(torch.isfinite(_local(v)).all())
            ),
            None,
        )
        if self._any(bad is not None):
            where = f" ({bad})" if bad is not None else " (on another rank)"
            raise TrainingDiverged(
                f"{self.label}: the weights after step {self.step} are not finite{where}; "
                f"no checkpoint written; {self._kept()}"
            )
        meta = {"step": self.step, "label": self.label, "finished": finished}
        if self.par is None:
            save_checkpoint(self.dir / CHECKPOINT, self.model, self.opt, rng=self._rng(), meta=meta)
            distcp.remove(self.dir / DCP_DIR)  # an earlier part of the run on several processes wrote one
            self.saved_step = self.step
            return
        # several processes: each rank writes its part (its experts, a share of the rest) into checkpoint.dcp
        meta["expert_parallel"], meta["tensor_parallel"] = self.par.ep_size, self.par.tp_size
        meta["pipeline_parallel"] = getattr(self.par, "pp_size", 1)
        save_distributed(self.dir / DCP_DIR, self.model, self.opt, self.par, rng=self._rng(), meta=meta)
        if self.main:  # an earlier part of the run on one process wrote one
            (self.dir / CHECKPOINT).unlink(missing_ok=True)
        self.saved_step = self.step

    def resume(self) -> None:
        """Load the checkpoint of this sub-run (either format, written on any layout) and continue
        from it: weights, optimizer state, step, random-number generators (collective under torchrun)."""
        if self.main:  # a save cut short by a crash: put its complete checkpoint back in place
            distcp.repair(self.dir / DCP_DIR)
        if self.par is not None:
            self.par.barrier()
        path = find_checkpoint(self.dir)
        if path is None:
            raise CheckpointError(f"no checkpoint at {self.dir / CHECKPOINT} (nor a {DCP_DIR} folder)")
        if path.is_dir():
            meta, rng = load_distributed(path, self.model, self.opt, self.par)
        else:
            meta, rng = load_checkpoint(path, self.model, self.opt, parallel=self.par)
        self.step = int(meta.get("step", 0))
        self.saved_step = self.step
        torch.set_rng_state(rng["torch"])
        self.gen.set_state(rng["data"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        if self.main:
            self._truncate_metrics(self.step)

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric rows logged after the checkpoint (a crash between checkpoints), and rows that
        are not readable JSON (a kill during a write tears the last one), with a warning; the
        file is rewritten atomically."""
        path = self.dir / METRICS
        if not path.exists():
            return
        rows, unreadable = [], []
        for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            row = metrics_row(line)
            if row is None:
                unreadable.append(i)
            elif row["step"] <= step:
                rows.append(line)
        if unreadable:
            lines = ", ".join(map(str, unreadable[:5])) + (", ..." if len(unreadable) > 5 else "")
            warnings.warn(
                f"moekit: {path}: dropped {len(unreadable)} unreadable line(s) (line {lines}; a write cut "
                "short by a kill leaves a torn last line)",
                stacklevel=2,
            )
        atomic_write_text(path, "".join(r + "\n" for r in rows))

    def _log(self, row: dict) -> None:
        if not self.main:
            return
        with open(self.dir / METRICS, "a") as f:
            f.write(json.dumps(row) + "\n")

    # -------------------------------------------------------------- loop
    def fit(self, *, resume: bool = False, stop_at: Optional[int] = None) -> dict:
        """Train to ``cfg.steps`` (or until ``stop_at``: checkpoint and return, as after Ctrl-C).
        Returns the run's summary (``{"stopped_at": step}`` after ``stop_at``)."""
        self._start(resume)
        bar = self._progress_bar()
        with _DeferredInterrupt() as interrupt:  # also covers the checkpoint written on the way out
            try:
                stopped = self._train_steps(bar, interrupt, stop_at)
            except _HardInterrupt:
                bar.close()
                raise TrainingInterrupted(
                    f"stopped at once during step {self.step + 1}; {self._kept()}", interrupt.signum
                ) from None
            except KeyboardInterrupt:
                bar.close()
                self._save_interrupted(interrupt)
            except (TrainingDiverged, CheckpointWriteError):  # the error goes on a line of its own
                bar.close()
                raise
            bar.close()
            if stopped:
                return {"stopped_at": self.step}
            self.save(finished=True)
            summary = self._summary()
            if self._any(interrupt.requested):  # a signal after the last step
                raise TrainingInterrupted(
                    f"interrupted ({interrupt.name}) after {self.label} finished; "
                    f"its checkpoint is saved in {self.dir}",
                    interrupt.signum,
                )
        return summary

    def _start(self, resume: bool) -> None:
        """The sub-run folder ready: a killed write's temporaries removed, the checkpoint loaded
        (``resume``) or the metrics of an earlier attempt removed; the batch stream and timers set."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.main:  # writes a kill cut short before their rename (no other process writes here)
            for name in (CHECKPOINT, METRICS, SUMMARY):
                remove_stale_temporaries(self.dir / name)
        if resume:
            self.resume()
        elif self.main:
            (self.dir / METRICS).unlink(missing_ok=True)
        # every rank draws the same global batch and keeps its slice: the run equals one process's
        self._batches = random_batches(self.data.train_ids_N, self.cfg.seq_len, self.cfg.batch_size, self.gen)
        self._step_seconds: list[float] = []  # each training step of this fit(), timed
        self._last_eval = {}
        share = self.cfg.batch_size // (self.par.data_size if self.par else 1)
        if share % self.cfg.microbatches:  # (check_parallel_layout says so before a run; a Trainer made in Python)
            raise ValueError(
                f"microbatches={self.cfg.microbatches} must divide the {share} rows each step gives this rank's model"
            )
        lo = share * (self.par.data_rank if self.par else 0)
        self._my_rows = slice(lo, lo + share)  # this rank's slice of every global batch
        self._amp = autocast_dtype(self.cfg, self.device)

    def _progress_bar(self):
        from tqdm.auto import tqdm

        return tqdm(
            total=self.cfg.steps,
            initial=self.step,
            desc=f"train {self.label}",
            disable=not self.progress,
            dynamic_ncols=True,
            leave=True,
            mininterval=0.2 if sys.stderr.isatty() else 30.0,
        )

    def _any(self, flag: bool) -> bool:
        """``flag`` on any rank (one process: ``flag``)."""
        return self.par.any(flag) if self.par is not None else bool(flag)

    def _train_steps(self, bar, interrupt: _DeferredInterrupt, stop_at: Optional[int]) -> bool:
        """Steps until ``cfg.steps``; True when stopped at ``stop_at`` (checkpoint written)."""
        cfg = self.cfg
        self.model.train()
        while self.step < cfg.steps:
            if stop_at is not None and self.step >= stop_at:
                self.save()
                return True
            lr = lr_at(self.step, cfg)
            tally, gnorm, dt = self._train_step(lr)
            row = self._metrics(tally, lr, gnorm, dt)
            if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                self._last_eval = evaluate(self.model, self.data, cfg, self.device, parallel=self.par)
                row.update(self._last_eval)
            self._log(row)
            bar.set_postfix(_postfix({**self._last_eval, **row}), refresh=False)
            bar.update(1)
            if self.step % cfg.checkpoint_every == 0 and self.step < cfg.steps:
                self.save()
            if self._any(interrupt.requested):  # all ranks stop together
                raise KeyboardInterrupt
        return False

    def _train_step(self, lr: float) -> tuple:
        """One optimizer step on this rank's slice of the next global batch: (its :class:`_Tally`,
        gradient norm before clipping, seconds)."""
        cfg, par = self.cfg, self.par
        t0 = time.perf_counter()
        for g in self.opt.param_groups:
            g["lr"] = lr
        x, y = next(self._batches)
        x, y = x[self._my_rows].to(self.device), y[self._my_rows].to(self.device)
        tally = self._pipeline_pass(x, y) if self.pipe is not None else self._accumulated_pass(x, y)
        # without clipping, an infinite bound still returns the norm (to check and log) and leaves
        # the gradients as they are
        clip = cfg.grad_clip or math.inf
        if self.pipe is not None:
            gnorm = self.pipe.clip_grad_norm_(clip)
        elif par is not None:
            gnorm = par.clip_grad_norm_(clip)
        else:
            gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self._check_finite(tally.loss + tally.aux_loss, float(gnorm))
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        after_optimizer_step(self.model)
        self.step += 1
        dt = time.perf_counter() - t0
        self._step_seconds.append(dt)
        return tally, gnorm, dt

    def _accumulated_pass(self, x: torch.Tensor, y: torch.Tensor) -> _Tally:
        """Forward and backward of this rank's rows in ``microbatches`` equal parts, the gradients
        accumulated: each part adds its summed cross-entropy over the whole batch's counted targets
        (every rank's, under torchrun: this rank's term of the global objective; FSDP sums the
        ranks' gradients, once, after the last part) and its auxiliary loss over the parts."""
        par, M = self.par, self.cfg.microbatches
        n = self._batch_targets(y)
        loss_sum, aux_sum = torch.zeros((), dtype=torch.float64, device=self.device), 0.0
        layers: dict[int, list] = {}
        for i, (x_part, y_part) in enumerate(zip(x.chunk(M), y.chunk(M))):
            if par is not None and M > 1:
                self.model.set_requires_gradient_sync(i == M - 1)  # FSDP's: reduce once, after the last
            with torch.autocast(self.device.type, dtype=self._amp, enabled=self._amp is not None):
                out = self.step_model(x_part, y_part)
            aux = out.aux_loss if par is None else par.aux_share(out.aux_loss)
            (out.loss_sum / n.to(out.loss_sum.device, out.loss_sum.dtype) + aux / M).backward()
            loss_sum = loss_sum + out.loss_sum.detach().double()
            aux_sum = aux_sum + out.aux_loss.detach() / M
            for layer, r in enumerate(out.moe):
                if r is not None:
                    _add_layer(layers, layer, r.stats["tokens_per_expert"], r.stats["dropped_fraction"], M)
        loss_sum = loss_sum.reshape(1)
        loss = float((loss_sum if par is None else par.sum(loss_sum)) / n)  # the step's one host read
        return _Tally.of(loss, float(aux_sum), _layer_numbers(layers))

    def _batch_targets(self, y: torch.Tensor) -> torch.Tensor:
        """The targets counted (not ignored) in the global batch (float64; at least 1)."""
        par = self.par
        n = ((y if par is None else par.positions(y)) != IGNORE_INDEX).sum().double().reshape(1)
        return (n if par is None else par.sum(n)).squeeze(0).clamp(min=1)

    def _pipeline_pass(self, x: torch.Tensor, y: torch.Tensor) -> _Tally:
        """Forward and backward of this rank's pipeline's rows through the schedule (the first
        stage reads ``x``, the last ``y``); the task loss summed over the last stage's ranks and the
        routing statistics of every stage gathered, on every rank."""
        par, M = self.par, self.cfg.microbatches
        with par.stage.recording() as records:
            with torch.autocast(self.device.type, dtype=self._amp, enabled=self._amp is not None):
                share = self.pipe.step(x, y)  # type: ignore[union-attr]  # (set with par)
        layers: dict = {}
        aux = 0.0
        for r in records:
            _add_layer(layers, r.layer, r.tokens_per_expert, r.dropped_fraction, M)
            aux = aux + r.aux_loss / M
        part = torch.zeros(1, dtype=torch.float64) if share is None else share.double().reshape(1).cpu()
        loss = float(par.sum(part))  # the last stage's ranks each hold their share of the mean
        stages = par.stages_of((_layer_numbers(layers), float(aux)))  # every stage's MoE layers
        return _Tally.of(loss, sum(a for _, a in stages), _merged(mine for mine, _ in stages))

    def _metrics(self, tally: _Tally, lr: float, gnorm, dt: float) -> dict:
        """The metrics row of the step just taken (the task loss over every rank's tokens)."""
        row: dict[str, Any] = {
            "step": self.step,
            "loss": tally.loss,
            "aux_loss": tally.aux_loss,
            "lr": lr,
            "grad_norm": float(gnorm),
            "tokens_per_s": self.cfg.batch_size * self.cfg.seq_len / dt,
        }
        if tally.loads:
            row.update(
                balance=balance_of(tally.loads),
                dropped_fraction=sum(tally.dropped) / len(tally.dropped),
                tokens_per_expert=tally.loads,
            )
        return row

    def _save_interrupted(self, interrupt: _DeferredInterrupt) -> None:
        """After Ctrl-C or SIGTERM: checkpoint, then raise TrainingInterrupted."""
        try:
            self.save()
        except _HardInterrupt:  # a second signal while saving: the atomic write leaves the old file
            raise TrainingInterrupted(
                f"stopped at once while saving step {self.step}; {self._kept()}", interrupt.signum
            ) from None
        raise TrainingInterrupted(
            f"interrupted ({interrupt.name}) at step {self.step}; checkpoint saved in {self.dir}", interrupt.signum
        ) from None

    def _summary(self) -> dict:
        """The finished sub-run's summary (written by the main rank to summary.json)."""
        if self.par is None:
            counts = self.model.param_counts()
        else:  # the sharded model holds only its part: count the whole model, built without memory
            with torch.device("meta"):
                counts = MoETransformer(self.model_cfg).param_counts()
        last_eval = self._last_eval or evaluate(self.model, self.data, self.cfg, self.device, parallel=self.par)
        tokens_per_s, timed_steps = self._steady_tokens_per_s()
        summary = {
            "label": self.label,
            "steps": self.step,
            **{f"params_{k}": v for k, v in counts.items()},
            "tokens_per_s": tokens_per_s,
            "tokens_per_s_steps": timed_steps,
            **{k: v for k, v in last_eval.items() if k.startswith("val_loss")},
            "state_bytes_per_rank": self._state_bytes(),
        }
        if self.main:
            atomic_write_text(self.dir / SUMMARY, json.dumps(summary, indent=2))
        return summary

    def _steady_tokens_per_s(self) -> tuple[Optional[float], int]:
        """(training tokens per second in the steady state, the steps it is measured over): the steps
        of this process after its first :data:`TIMING_WARMUP_STEPS` (torch.compile's compilation, the
        allocator's first requests; evaluation and checkpoints are not in any step's time), or all its
        steps when it took no more than those. The summary's ``tokens_per_s`` and ``tokens_per_s_steps``."""
        timed = self._step_seconds[TIMING_WARMUP_STEPS:] or self._step_seconds
        seconds = sum(timed)
        if not seconds:
            return None, 0
        return self.cfg.batch_size * self.cfg.seq_len * len(timed) / seconds, len(timed)

    def _check_finite(self, loss: float, gnorm: float) -> None:
        """TrainingDiverged (on every rank) unless this step's loss and gradient norm are finite."""
        bad = [
            f"{what} is {v}" for what, v in (("the loss", loss), ("the gradient norm", gnorm)) if not math.isfinite(v)
        ]
        if self._any(bool(bad)):
            what = " and ".join(bad) if bad else "another rank's loss or gradient norm is not finite"
            raise TrainingDiverged(
                f"{self.label}: step {self.step + 1}: {what} (not finite); training stopped before "
                f"applying the step (lower train.lr or check the data); {self._kept()}"
            )


@dataclass
class _Tally:
    """What a step's metrics row reports: the task loss (the global batch's mean), the auxiliary
    loss (the microbatches' mean), and per MoE layer the tokens each expert took (summed over the
    microbatches) and the fraction of slots dropped (their mean)."""

    loss: float
    aux_loss: float
    loads: list = field(default_factory=list)
    dropped: list = field(default_factory=list)

    @classmethod
    def of(cls, loss: float, aux_loss: float, numbers: dict) -> _Tally:
        """From the MoE layers' :func:`_layer_numbers` (in layer order)."""
        return cls(loss, aux_loss, [v[0] for v in numbers.values()], [v[1] for v in numbers.values()])


def _add_layer(layers: dict, layer: int, tokens: torch.Tensor, dropped, M: int) -> None:
    """Add one microbatch's routing of MoE layer ``layer`` to ``layers`` (layer -> [tokens, dropped])."""
    if layer in layers:
        layers[layer][0] = layers[layer][0] + tokens
        layers[layer][1] = layers[layer][1] + dropped / M
    else:
        layers[layer] = [tokens, dropped / M]


def _layer_numbers(layers: dict) -> dict:
    """``{layer: (tokens per expert as a list, dropped fraction)}``: Python numbers."""
    return {i: (t.tolist(), float(d)) for i, (t, d) in layers.items()}


def _merged(parts) -> dict:
    """Every pipeline stage's ``{layer: value}`` as one dict, in layer order."""
    return dict(sorted(kv for part in parts for kv in part.items()))


def _one_process_optimizer_names(model_cfg: LMConfig, cfg: TrainConfig) -> list[str]:
    """The names of the one-process optimizer's parameters, by index (built on the meta device)."""
    from ..parallel.handle import optimizer_names

    with torch.device("meta"):
        model = MoETransformer(model_cfg)
    return optimizer_names(model, make_optimizer(model, cfg))


def _postfix(row: dict) -> dict:
    """The progress bar's numbers for a metrics row."""
    post = {"loss": f"{row['loss']:.3f}", "tok/s": f"{row['tokens_per_s']:.0f}"}
    if "balance" in row:
        post["balance"] = f"{row['balance']:.2f}"
    if "val_loss" in row:
        post["val"] = f"{row['val_loss']:.3f}"
    return post


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a (possibly sharded) tensor."""
    return t.to_local() if hasattr(t, "to_local") else t


def checkpoint_step(path: Path) -> Optional[int]:
    """The step a checkpoint (file or DCP folder) was written at, read from its metadata without
    loading a tensor; None when unreadable."""
    if not Path(path).is_dir():
        return file_step(path)
    try:
        step = distcp.read_manifest(path)["meta"].get("step")
    except Exception:  # noqa: BLE001 - missing, incomplete or corrupt: no step
        return None
    return step if isinstance(step, int) else None


def find_checkpoint(sub_dir: Path) -> Optional[Path]:
    """The checkpoint of a sub-run folder: ``checkpoint.safetensors`` or the DCP folder
    ``checkpoint.dcp`` (or, after a crash in the middle of its save, the complete copy that
    :func:`moekit.train.distcp.resolve` finds). When both formats are there (a crash between
    writing one and deleting the other: the run changed layout), the one with the later step, the
    file on a tie. None when there is none."""
    sub = Path(sub_dir)
    single = sub / CHECKPOINT
    sharded = distcp.resolve(sub / DCP_DIR)
    if sharded is None:
        return single if single.exists() else None
    if not single.exists():
        return sharded
    return sharded if (checkpoint_step(sharded) or -1) > (checkpoint_step(single) or -1) else single


def load_trained(run_dir: Path, model_cfg: LMConfig, device: str = "cpu") -> MoETransformer:
    """The model of a finished (or checkpointed) sub-run, in eval mode. Built on the meta device
    and allocated once; its tensors are read into place one at a time (never the optimizer
    state), so loading peaks at the model plus one tensor. A DCP checkpoint (from a run under
    torchrun) is read in this one process, one item at a time into the model."""
    path = find_checkpoint(run_dir)
    if path is None:
        raise CheckpointError(f"no checkpoint at {Path(run_dir) / CHECKPOINT} (nor a {DCP_DIR} folder)")
    if path.is_dir():
        model = MoETransformer(model_cfg)
        load_distributed(path, model, rng=False)
        return model.to(device).eval()
    with torch.device("meta"):
        model = MoETransformer(model_cfg)
    lowbit = file_meta(path).get("lowbit")
    if lowbit:  # a quantized run (moekit convert --quantize): its low-bit modules, then their tensors
        from ..quantize import apply_lowbit_plan

        apply_lowbit_plan(model, lowbit)
    model.to_empty(device="cpu")
    model.reset_buffers()
    read_model_into(path, model)
    return model.to(device).eval()


__all__ = [
    "Trainer",
    "TrainingInterrupted",
    "TrainingDiverged",
    "CheckpointError",
    "evaluate",
    "lr_at",
    "load_trained",
    "find_checkpoint",
    "checkpoint_step",
]
