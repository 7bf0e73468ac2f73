"""The main job: train a MoE language model and its dense twin (same active parameters per token,
same tokens, same steps) into one run folder, then compare them and plot."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import Any, Optional

from .._io import atomic_write_bytes, check_writable, os_error_text, remove_stale_temporaries
from ..config import LMConfig, MoEConfig, TrainConfig, check_device_available
from ..data import build_data, load_tokenizer
from ..interop import load_hf
from ..interop.folders import hf_tokenizer, is_hf_folder
from ..runs import COMPARISON, CONFIG, TOKENIZER, load_run_config, read_run_json, save_run_config, sub_runs
from . import distcp
from .checkpoint import CheckpointError
from .distcp import DCP_DIR
from .lock import RunLock
from .trainer import CHECKPOINT, SUMMARY, Trainer, find_checkpoint, read_metrics


def default_model_config(preset: str = "deepseek", **overrides) -> LMConfig:
    """The small CPU model of ``moekit train``: 4 layers of width 128, a MoE FFN in each
    (DeepSeekMoE layout by default: 16 experts of width 128, top-4, one shared expert)."""
    from ..models import PRESETS

    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(map(repr, PRESETS))}; got {preset!r}")
    moe: dict[str, Any] = dict(
        dim=128, hidden_dim=128 if preset in ("deepseek", "qwen_moe") else 256, **PRESETS[preset]
    )
    model: dict[str, Any] = dict(vocab_size=4096, dim=128, n_layers=4, n_heads=4, max_seq_len=256, moe=MoEConfig(**moe))
    model.update(overrides)
    return LMConfig(**model)


def _hf_start(path: str):
    """(model config, weights, tokenizer) to fine-tune a Hugging Face checkpoint folder, with the
    checkpoint's own auxiliary loss as transformers trains it (``output_router_logits=True``):
    ``router_aux_loss_coef`` times the balance loss pooled over the MoE layers, and no other term
    (see :func:`moekit.interop.config_from_hf`)."""
    if not is_hf_folder(path):
        raise FileNotFoundError(
            f"--init-from: {path} is not a Hugging Face checkpoint folder (config.json with model_type)"
        )
    model = load_hf(str(path), training_losses=True)
    return model.cfg, model.state_dict(), hf_tokenizer(path)


def distributed_launch() -> bool:
    """True when this process was started by torchrun (or another launcher) with several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


RESUME_CHANGES = (
    "steps",
    "expert_parallel",
    "tensor_parallel",
    "pipeline_parallel",
    "pipeline_schedule",
    "microbatches",
    "device",
    "threads",
    "compile",
    "activation_checkpointing",
)  # train fields a --resume may change


def run_train(
    run_dir: Path,
    model_cfg: Optional[LMConfig] = None,
    train_cfg: Optional[TrainConfig] = None,
    *,
    baseline: bool = True,
    dense_only: bool = False,
    resume: bool = False,
    progress: bool = True,
    stop_at: Optional[int] = None,
    plots: bool = True,
    init_from: Optional[str] = None,
    expert_parallel: Optional[int] = None,
    changes: Optional[dict] = None,
    restart_missing: bool = False,
) -> dict:
    """Train the run's models (resuming where a checkpoint exists) and write the comparison.
    ``init_from``: fine-tune a Hugging Face checkpoint folder (its tokenizer, no dense baseline).

    Everything is validated before the run folder is created, and the folder is locked for the
    whole run (one writer: a second process gets :class:`~moekit.train.lock.RunLockedError`).

    Resuming (``resume=True``) continues the run as configured; ``changes`` may set the train
    fields in :data:`RESUME_CHANGES` (``{"steps": 2000}`` extends a finished run: the cosine
    schedule is recomputed for the new length, so the learning rate rises from the old schedule's
    floor to the new schedule's value at the current step). A model whose checkpoint is missing
    although it has trained is refused unless ``restart_missing`` (then it starts over).

    Under ``torchrun`` every rank calls this: the MoE's experts are split over
    ``train.expert_parallel`` ranks (``expert_parallel`` overrides it, e.g. to resume on another
    layout), the rest is data parallel, rank 0 writes the files and every rank writes its part of
    the sharded checkpoint (``checkpoint.dcp``, which resumes on any layout, one process included)."""
    run_dir = Path(run_dir)
    _check_folder_path(run_dir)
    check_writable(run_dir, f"--resume {run_dir} (a resumed run writes its checkpoints there)" if resume else "--out")
    init_state, tok = None, None
    if resume:
        model_cfg, train_cfg, raw, tok = _resumed_configs(run_dir, changes, expert_parallel)
    else:
        train_cfg, raw = _new_run_configs(
            run_dir, model_cfg, train_cfg, init_from, changes, expert_parallel, baseline=baseline, dense_only=dense_only
        )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    check_device_available("device", train_cfg.device)
    if model_cfg is not None:  # (a fine-tuned checkpoint's config is known once it is read, below)
        check_run_fits(train_cfg, [cfg for _, cfg in sub_runs(raw, model_cfg)], world)
    distributed, device, is_main = _setup_distributed(train_cfg)
    if init_from is not None and not resume:
        model_cfg, init_state, tok = _hf_start(init_from)
        raw = {"baseline": False, "dense_only": False}
        check_run_fits(train_cfg, [model_cfg], world)
    assert model_cfg is not None  # given, read from the run folder, or from init_from
    data, model_cfg = _prepare_data(
        train_cfg, model_cfg, tok, distributed, is_main, fixed_vocab=resume or init_state is not None
    )
    if is_main:  # every check above passed: the run folder is created here, not before
        _make_run_folder(run_dir)
    lock = RunLock(run_dir) if is_main else contextlib.nullcontext()
    with lock:
        if is_main:  # no other process writes here now: temporaries left are a killed write's
            for name in (CONFIG, TOKENIZER, COMPARISON):
                remove_stale_temporaries(run_dir / name)
        if resume:
            _check_resumable(run_dir, raw, model_cfg, train_cfg, restart_missing, is_main)
        if is_main:
            _write_run_files(
                run_dir, raw, model_cfg, train_cfg, data, resume=resume, changes=changes, init_from=init_from
            )
        return _train_sub_runs(
            run_dir,
            raw,
            model_cfg,
            train_cfg,
            data,
            resume=resume,
            progress=progress,
            stop_at=stop_at,
            plots=plots,
            init_state=init_state,
            distributed=distributed,
            device=device,
            is_main=is_main,
        )


def _resumed_configs(run_dir: Path, changes: Optional[dict], expert_parallel: Optional[int]):
    """(model config, train config with the allowed changes, run flags, tokenizer) of a run to resume."""
    model_cfg, train_cfg, raw = load_run_config(run_dir)
    tok = load_tokenizer(run_dir / TOKENIZER)
    extra = {} if expert_parallel is None else {"expert_parallel": expert_parallel}
    return model_cfg, _apply_resume_changes(train_cfg, {**(changes or {}), **extra}), raw, tok


def _new_run_configs(
    run_dir: Path,
    model_cfg: Optional[LMConfig],
    train_cfg: Optional[TrainConfig],
    init_from: Optional[str],
    changes: Optional[dict],
    expert_parallel: Optional[int],
    *,
    baseline: bool,
    dense_only: bool,
) -> tuple[TrainConfig, dict]:
    """(train config, run flags) of a new run, after checking the arguments and the folder."""
    if train_cfg is None or (model_cfg is None and init_from is None):
        raise ValueError("train_cfg and model_cfg (or init_from) are required for a new run")
    if changes:
        raise ValueError("changes apply to a resumed run only")
    _check_new_run(run_dir)
    if expert_parallel is not None:
        train_cfg = dataclasses.replace(train_cfg, expert_parallel=expert_parallel)
    return train_cfg, {"baseline": baseline, "dense_only": dense_only}


def _write_run_files(
    run_dir: Path,
    raw: dict,
    model_cfg: LMConfig,
    train_cfg: TrainConfig,
    data,
    *,
    resume: bool,
    changes: Optional[dict],
    init_from: Optional[str],
) -> None:
    """Main rank, under the run lock: the config (a resumed run's only when settings changed) and,
    for a new run, the tokenizer."""
    if resume:
        if changes:
            save_run_config(run_dir, model_cfg, train_cfg, **_run_flags(raw))
        return
    _check_new_run(run_dir)  # again, under the lock: another process may have started it meanwhile
    data.tokenizer.save(run_dir / TOKENIZER)
    save_run_config(
        run_dir, model_cfg, train_cfg, baseline=raw["baseline"], dense_only=raw["dense_only"], init_from=init_from
    )


def _train_sub_runs(
    run_dir: Path,
    raw: dict,
    model_cfg: LMConfig,
    train_cfg: TrainConfig,
    data,
    *,
    resume: bool,
    progress: bool,
    stop_at: Optional[int],
    plots: bool,
    init_state: Optional[dict],
    distributed: bool,
    device,
    is_main: bool,
) -> dict:
    """Train (or continue) each model of the run in turn, then write the comparison and plots."""
    summaries = {}
    for label, cfg in sub_runs(raw, model_cfg):
        sub = run_dir / label
        done = _finished_summary(sub, train_cfg.steps) if resume else None
        if done is not None:
            summaries[label] = done
            continue
        trainer = Trainer(
            sub,
            cfg,
            train_cfg,
            data,
            label=label,
            progress=progress,
            init_state=init_state,
            distributed=distributed,
            device=device,
        )
        res = trainer.fit(resume=resume and find_checkpoint(sub) is not None, stop_at=stop_at)
        if "stopped_at" in res:
            return {"stopped_at": res["stopped_at"], "label": label}
        summaries[label] = res
    comparison = {
        "summaries": summaries,
        "data": {
            "source": data.source,
            "domains": data.domains,
            "train_tokens": data.train_ids_N.numel(),
            "val_tokens": data.val_ids_N.numel(),
            "tokenizer": data.tokenizer.kind,
            "vocab_size": data.tokenizer.vocab_size,
        },
    }
    if not is_main:
        return comparison
    atomic_write_bytes(run_dir / COMPARISON, json.dumps(comparison, indent=2).encode())
    if plots:
        from .plots import plot_run

        plot_run(run_dir)
    return comparison


def convert_run(run_dir: Path, *, keep: bool = False, verbose: bool = True) -> list[str]:
    """Turn each sub-run's sharded checkpoint (``checkpoint.dcp``, written under torchrun) into the
    one-process file ``checkpoint.safetensors``, on this one process (no process group): the same
    weights, optimizer state, RNG states and step, so training resumes from it exactly. The folder
    is then deleted (``keep=True``: kept; the file is used, having the same step). Holds the run's
    lock (not while it trains). Returns the labels converted."""
    run_dir = Path(run_dir)
    model_cfg, _, raw = load_run_config(run_dir)
    done = []
    with RunLock(run_dir):
        for label, _ in sub_runs(raw, model_cfg):
            sub = run_dir / label
            distcp.repair(sub / DCP_DIR)
            path = find_checkpoint(sub)
            if path is None or not path.is_dir():
                if verbose:
                    print(f"{label}: {'no checkpoint' if path is None else 'already one file, ' + str(path)}")
                continue
            distcp.convert_to_single_file(path, sub / CHECKPOINT)
            if not keep:
                distcp.remove(path)
            done.append(label)
            if verbose:
                print(f"{label}: {path} -> {sub / CHECKPOINT}" + (" (folder kept)" if keep else ""))
    return done


def _run_flags(raw: dict) -> dict:
    return {
        "baseline": raw.get("baseline", True),
        "dense_only": raw.get("dense_only", False),
        "init_from": raw.get("init_from"),
    }


def _check_folder_path(run_dir: Path) -> None:
    for p in (run_dir, *run_dir.parents):
        if p.exists() and not p.is_dir():
            raise ValueError(f"{p} is a file; the run folder {run_dir} needs a folder there (check --out and --name)")


def _make_run_folder(run_dir: Path) -> None:
    """Create the run folder (after every check): a one-line error naming it when the file system refuses."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cannot create the run folder {run_dir} ({os_error_text(err)}); check --out") from None


def check_run_fits(train_cfg: TrainConfig, model_cfgs: list[LMConfig], world_size: int) -> None:
    """The checks of a run that need neither its data nor a process group, run before the run folder
    is created: the parallel layout (:func:`check_parallel_layout`) and the memory the models'
    training state needs (:func:`check_memory`). ``model_cfgs``: the models the run trains, in turn."""
    check_parallel_layout(train_cfg, model_cfgs, world_size)
    check_memory(train_cfg, model_cfgs, world_size)


def check_parallel_layout(train_cfg: TrainConfig, model_cfgs: list[LMConfig], world_size: int) -> None:
    """The expert x data parallel layout of ``world_size`` ranks (1: one process) for these models:
    every rule :func:`moekit.parallel.apply_expert_parallel` and the trainer enforce once the process
    group exists, checked here from the configs alone (pure: no communication, no file), so that a
    bad layout is refused before the run folder exists. ValueError naming the setting."""
    ep, tp, pp = train_cfg.expert_parallel, train_cfg.tensor_parallel, train_cfg.pipeline_parallel
    M = train_cfg.microbatches
    if world_size <= 1:
        for name, n in (("expert_parallel", ep), ("tensor_parallel", tp), ("pipeline_parallel", pp)):
            if n > 1:
                raise ValueError(
                    f"{name}={n} needs one process per rank: launch with "
                    f"torchrun --nproc-per-node {n} -m moekit train ... (or moekit train --nproc {n})"
                )
        if train_cfg.batch_size % M:
            raise ValueError(f"batch_size={train_cfg.batch_size} must be divisible by microbatches={M}")
        return
    for name, n in (("expert_parallel", ep), ("tensor_parallel", tp), ("pipeline_parallel", pp)):
        if world_size % n:
            raise ValueError(f"{name}={n} must divide the number of ranks ({world_size})")
    if pp > 1:
        _check_pipeline_layout(train_cfg, model_cfgs, world_size)
    readers = world_size // tp // pp  # the ranks of a tensor-parallel group, or of a pipeline, read the same rows
    if train_cfg.batch_size % (readers * M):
        who = f"the number of ranks ({world_size})"
        if tp > 1:
            who += f" over tensor_parallel={tp} ({readers} ranks read different rows)"
        if pp > 1:
            who = (
                f"the {readers} pipelines ({world_size} ranks over pipeline_parallel={pp}), which read different rows,"
            )
        raise ValueError(
            f"batch_size={train_cfg.batch_size} must be divisible by {who}"
            + (f" times microbatches={M}" if M > 1 else "")
        )
    if train_cfg.seq_len % tp:
        raise ValueError(f"seq_len={train_cfg.seq_len} must be divisible by tensor_parallel={tp} (S/tp positions each)")
    if tp > 1:
        import torch

        from ..models import MoETransformer
        from ..parallel.tensor_parallel import tensor_parallel_problem

        for cfg in model_cfgs:
            with torch.device("meta"):
                why = tensor_parallel_problem(MoETransformer(cfg), tp)
            if why:
                raise ValueError(f"tensor_parallel={tp}: {why}")
    for cfg in model_cfgs:
        moe = cfg.moe
        if moe is None or not any(cfg.is_moe_layer(i) for i in range(cfg.n_layers)):
            continue
        if moe.num_experts % ep:
            raise ValueError(
                f"expert_parallel={ep} must divide model.moe.num_experts={moe.num_experts} (each of the {ep} "
                f"expert-parallel ranks holds an equal share of the experts): change --expert-parallel or --experts"
            )
        if moe.revive_after is not None:
            raise ValueError(
                "model.moe.revive_after (dead-expert revival) is not supported under torchrun (expert or data "
                "parallel); set model.moe.revive_after=none"
            )


def _check_pipeline_layout(train_cfg: TrainConfig, model_cfgs: list[LMConfig], world_size: int) -> None:
    """The rules of a pipeline-parallel layout (``train_cfg.pipeline_parallel`` > 1)."""
    import torch

    from ..models import MoETransformer
    from ..parallel.pipeline import check_pipelinable

    pp, ep = train_cfg.pipeline_parallel, train_cfg.expert_parallel
    if train_cfg.tensor_parallel > 1:
        raise ValueError("tensor_parallel > 1 together with pipeline_parallel > 1 is not supported yet")
    if (world_size // pp) % ep:
        raise ValueError(
            f"expert_parallel={ep} must divide the {world_size // pp} ranks of each pipeline stage "
            f"({world_size} ranks / pipeline_parallel={pp})"
        )
    for cfg in model_cfgs:
        with torch.device("meta"):
            model = MoETransformer(cfg)
        try:
            check_pipelinable(model, pp, train_cfg.microbatches)
        except ValueError as err:
            raise ValueError(f"pipeline_parallel={pp}: {err}") from None


def training_state_bytes(model_cfg: LMConfig) -> tuple[int, int]:
    """(parameters, bytes): the model's parameter count, and the least memory training it with AdamW
    holds: its parameters, their gradients and the optimizer's two moments (4 x the parameter bytes)
    and its buffers. Counted on the meta device from the config: nothing is allocated, whatever the size."""
    import torch

    from ..models import MoETransformer

    with torch.device("meta"):
        model = MoETransformer(model_cfg)
    params = sum(p.numel() for p in model.parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return params, 4 * param_bytes + buffers


def available_memory(device: str) -> Optional[tuple[int, str]]:
    """(bytes free for a new process's tensors on ``device``, where the figure comes from), or None
    when unknown. The CPU: the smallest of psutil's (else /proc/meminfo's) available memory and the
    cgroup's memory limit (v2 ``memory.max``, v1 ``memory.limit_in_bytes``). CUDA: the device's free memory."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return None
        index = dev.index if dev.index is not None else int(os.environ.get("LOCAL_RANK", "0"))
        return torch.cuda.mem_get_info(index)[0], f"free memory of cuda:{index}"
    if dev.type != "cpu":
        return None
    found: list[tuple[int, str]] = []
    try:
        import psutil

        found.append((int(psutil.virtual_memory().available), "available memory"))
    except ImportError:
        meminfo = _read_small("/proc/meminfo") or ""
        for line in meminfo.splitlines():
            if line.startswith("MemAvailable:"):
                found.append((int(line.split()[1]) * 1024, "MemAvailable"))
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        text = (_read_small(path) or "").strip()
        if text.isdigit() and int(text) < 2**62:  # "max" / a huge number: no limit
            found.append((int(text), f"the cgroup limit {path}"))
    return min(found) if found else None


def _read_small(path: str) -> Optional[str]:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read(1 << 16)
    except OSError:
        return None


def check_memory(train_cfg: TrainConfig, model_cfgs: list[LMConfig], world_size: int = 1) -> None:
    """ValueError, before anything is allocated, when a model's training state
    (:func:`training_state_bytes`, the least training needs) cannot fit in the memory available on
    the training device. Under torchrun each rank holds its share (the state is sharded over the
    ranks); on the CPU the ranks of this machine share its memory."""
    import torch

    free = available_memory(train_cfg.device)
    if free is None:
        return
    avail, source = free
    share = 1 if world_size <= 1 else world_size
    if world_size > 1 and torch.device(train_cfg.device).type == "cpu":
        share = max(1, world_size // int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size))))
    for cfg in model_cfgs:
        params, need = training_state_bytes(cfg)
        need //= share
        if need <= avail:
            continue
        if cfg.moe is not None:
            label = "the MoE model"
            shape = f"model.moe.num_experts={cfg.moe.num_experts}, model.moe.hidden_dim={cfg.moe.hidden_dim}, "
        else:
            label, shape = "the dense model", f"model.ffn_hidden_dim={cfg.ffn_hidden_dim}, "
        raise ValueError(
            f"{label} ({params:,} parameters: {shape}model.n_layers={cfg.n_layers}, model.dim={cfg.dim}) needs "
            f"at least {_gib(need)} for its parameters, gradients and AdamW state"
            + (f" (its share on this machine, with {world_size} ranks)" if world_size > 1 else "")
            + f", but {_gib(avail)} is free here ({source}): make the model smaller"
        )


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"


def _check_new_run(run_dir: Path) -> None:
    if (run_dir / CONFIG).exists():
        raise FileExistsError(f"{run_dir} already holds a run: pick another --name, or --resume {run_dir}")


def _apply_resume_changes(train_cfg: TrainConfig, changes: dict) -> TrainConfig:
    """The run's train config with the fields a resume may change replaced (others: ValueError)."""
    bad = sorted(set(changes) - set(RESUME_CHANGES))
    if bad:
        raise ValueError(
            f"a resumed run keeps its settings; {', '.join('train.' + b for b in bad)} cannot change "
            f"(a resume may change: {', '.join(RESUME_CHANGES)})"
        )
    return dataclasses.replace(train_cfg, **changes) if changes else train_cfg


def _trained_steps(sub: Path) -> int:
    """Steps recorded in a sub-run's metrics or summary (0 when it never logged one)."""
    summary = _read_summary(sub)
    return max([r["step"] for r in read_metrics(sub)] + [summary["steps"] if summary else 0])


def _check_resumable(
    run_dir: Path, raw: dict, model_cfg: LMConfig, train_cfg: TrainConfig, restart_missing: bool, verbose: bool = True
) -> None:
    """Refuse to silently restart a model whose checkpoint is gone, or to shorten a run below
    what was already trained."""
    for label, _ in sub_runs(raw, model_cfg):
        sub = run_dir / label
        trained = _trained_steps(sub)
        if trained and find_checkpoint(sub) is None and _finished_summary(sub, train_cfg.steps) is None:
            if not restart_missing:
                raise CheckpointError(
                    f"{sub / CHECKPOINT} is missing (and there is no {DCP_DIR} folder), but {label} "
                    f"has trained {trained} steps "
                    f"(deleted, or killed before its first checkpoint): restore the file, or pass "
                    f"--restart-missing to train {label} again from step 0"
                )
            if verbose:
                print(f"{label}: no checkpoint; training it again from step 0 (--restart-missing)")
        if trained > train_cfg.steps:
            raise ValueError(f"steps={train_cfg.steps} is below the {trained} steps {label} has already trained")


def _read_summary(sub: Path) -> Optional[dict]:
    """A sub-run's summary (with an integer ``steps``), or None when it has none or it is unreadable
    (with a warning naming the file: the sub-run counts as unfinished, so a resume writes it again)."""
    path = sub / SUMMARY
    if not path.exists():
        return None
    try:
        summary = read_run_json(path, "summary")  # errors name the file
        summary["steps"] = int(summary["steps"])
        return summary
    except OSError as err:
        reason = os_error_text(err, path)
    except (KeyError, TypeError, ValueError) as err:
        reason = str(err) if str(path) in str(err) else f"{path} is not a valid summary (no integer 'steps')"
    warnings.warn(f"{reason}; ignoring it (a resume writes it again)", stacklevel=1)  # one place: shown once
    return None


def _finished_summary(sub: Path, steps: int) -> Optional[dict]:
    """The summary of a sub-run that has trained ``steps`` steps or more, else None."""
    summary = _read_summary(sub)
    return summary if summary is not None and summary["steps"] >= steps else None


def _prepare_data(
    train_cfg: TrainConfig, model_cfg: LMConfig, tok, distributed: bool, is_main: bool, *, fixed_vocab: bool
):
    """(data, model config with the tokenizer's vocabulary) after checking that they fit together:
    the vocabulary, the sequence length and the size of both splits."""
    if distributed:
        from ..parallel import barrier
    if distributed and not is_main:
        barrier()  # rank 0 builds (and caches) the tokenizer first
    data = build_data(train_cfg.data, train_cfg.tokenizer, train_cfg.vocab_size, train_cfg.code_chars, tok=tok)
    if distributed and is_main:
        barrier()
    if data.tokenizer.vocab_size != model_cfg.vocab_size:
        if fixed_vocab:
            if data.tokenizer.vocab_size > model_cfg.vocab_size:
                raise ValueError(
                    f"tokenizer vocabulary {data.tokenizer.vocab_size} > model vocab_size {model_cfg.vocab_size}"
                )
        else:
            model_cfg = LMConfig.from_dict({**model_cfg.to_dict(), "vocab_size": data.tokenizer.vocab_size})
    if train_cfg.seq_len > model_cfg.max_seq_len:
        raise ValueError(
            f"seq_len={train_cfg.seq_len} exceeds the model's max_seq_len={model_cfg.max_seq_len} "
            f"(lower --seq-len or set model.max_seq_len)"
        )
    need = train_cfg.seq_len + 2
    for split, ids in (("training", data.train_ids_N), ("validation", data.val_ids_N)):
        if ids.numel() < need:
            raise ValueError(
                f"the {split} split of {train_cfg.data or 'the corpus'} has {ids.numel()} tokens; "
                f"seq_len={train_cfg.seq_len} needs at least {need} (more --data, or a lower --seq-len)"
            )
    return data, model_cfg


def _setup_distributed(cfg: TrainConfig):
    """(distributed, device, is_main). Joins torchrun's process group when launched by it; asks
    for torchrun when expert parallelism is requested without it."""
    import torch

    check_device_available("device", cfg.device)
    check_parallel_layout(cfg, [], int(os.environ.get("WORLD_SIZE", "1")))  # (run_train checked it with the models)
    if not distributed_launch():
        return False, torch.device(cfg.device), True
    from ..parallel import init_distributed

    rank, _, device = init_distributed(cfg.device, cfg.dist_timeout_s)
    return True, device, rank == 0
