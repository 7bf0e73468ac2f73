"""The main job: train a MoE language model and its dense twin (same active parameters per token,
same tokens, same steps) into one run folder, then compare them and plot."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Optional

from ..config import LMConfig, MoEConfig, TrainConfig
from ..data import build_data, load_tokenizer
from .._io import atomic_write_bytes
from .trainer import CHECKPOINT, SUMMARY, Trainer

CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
COMPARISON = "comparison.json"


def default_model_config(preset: str = "deepseek", **overrides) -> LMConfig:
    """The small CPU model of ``moekit train``: 4 layers of width 128, a MoE FFN in each
    (DeepSeekMoE layout by default: 16 experts of width 128, top-4, one shared expert)."""
    from ..models import PRESETS

    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(map(repr, PRESETS))}; got {preset!r}")
    moe = dict(dim=128, hidden_dim=128 if preset in ("deepseek", "qwen_moe") else 256, **PRESETS[preset])
    model = dict(vocab_size=4096, dim=128, n_layers=4, n_heads=4, max_seq_len=256, moe=MoEConfig(**moe))
    model.update(overrides)
    return LMConfig(**model)


def save_run_config(run_dir: Path, model_cfg: LMConfig, train_cfg: TrainConfig, *, baseline: bool, dense_only: bool,
                    init_from: Optional[str] = None) -> None:
    cfg = {"model": model_cfg.to_dict(), "train": train_cfg.to_dict(), "baseline": baseline, "dense_only": dense_only,
           "init_from": init_from}
    atomic_write_bytes(run_dir / CONFIG, json.dumps(cfg, indent=2).encode())


def load_run_config(run_dir: Path) -> tuple[LMConfig, TrainConfig, dict]:
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a moekit run folder (no {CONFIG})")
    try:
        raw = json.loads(path.read_text())
        return LMConfig.from_dict(raw["model"]), TrainConfig.from_dict(raw["train"]), raw
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a valid run config: {err}") from err


def _hf_start(path: str):
    """(model config, weights, tokenizer) to fine-tune a Hugging Face checkpoint folder, with the
    checkpoint's own auxiliary loss as transformers trains it (``output_router_logits=True``):
    ``router_aux_loss_coef`` times the balance loss pooled over the MoE layers, and no other term
    (see :func:`moekit.interop.config_from_hf`)."""
    from ..generate import hf_tokenizer, is_hf_folder
    from ..interop import load_hf

    if not is_hf_folder(path):
        raise FileNotFoundError(f"--init-from: {path} is not a Hugging Face checkpoint folder (config.json with model_type)")
    model = load_hf(str(path), training_losses=True)
    return model.cfg, model.state_dict(), hf_tokenizer(path)


def sub_runs(raw: dict, model_cfg: LMConfig) -> list[tuple[str, LMConfig]]:
    """(label, model config) of each model the run trains, in order."""
    if raw.get("dense_only"):
        return [("dense", model_cfg.dense_twin())]
    runs = [("moe", model_cfg)]
    if raw.get("baseline", True) and model_cfg.moe is not None:
        runs.append(("dense", model_cfg.dense_twin()))
    return runs


def distributed_launch() -> bool:
    """True when this process was started by torchrun (or another launcher) with several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def run_train(run_dir: Path, model_cfg: Optional[LMConfig] = None, train_cfg: Optional[TrainConfig] = None, *,
              baseline: bool = True, dense_only: bool = False, resume: bool = False, progress: bool = True,
              stop_at: Optional[int] = None, plots: bool = True, init_from: Optional[str] = None,
              expert_parallel: Optional[int] = None) -> dict:
    """Train the run's models (resuming where a checkpoint exists) and write the comparison.
    ``init_from``: fine-tune a Hugging Face checkpoint folder (its tokenizer, no dense baseline).

    Under ``torchrun`` every rank calls this: the MoE's experts are split over
    ``train.expert_parallel`` ranks (``expert_parallel`` overrides it, e.g. to resume on another
    layout; checkpoints are unsharded), the rest is data parallel, and rank 0 writes the files."""
    run_dir = Path(run_dir)
    init_state = None
    if resume:
        model_cfg, train_cfg, raw = load_run_config(run_dir)
        tok = load_tokenizer(run_dir / TOKENIZER)
    else:
        if train_cfg is None or (model_cfg is None and init_from is None):
            raise ValueError("train_cfg and model_cfg (or init_from) are required for a new run")
        if (run_dir / CONFIG).exists():
            raise FileExistsError(f"{run_dir} already holds a run: pick another --name, or --resume {run_dir}")
        tok = None
        raw = {"baseline": baseline, "dense_only": dense_only}
    if expert_parallel is not None:
        train_cfg = dataclasses.replace(train_cfg, expert_parallel=expert_parallel)
    distributed, device, is_main = _setup_distributed(train_cfg)
    if not resume:
        if init_from is not None:
            model_cfg, init_state, tok = _hf_start(init_from)
            baseline, dense_only = False, False
            raw = {"baseline": False, "dense_only": False}
        if is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
    if distributed:
        from ..parallel import barrier
    if distributed and not is_main:
        barrier()  # rank 0 builds (and caches) the tokenizer first
    data = build_data(train_cfg.data, train_cfg.tokenizer, train_cfg.vocab_size, train_cfg.code_chars, tok=tok)
    if distributed and is_main:
        barrier()
    if data.tokenizer.vocab_size != model_cfg.vocab_size:
        if resume or init_state is not None:
            if data.tokenizer.vocab_size > model_cfg.vocab_size:
                raise ValueError(f"tokenizer vocabulary {data.tokenizer.vocab_size} > model vocab_size {model_cfg.vocab_size}")
        else:
            model_cfg = LMConfig.from_dict({**model_cfg.to_dict(), "vocab_size": data.tokenizer.vocab_size})
    if not resume and is_main:
        data.tokenizer.save(run_dir / TOKENIZER)
        save_run_config(run_dir, model_cfg, train_cfg, baseline=baseline, dense_only=dense_only, init_from=init_from)
    summaries = {}
    for label, cfg in sub_runs(raw, model_cfg):
        sub = run_dir / label
        if (sub / SUMMARY).exists() and resume:
            summaries[label] = json.loads((sub / SUMMARY).read_text())
            continue
        trainer = Trainer(sub, cfg, train_cfg, data, label=label, progress=progress, init_state=init_state,
                          distributed=distributed, device=device)
        res = trainer.fit(resume=resume and (sub / CHECKPOINT).exists(), stop_at=stop_at)
        if "stopped_at" in res:
            return {"stopped_at": res["stopped_at"], "label": label}
        summaries[label] = res
    comparison = {"summaries": summaries, "data": {"source": data.source, "domains": data.domains,
                                                   "train_tokens": data.train_ids_N.numel(), "val_tokens": data.val_ids_N.numel(),
                                                   "tokenizer": data.tokenizer.kind, "vocab_size": data.tokenizer.vocab_size}}
    if not is_main:
        return comparison
    atomic_write_bytes(run_dir / COMPARISON, json.dumps(comparison, indent=2).encode())
    if plots:
        from .plots import plot_run

        plot_run(run_dir)
    return comparison


def _setup_distributed(cfg: TrainConfig):
    """(distributed, device, is_main). Joins torchrun's process group when launched by it; asks
    for torchrun when expert parallelism is requested without it."""
    import torch

    if not distributed_launch():
        if cfg.expert_parallel > 1:
            raise ValueError(f"expert_parallel={cfg.expert_parallel} needs one process per rank: launch with "
                             f"torchrun --nproc-per-node {cfg.expert_parallel} -m moekit train ...")
        return False, torch.device(cfg.device), True
    from ..parallel import init_distributed

    world = int(os.environ["WORLD_SIZE"])
    if world % cfg.expert_parallel:
        raise ValueError(f"expert_parallel={cfg.expert_parallel} must divide the number of ranks ({world})")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={cfg.device!r} but CUDA is not available here; use --device cpu")
    rank, _, device = init_distributed(cfg.device, cfg.dist_timeout_s)
    return True, device, rank == 0
