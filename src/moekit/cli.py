"""The ``moekit`` command: train, generate, inspect.

    moekit train                                  # MoE LM + dense twin on the embedded corpus (CPU, minutes)
    moekit train --steps 200 --set model.moe.num_experts=16 --set train.lr=0.002
    moekit train --resume runs/<name>
    moekit generate --run runs/<name> --prompt "def "
    moekit inspect --run runs/<name>
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

from .config import LMConfig, TrainConfig

TRAIN_SHORTCUTS = {  # flag -> (section, dotted field)
    "steps": ("train", "steps"), "batch_size": ("train", "batch_size"), "seq_len": ("train", "seq_len"),
    "lr": ("train", "lr"), "seed": ("train", "seed"), "device": ("train", "device"), "data": ("train", "data"),
    "threads": ("train", "threads"), "tokenizer": ("train", "tokenizer"), "eval_every": ("train", "eval_every"),
    "dim": ("model", "dim"), "layers": ("model", "n_layers"), "experts": ("model", "moe.num_experts"),
    "top_k": ("model", "moe.top_k"), "router": ("model", "moe.router"),
    "expert_parallel": ("train", "expert_parallel"),
}


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _set_dotted(d: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        if not isinstance(d.get(k), dict):
            raise ValueError(f"--set {dotted}: {k!r} is not a config section")
        d = d[k]
    d[keys[-1]] = value


def build_configs(args: argparse.Namespace) -> tuple[LMConfig, TrainConfig]:
    """Preset -> config file -> shortcut flags -> --set overrides, validated at the end."""
    from .train.run import default_model_config

    cfg = {"model": default_model_config(args.preset).to_dict(), "train": TrainConfig().to_dict()}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise FileNotFoundError(f"--config: no such file: {path}")
        loaded = json.loads(path.read_text())
        for section in ("model", "train"):
            for k, v in loaded.get(section, {}).items():
                if section == "model" and k == "moe" and isinstance(v, dict) and isinstance(cfg["model"].get("moe"), dict):
                    cfg["model"]["moe"].update(v)
                else:
                    cfg[section][k] = v
    for flag, (section, dotted) in TRAIN_SHORTCUTS.items():
        value = getattr(args, flag, None)
        if value is not None:
            _set_dotted(cfg[section], dotted, value)
    if args.dim is not None and isinstance(cfg["model"].get("moe"), dict):
        cfg["model"]["moe"]["dim"] = args.dim
    for item in args.set or []:
        if "=" not in item:
            raise ValueError(f"--set expects section.field=value (e.g. model.moe.top_k=1); got {item!r}")
        key, value = item.split("=", 1)
        section, _, dotted = key.partition(".")
        if section not in cfg or not dotted:
            raise ValueError(f"--set key must start with 'model.' or 'train.'; got {key!r}")
        _set_dotted(cfg[section], dotted, _parse_value(value))
    return LMConfig.from_dict(cfg["model"]), TrainConfig.from_dict(cfg["train"])


def cmd_train(args: argparse.Namespace) -> int:
    from .train.run import run_train
    from .train.trainer import TrainingInterrupted

    if args.resume:
        run_dir = Path(args.resume)
        _main_print(f"resuming {run_dir}")
        try:
            comparison = run_train(run_dir, resume=True, progress=not args.quiet, expert_parallel=args.expert_parallel,
                                   stop_at=args.stop_at)
        except TrainingInterrupted as err:
            _main_print(f"\n{err}. Continue with: moekit train --resume {run_dir}")
            return err.exit_code  # 130 after Ctrl-C, 143 after SIGTERM
    else:
        model_cfg, train_cfg = build_configs(args)
        name = args.name or datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = Path(args.out) / name
        try:
            comparison = run_train(run_dir, None if args.init_from else model_cfg, train_cfg, baseline=not args.no_baseline,
                                   dense_only=args.dense, progress=not args.quiet, init_from=args.init_from,
                                   stop_at=args.stop_at)
        except TrainingInterrupted as err:
            _main_print(f"\n{err}. Continue with: moekit train --resume {run_dir}")
            return err.exit_code  # 130 after Ctrl-C, 143 after SIGTERM
    if "stopped_at" in comparison:
        _main_print(f"stopped at step {comparison['stopped_at']} ({comparison['label']}); checkpoint saved. "
                    f"Continue with: moekit train --resume {run_dir}")
        return 0
    if _rank() == 0:
        print_summary(run_dir, comparison)
    return 0


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _main_print(msg: str) -> None:
    if _rank() == 0:
        print(msg)


def print_summary(run_dir: Path, comparison: dict) -> None:
    s = comparison["summaries"]
    print(f"\nrun folder: {run_dir}")
    print(f"{'model':<6} {'params total':>13} {'active/token':>13} {'val loss':>9} " +
          " ".join(f"{'val ' + d:>10}" for d in comparison["data"]["domains"]) + f" {'tokens/s':>9}")
    for label, r in s.items():
        doms = " ".join(f"{r.get('val_loss_' + d, float('nan')):>10.4f}" for d in comparison["data"]["domains"])
        print(f"{label:<6} {r['params_total']:>13,} {r['params_active']:>13,} {r['val_loss']:>9.4f} {doms} {r['tokens_per_s'] or 0:>9.0f}")
    if "moe" in s and "dense" in s:
        d = s["dense"]["val_loss"] - s["moe"]["val_loss"]
        verdict = "MoE is better" if d > 0 else "dense is better"
        print(f"dense - MoE validation loss: {d:+.4f} nats/token ({verdict})")
    print(f"plots: {', '.join(p.name for p in sorted(run_dir.glob('*.png')))}")


def cmd_generate(args: argparse.Namespace) -> int:
    from .generate import generate_text

    text = generate_text(args.run, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         top_p=args.top_p, top_k_experts=args.top_k_experts, seed=args.seed, model=args.model,
                         use_cache=not args.no_cache, device=args.device)
    print(text)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .analysis import inspect_run

    inspect_run(args.run, out_dir=args.out, windows=args.windows, device=args.device, top_k=args.top_k_experts)
    return 0


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moekit", description="Mixture-of-Experts for PyTorch")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a MoE LM and its dense twin on the embedded corpus")
    t.add_argument("--name", help="run name (default: a timestamp)")
    t.add_argument("--out", default="runs", help="folder that holds run folders")
    t.add_argument("--preset", default="deepseek", help="deepseek (default: 16 fine-grained experts, top-4, 1 shared, sigmoid router), mixtral (8 experts, top-2), switch (top-1), qwen_moe")
    t.add_argument("--config", help="JSON file with {'model': {...}, 'train': {...}}")
    t.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE", help="override any config field (repeatable)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run exactly")
    t.add_argument("--init-from", metavar="HF_DIR", help="fine-tune a Hugging Face MoE checkpoint folder (Mixtral, "
                   "Qwen2-MoE, Qwen3-MoE, OLMoE) with its tokenizer.json; model flags are ignored, no dense baseline")
    t.add_argument("--no-baseline", action="store_true", help="skip the dense baseline")
    t.add_argument("--dense", action="store_true", help="train only the dense model")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                   help="checkpoint and exit at this step (as after Ctrl-C); continue later with --resume")
    helps = {"expert_parallel": "split each MoE layer's experts over N ranks (launch with torchrun --nproc-per-node; "
                                "remaining ranks are data parallel); with --resume, continue on another layout"}
    for flag in TRAIN_SHORTCUTS:
        typ = {"lr": float}.get(flag, str if flag in ("device", "data", "tokenizer", "router") else int)
        t.add_argument("--" + flag.replace("_", "-"), dest=flag, type=typ, default=None, help=helps.get(flag))
    t.set_defaults(func=cmd_train)

    g = sub.add_parser("generate", help="sample text from a trained run (or a Hugging Face folder)")
    g.add_argument("--run", required=True)
    g.add_argument("--prompt", default="")
    g.add_argument("--max-new-tokens", type=int, default=120)
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--top-k-experts", type=int, default=None, help="experts per token at inference (default: as trained)")
    g.add_argument("--model", default="moe", choices=("moe", "dense"))
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--no-cache", action="store_true", help="recompute the whole prefix each step (no KV cache)")
    g.add_argument("--device", default="cpu")
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("inspect", help="which experts take which tokens: tables, heatmaps, HTML report")
    i.add_argument("--run", required=True)
    i.add_argument("--out", default=None, help="output folder (default: RUN/inspect)")
    i.add_argument("--windows", type=int, default=64, help="validation sequences to route")
    i.add_argument("--top-k-experts", type=int, default=None)
    i.add_argument("--device", default="cpu")
    i.set_defaults(func=cmd_inspect)
    return p


def main(argv: Optional[list] = None) -> int:
    from .train.checkpoint import CheckpointError

    from .parallel import ExpertParallelError
    from .train.trainer import TrainingDiverged

    args = make_parser().parse_args(argv)
    where = f" (rank {_rank()})" if "WORLD_SIZE" in os.environ else ""
    try:
        return args.func(args)
    except (CheckpointError, FileNotFoundError, FileExistsError, ValueError, TypeError) as err:
        print(f"moekit {args.command}{where}: error: {err}", file=sys.stderr)
        return 2
    except (ExpertParallelError, TrainingDiverged) as err:
        print(f"moekit {args.command}{where}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # outside a training loop (which saves a checkpoint itself)
        print(f"\nmoekit {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        _close_process_group()


def _close_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
