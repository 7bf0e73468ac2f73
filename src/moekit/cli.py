"""The ``moekit`` command: train, generate, inspect.

moekit train                                  # MoE LM + dense twin on the embedded corpus (CPU, minutes)
moekit train --steps 200 --set model.moe.num_experts=16 --set train.lr=0.002
moekit train --resume runs/<name>
moekit train --nproc 2 --expert-parallel 2     # 2 processes on this machine (torchrun's launcher, inside)
moekit generate --run runs/<name> --prompt "def "
moekit inspect --run runs/<name>
moekit convert --run runs/<name>              # sharded checkpoint of a torchrun run -> one file
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

from .config import LMConfig, TrainConfig, _DictMixin, check_device_available, check_positive

TRAIN_SHORTCUTS = {  # flag -> (section, dotted field)
    "steps": ("train", "steps"),
    "batch_size": ("train", "batch_size"),
    "seq_len": ("train", "seq_len"),
    "lr": ("train", "lr"),
    "seed": ("train", "seed"),
    "device": ("train", "device"),
    "data": ("train", "data"),
    "threads": ("train", "threads"),
    "tokenizer": ("train", "tokenizer"),
    "eval_every": ("train", "eval_every"),
    "dim": ("model", "dim"),
    "layers": ("model", "n_layers"),
    "experts": ("model", "moe.num_experts"),
    "top_k_experts": ("model", "moe.top_k"),
    "router": ("model", "moe.router"),
    "expert_parallel": ("train", "expert_parallel"),
    "tensor_parallel": ("train", "tensor_parallel"),
    "pipeline_parallel": ("train", "pipeline_parallel"),
    "microbatches": ("train", "microbatches"),
    "compile": ("train", "compile"),
    "activation_checkpointing": ("train", "activation_checkpointing"),
}
SECTIONS: dict[str, type[_DictMixin]] = {"model": LMConfig, "train": TrainConfig}
RUN_KEYS = ("baseline", "dense_only", "init_from")  # the other keys of a run folder's config.json
DEFAULT_PRESET = "deepseek"
LAUNCH_DIR_ENV = "MOEKIT_LAUNCH_DIR"  # set by `moekit train --nproc N` for the processes it starts
LAUNCH_SHUTDOWN_S = 600  # --nproc: how long the processes may take to save and stop after Ctrl-C / SIGTERM


def _load_config_file(path: Path) -> dict:
    """The ``--config`` JSON file: an object with optional 'model' and 'train' objects."""
    if path.is_dir():
        raise ValueError(f"--config: {path} is a directory; expected a JSON file like a run's config.json")
    if not path.is_file():
        raise FileNotFoundError(f"--config: no such file: {path}")
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"--config {path}: not valid JSON ({err})") from None
    if not isinstance(loaded, dict):
        raise ValueError(
            f"--config {path}: the top level must be an object like "
            f'{{"model": {{...}}, "train": {{...}}}}; got {type(loaded).__name__}'
        )
    unknown = sorted(set(loaded) - set(SECTIONS) - set(RUN_KEYS))
    if unknown:
        raise ValueError(
            f"--config {path}: unknown key(s) {', '.join(map(repr, unknown))}; expected 'model' and 'train'"
        )
    if loaded.get("init_from"):
        raise ValueError(f"--config {path}: init_from is given with --init-from HF_DIR, not in a config file")
    for section in SECTIONS:
        if not isinstance(loaded.get(section, {}), dict):
            raise ValueError(f"--config {path}: {section!r} must be an object of fields; got {loaded[section]!r}")
    return loaded


def _set_dotted(section: str, d: dict, dotted: str, text: str) -> None:
    """``d[a][b]... = value`` for ``section.a.b``, the text converted to the field's declared type."""
    cls, keys = SECTIONS[section], dotted.split(".")
    for i, k in enumerate(keys[:-1]):
        where = f"{section}.{'.'.join(keys[: i + 1])}"
        sub = cls.section_type(k)
        if sub is None:
            raise ValueError(f"{where} is not a config section")
        if not isinstance(d.get(k), dict):
            raise ValueError(
                f"{where} is None here (a dense model); give it fields first, e.g. "
                f'{where}=\'{{"dim": 128, "hidden_dim": 128}}\''
            )
        d, cls = d[k], sub
    d[keys[-1]] = cls.parse_field(keys[-1], text, label=f"{section}.{dotted}")


def _mark(given: dict[str, int], key: str, when: int, value: Any = None) -> None:
    """Record that the user set ``key`` (``"model.dim"``) in source number ``when`` (the config
    file 0, the flags 1, each --set after them); a section given whole (``model.moe={...}``)
    forgets what was set inside it before and records its own fields."""
    for k in [k for k in given if k.startswith(key + ".")]:
        del given[k]
    given[key] = when
    if isinstance(value, dict):
        given.update({f"{key}.{k}": when for k in value})


def _derive(d: dict, key: str, value: Any, label: str, sources: tuple[str, ...], given: dict, why: str) -> None:
    """A derived field follows its source (``d[key] = value``) unless the user set it in the same
    source or a later one: then it must agree, else a one-line error ``label=X but why``."""
    when = given.get(label)
    if when is None or when < max(given.get(s, -1) for s in sources):
        d[key] = value
    elif d[key] != value:
        raise ValueError(f"{label}={_show(d[key])} but {why}")


def _follow_derived(cfg: dict, given: dict[str, int], train: TrainConfig) -> None:
    """The fields derived from others, whichever way (--config, a flag, --set) either was set: the
    MoE layer's width is the model's (model.moe.dim follows model.dim), the model's vocabulary is
    the tokenizer's (model.vocab_size follows train.vocab_size / train.tokenizer). Hidden widths
    (model.moe.hidden_dim, model.ffn_hidden_dim) are settings of their own."""
    from .config import BPE_MIN_VOCAB
    from .data.tokenizer import ByteTokenizer

    model = cfg["model"]
    if isinstance(model.get("moe"), dict) and isinstance(model.get("dim"), int):
        why = f"model.dim={model['dim']}: the MoE layer's width is the model's (leave model.moe.dim out: it follows)"
        _derive(model["moe"], "dim", model["dim"], "model.moe.dim", ("model.dim",), given, why)
    if train.tokenizer == "bytes":
        vocab = ByteTokenizer().vocab_size
        why = f"train.tokenizer='bytes' has {vocab} tokens: the model's vocabulary is the tokenizer's (leave it out)"
    else:
        vocab = train.vocab_size
        why = (
            f"the model's vocabulary is the trained tokenizer's, train.vocab_size={vocab} with train.tokenizer='bpe' "
            f"(set train.vocab_size instead, or leave model.vocab_size out)"
        )
        v, when = model.get("vocab_size"), given.get("model.vocab_size")
        if when == 0 == given.get("train.vocab_size") and isinstance(v, int) and BPE_MIN_VOCAB <= v <= vocab:
            return  # a run's config.json: the vocabulary trained on a small corpus can be smaller than asked
    _derive(model, "vocab_size", vocab, "model.vocab_size", ("train.vocab_size", "train.tokenizer"), given, why)


def build_configs(args: argparse.Namespace) -> tuple[LMConfig, TrainConfig]:
    """Preset -> config file -> shortcut flags -> --set overrides, validated at the end. Every
    value is converted to its field's declared type, or rejected naming the field; derived fields
    follow the field they derive from (:func:`_follow_derived`)."""
    from .train.run import default_model_config

    cfg = {"model": default_model_config(args.preset or DEFAULT_PRESET).to_dict(), "train": TrainConfig().to_dict()}
    given: dict[str, int] = {}  # "section.field" -> the source that set it last (_mark)
    if args.config:
        loaded = _load_config_file(Path(args.config))
        for section in SECTIONS:
            for k, v in loaded.get(section, {}).items():
                if (
                    section == "model"
                    and k == "moe"
                    and isinstance(v, dict)
                    and isinstance(cfg["model"].get("moe"), dict)
                ):
                    cfg["model"]["moe"].update(v)
                    given.update({f"model.moe.{kk}": 0 for kk in v})
                else:
                    cfg[section][k] = v
                    _mark(given, f"{section}.{k}", 0, v)
        args.no_baseline = args.no_baseline or loaded.get("baseline", True) is False
        args.dense = args.dense or loaded.get("dense_only", False) is True
    for flag, (section, dotted) in TRAIN_SHORTCUTS.items():
        value = getattr(args, flag, None)
        if value is not None:
            _set_dotted(section, cfg[section], dotted, str(value))
            _mark(given, f"{section}.{dotted}", 1)
    for i, item in enumerate(args.set or []):
        if "=" not in item:
            raise ValueError(f"--set expects section.field=value (e.g. model.moe.top_k=1); got {item!r}")
        key, value = item.split("=", 1)
        section, _, dotted = key.partition(".")
        if section not in cfg or not dotted:
            raise ValueError(f"--set key must start with 'model.' or 'train.'; got {key!r}")
        try:
            _set_dotted(section, cfg[section], dotted, value)
        except ValueError as err:
            raise ValueError(f"--set {item}: {err}") from None
        node = cfg[section]
        for k in dotted.split("."):
            node = node[k]
        _mark(given, key, 2 + i, node)
    pp = cfg["train"].get("pipeline_parallel")
    if isinstance(pp, int) and pp > 1 and "train.microbatches" not in given:
        cfg["train"]["microbatches"] = 2 * pp  # a pipeline's default: twice its stages (bubble (P-1)/(M+P-1))
    train = TrainConfig.from_dict(cfg["train"])
    _follow_derived(cfg, given, train)
    return LMConfig.from_dict(cfg["model"]), train


def describe_config(model_cfg: LMConfig, train_cfg: TrainConfig) -> str:
    """Every field of the resolved config as ``section.field = value  # what it means``: each
    line's left part is a valid ``--set`` argument."""
    rows: list[tuple[str, str]] = []

    def walk(prefix: str, obj) -> None:
        comments = type(obj).field_comments()
        for name in type(obj).field_types():
            value = getattr(obj, name)
            if hasattr(value, "field_types"):
                rows.append((f"# {prefix}{name}: {comments.get(name, '')}", ""))
                walk(f"{prefix}{name}.", value)
            else:
                rows.append((f"{prefix}{name}={_show(value)}", comments.get(name, "")))

    walk("model.", model_cfg)
    walk("train.", train_cfg)
    width = max(len(left) for left, c in rows if c)
    return "\n".join(f"{left:<{width}}  # {c}" if c else left for left, c in rows)


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _resume_changes(args: argparse.Namespace) -> dict:
    """The train fields a ``--resume`` command line changes; ValueError for any other setting."""
    from .train.run import RESUME_CHANGES

    fixed = [
        f"--{f.replace('_', '-')}"
        for f in TRAIN_SHORTCUTS
        if getattr(args, f, None) is not None and f not in RESUME_CHANGES
    ]
    fixed += [
        flag
        for flag, given in (
            ("--set", args.set),
            ("--config", args.config),
            ("--preset", args.preset),
            ("--name", args.name),
            ("--init-from", args.init_from),
            ("--dense", args.dense),
            ("--no-baseline", args.no_baseline),
            ("--out", args.out != "runs"),
            ("--print-config", args.print_config),
        )
        if given
    ]
    if fixed:
        raise ValueError(
            f"--resume continues a run as it was configured: {', '.join(fixed)} cannot be given "
            f"(with --resume you may give --steps to extend it, --expert-parallel, --tensor-parallel, "
            f"--pipeline-parallel, --microbatches, --device, "
            f"--threads, --activation-checkpointing, "
            f"--compile, --stop-at, --quiet, --restart-missing, --nproc)"
        )
    return {f: getattr(args, f) for f in RESUME_CHANGES if getattr(args, f, None) is not None}


def cmd_train(args: argparse.Namespace) -> int:
    from .train.checkpoint import CheckpointWriteError
    from .train.run import run_train
    from .train.trainer import TrainingInterrupted

    launching = _will_launch(args)
    if args.resume:
        run_dir = Path(args.resume)
        changes = _resume_changes(args)
        if launching and args.nproc > 1:  # the processes it starts say what they resume
            return launch_train(args.nproc, args.argv)
        _main_print(
            f"resuming {run_dir}" + (f" with {', '.join(f'{k}={v}' for k, v in changes.items())}" if changes else "")
        )
        call = dict(resume=True, changes=changes, restart_missing=args.restart_missing)
    else:
        model_cfg, train_cfg = build_configs(args)
        if args.print_config:
            cfg = {"model": model_cfg.to_dict(), "train": train_cfg.to_dict()}
            print(json.dumps(cfg, indent=2) if args.print_config == "json" else describe_config(model_cfg, train_cfg))
            return 0
        if args.restart_missing:
            raise ValueError("--restart-missing applies to --resume only")
        if args.name is not None and not args.name.strip():
            raise ValueError("--name must not be empty (leave --name out for a timestamp)")
        name = args.name if args.name is not None else datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        if Path(name).name != name or name in (".", ".."):
            raise ValueError(f"--name must be a plain folder name (no '/'); got {name!r}")
        run_dir = Path(args.out) / name
        if launching and args.nproc > 1:
            from .train.run import check_parallel_layout

            # checked once here, not once per process; every process then trains in the same folder
            check_parallel_layout(train_cfg, [] if args.init_from or args.dense else [model_cfg], args.nproc)
            return launch_train(args.nproc, args.argv + ([] if args.name is not None else ["--name", name]))
        call = dict(
            model_cfg=None if args.init_from else model_cfg,
            train_cfg=train_cfg,
            baseline=not args.no_baseline,
            dense_only=args.dense,
            init_from=args.init_from,
        )
    try:
        comparison = run_train(run_dir, progress=not args.quiet, stop_at=args.stop_at, **call)
    except TrainingInterrupted as err:
        _main_print(f"\n{err}. Continue with: {_resume_command(run_dir)}")
        return err.exit_code  # 130 after Ctrl-C, 143 after SIGTERM
    except CheckpointWriteError as err:  # a full disk: what was saved before is intact
        raise CheckpointWriteError(f"{err}; make room, then continue with: {_resume_command(run_dir)}") from None
    if "stopped_at" in comparison:
        _main_print(
            f"stopped at step {comparison['stopped_at']} ({comparison['label']}); checkpoint saved. "
            f"Continue with: {_resume_command(run_dir)}"
        )
        return 0
    if _rank() == 0:
        print_summary(run_dir, comparison)
    return 0


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _will_launch(args: argparse.Namespace) -> bool:
    """Whether this command starts ``--nproc`` processes itself (checked: a positive count, and not
    already under torchrun)."""
    if args.nproc is None or _launched():
        return False
    check_positive("--nproc", args.nproc, integer=True)
    if "WORLD_SIZE" in os.environ:
        raise ValueError("--nproc starts the processes itself: give it without torchrun (or torchrun without --nproc)")
    return True


def _launched() -> bool:
    """This process is one of those ``moekit train --nproc N`` started."""
    return bool(os.environ.get(LAUNCH_DIR_ENV)) and "RANK" in os.environ


def _resume_command(run_dir: Path) -> str:
    """The command that continues the run on the layout it ran on."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return f"moekit train --resume {run_dir}"
    if int(os.environ.get("LOCAL_WORLD_SIZE", str(world))) == world:  # one machine (--nproc or torchrun)
        return f"moekit train --resume {run_dir} --nproc {world}"
    return f"your torchrun command with -m moekit train --resume {run_dir}"


def _report(what: str, value: int) -> None:
    """A process started by ``moekit train --nproc`` tells the launcher its pid, then its exit code."""
    folder = Path(os.environ[LAUNCH_DIR_ENV])
    tmp = folder / f".rank{_rank()}.{what}"
    try:
        tmp.write_text(str(value))
        tmp.replace(folder / f"rank{_rank()}.{what}")
    except OSError:  # the launcher is gone (it removes the folder last): nobody to tell
        pass


def launch_train(nproc: int, argv: list[str]) -> int:
    """``moekit train --nproc N``: run ``moekit train`` (the same arguments) on N processes of this
    machine under torchrun's elastic agent (``torch.distributed.launcher.api.elastic_launch``,
    standalone rendezvous, no restarts) and end as one process does.

    torchrun's agent handles Ctrl-C and SIGTERM by forwarding the signal to every worker (each runs
    in a session of its own, so a terminal's Ctrl-C reaches the agent only), waiting for them, then
    raising ``SignalException``: torchrun prints its traceback and exits 1. Here the agent does the
    same inside this process, the exception is caught, and the exit status is the workers': 130
    after Ctrl-C and 143 after SIGTERM once every worker saved and stopped (rank 0 prints the one
    line), a worker's own error code if one failed, 128 + N for a worker ended by signal N. The
    workers get :data:`LAUNCH_SHUTDOWN_S` to save (torchrun: 30 s, then SIGKILL;
    ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` overrides both). A second signal makes the agent send
    SIGTERM, which stops the workers at once (they keep their last checkpoint); a third kills
    them. Each worker writes its pid and exit code into a folder this function removes."""
    import dataclasses
    import logging
    import shutil
    import signal
    import tempfile
    import uuid

    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    status = Path(tempfile.mkdtemp(prefix="moekit-launch-"))
    kw: dict[str, Any] = dict(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=uuid.uuid4().hex,
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",  # a free port
        max_restarts=0,
        logs_specs=DefaultLogsSpecs(log_dir=str(status / "logs")),
    )
    if "shutdown_timeout" in {f.name for f in dataclasses.fields(LaunchConfig)}:  # (older torch: 30 s)
        kw["shutdown_timeout"] = int(os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", LAUNCH_SHUTDOWN_S))
    env = {LAUNCH_DIR_ENV: str(status)}  # the agent hands its environment to the workers
    if "OMP_NUM_THREADS" not in os.environ:  # torchrun sets 1; share the cores instead
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        env["OMP_NUM_THREADS"] = str(max(1, cores // nproc))
    if "LOGLEVEL" not in os.environ:  # the agent's lines ("Sending process 123 closing signal SIGINT", "failed
        # (exitcode: 2) local_rank: 0"): what they say, the workers and this function say in a line
        env["LOGLEVEL"] = "CRITICAL"  # read by the loggers made from here on
        for name in list(logging.root.manager.loggerDict):
            if name.startswith(("torch.distributed.elastic", "torch.distributed.launcher")):
                logging.getLogger(name).setLevel(logging.CRITICAL)
    saved_env = {k: os.environ.get(k) for k in env}
    os.environ.update(env)

    def stop(signum, frame):  # until the agent installs its own handler (the same), and after
        raise SignalException(f"got {signal.Signals(signum).name}", sigval=signal.Signals(signum))

    stop_signals = (signal.SIGINT, signal.SIGTERM)
    handlers = {s: signal.getsignal(s) for s in stop_signals}
    for s in stop_signals:
        signal.signal(s, stop)
    sig: Optional[signal.Signals] = None
    failure = None
    try:
        elastic_launch(LaunchConfig(**kw), sys.executable)("-u", "-m", "moekit", *argv)
    except SignalException as err:
        sig = signal.Signals(err.sigval)
    except ChildFailedError as err:
        failure = err.get_first_failure()
    finally:
        for s in stop_signals:  # no exception from a signal while cleaning up
            signal.signal(s, signal.SIG_IGN)
        killed = _kill_unfinished(status, nproc)
        codes = {
            r: int((status / f"rank{r}.exit").read_text()) for r in range(nproc) if (status / f"rank{r}.exit").exists()
        }
        shutil.rmtree(status, ignore_errors=True)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for s, h in handlers.items():
            signal.signal(s, h)
    if sig is not None:
        code = 128 + sig
        lost = sorted(set(killed) | {r for r in range(nproc) if r not in codes}) if codes else killed
        if lost:
            who = f"rank {lost[0]} was" if len(lost) == 1 else f"ranks {', '.join(map(str, lost))} were"
            print(
                f"moekit train: stopped ({sig.name}); {who} killed before finishing; "
                f"each model keeps its last complete checkpoint",
                file=sys.stderr,
            )
        elif not codes:  # stopped before training began (nothing saved, nothing printed)
            print(f"moekit train: interrupted ({sig.name})", file=sys.stderr)
        worse = [c for c in codes.values() if c not in (0, code)]
        if worse and not lost:
            return worse[0]  # e.g. a save that failed: that rank printed why
        return 0 if codes and not lost and all(c == 0 for c in codes.values()) else code
    if failure is not None:
        rank, proc = failure
        if proc.exitcode < 0:  # ended by a signal, with no word of its own (the OOM killer's SIGKILL, ...)
            print(f"moekit train: rank {rank} was ended by {signal.Signals(-proc.exitcode).name}", file=sys.stderr)
            return 128 - proc.exitcode
        return proc.exitcode  # the rank printed its error (or, after a signal sent to it alone, its line)
    return 0


def _kill_unfinished(status: Path, nproc: int) -> list[int]:
    """SIGKILL the launched processes still running (after a third signal the agent stops waiting):
    the ranks that reported a pid but no exit code and are still this process's children."""
    import signal
    import time

    killed = []
    for r in range(nproc):
        pid_file = status / f"rank{r}.pid"
        if not pid_file.exists() or (status / f"rank{r}.exit").exists():
            continue
        pid = int(pid_file.read_text())
        try:
            if os.waitpid(pid, os.WNOHANG) != (0, 0):
                continue  # it had ended
            if os.getpgid(pid) == pid:  # torchrun starts each in a session of its own: its children too
                os.killpg(pid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
            for _ in range(50):  # reaped within 5 s, unless stuck in the kernel (then left to init)
                if os.waitpid(pid, os.WNOHANG) != (0, 0):
                    break
                time.sleep(0.1)
        except (ChildProcessError, ProcessLookupError):  # ended and reaped: not ours to kill
            continue
        killed.append(r)
    return killed


def _main_print(msg: str) -> None:
    if _rank() == 0:
        print(msg)


def print_summary(run_dir: Path, comparison: dict) -> None:
    s = comparison["summaries"]
    print(f"\nrun folder: {run_dir}")
    print(
        f"{'model':<6} {'params total':>13} {'active/token':>13} {'val loss':>9} "
        + " ".join(f"{'val ' + d:>10}" for d in comparison["data"]["domains"])
        + f" {'tokens/s':>9}"
    )
    for label, r in s.items():
        losses = [r.get("val_loss_" + d) for d in comparison["data"]["domains"]]
        doms = " ".join(f"{v:>10.4f}" if v is not None else f"{'-':>10}" for v in losses)
        print(
            f"{label:<6} {r['params_total']:>13,} {r['params_active']:>13,} {r['val_loss']:>9.4f} {doms} "
            f"{r['tokens_per_s'] or 0:>9.0f}"
        )
    if "moe" in s and "dense" in s:
        d = s["dense"]["val_loss"] - s["moe"]["val_loss"]
        verdict = (
            "not comparable: a loss is not finite"
            if not math.isfinite(d)
            else "MoE is better"
            if d > 0
            else "dense is better"
        )
        print(f"dense - MoE validation loss: {d:+.4f} nats/token ({verdict})")
    missing = [d for d in comparison["data"]["domains"] if any("val_loss_" + d not in r for r in s.values())]
    if missing:
        print(f"-: no validation window held {' or '.join(missing)} tokens")
    print(f"plots: {', '.join(p.name for p in sorted(run_dir.glob('*.png')))}")


def cmd_generate(args: argparse.Namespace) -> int:
    from .generate import GenerationStats, check_expert_parallel_decoding, generate_text, run_progress
    from .runs import load_run_config

    _check_sampling(args)
    check_device_available("--device", args.device)
    if args.expert_parallel is not None:
        check_positive("--expert-parallel", args.expert_parallel, integer=True)
        check_expert_parallel_decoding(args.expert_memory, args.dtype, args.expert_dtype, args.compile)
    if _will_launch(args):
        if args.expert_parallel is None:
            raise ValueError("--nproc decodes with the experts spread over the processes: give --expert-parallel too")
        if args.nproc % args.expert_parallel:
            raise ValueError(f"--expert-parallel {args.expert_parallel} must divide --nproc {args.nproc}")
        load_run_config(args.run)  # a missing or foreign run is one error here, not one per process
        if args.nproc > 1:
            return launch_train(args.nproc, args.argv)
    progress = run_progress(args.run, args.model)
    if progress is not None and progress[0] < progress[1] and _rank() == 0:
        print(
            f"moekit generate: note: run {Path(args.run).name} stopped at step {progress[0]} of {progress[1]} "
            f"(moekit train --resume {args.run} continues it)",
            file=sys.stderr,
            flush=True,
        )
    stats: list[GenerationStats] = []
    text = generate_text(
        args.run,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k_experts=args.top_k_experts,
        seed=args.seed,
        model=args.model,
        use_cache=not args.no_cache,
        device=args.device,
        on_stats=stats.append,
        compile=args.compile,
        expert_memory=args.expert_memory,
        expert_policy=args.expert_policy,
        prefetch=args.prefetch,
        dtype=args.dtype,
        expert_dtype=args.expert_dtype,
        expert_bits=args.expert_bits,
        threads=args.threads,
        expert_parallel=args.expert_parallel,
    )
    if _rank() != 0:  # every process of an expert-parallel decode has the same text: one prints it
        return 0
    print(text, flush=True)
    note = "; torch.compile, its compilation included" if args.compile else ""
    if args.expert_parallel is not None:
        note += f"; experts spread over {args.expert_parallel} processes"
    print(f"moekit generate: {stats[0].line()}{note}", file=sys.stderr, flush=True)  # stdout holds only the text
    return 0


def _check_sampling(args: argparse.Namespace) -> None:
    from .models.lm import check_sampling

    check_sampling(args.temperature, args.top_p, names=("--temperature", "--top-p"))  # before loading the model
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0; got {args.max_new_tokens}")
    check_positive("--top-k-experts", args.top_k_experts, integer=True, allow_none=True)
    if getattr(args, "expert_memory", None) is not None:
        from .store import POLICIES, parse_bytes

        try:
            args.expert_memory = parse_bytes(args.expert_memory)
        except ValueError as err:
            raise ValueError(f"--expert-memory: {err}") from None
        if args.expert_policy not in POLICIES:
            raise ValueError(f"--expert-policy must be one of {', '.join(POLICIES)}; got {args.expert_policy!r}")
        if args.compile:
            raise ValueError("--expert-memory decodes eagerly (experts are read as routing asks): leave out --compile")
    elif getattr(args, "prefetch", False):
        raise ValueError("--prefetch reads experts into an expert store: give --expert-memory too")
    if hasattr(args, "dtype"):
        from .generate import check_precision

        check_positive("--threads", args.threads, integer=True, allow_none=True)
        names = ("--dtype", "--expert-dtype", "--expert-bits")
        check_precision(
            args.dtype, args.expert_dtype, args.expert_bits, args.expert_memory, args.compile, args.device, names
        )


def cmd_inspect(args: argparse.Namespace) -> int:
    from .analysis import inspect_run

    check_device_available("--device", args.device)
    check_positive("--top-k-experts", args.top_k_experts, integer=True, allow_none=True)
    inspect_run(args.run, out_dir=args.out, windows=args.windows, device=args.device, top_k=args.top_k_experts)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    if args.quantize is not None and args.hf is not None:
        raise ValueError("--quantize and --hf write different things: give one")
    if args.quantize is not None:
        return _convert_quantize(args)
    if args.hf is not None:
        return _convert_hf(args)
    from .train.run import convert_run

    convert_run(Path(args.run), keep=args.keep)
    return 0


def _convert_quantize(args: argparse.Namespace) -> int:
    from .generate import check_precision
    from .quantize import quantize_run

    check_precision(
        args.dtype, args.quantize, args.expert_bits, None, False, "cpu", ("--dtype", "--quantize", "--expert-bits")
    )
    out = Path(args.out) if args.out else Path(f"{str(args.run).rstrip('/')}-{args.quantize.replace(':', '-')}")
    report, quality = quantize_run(args.run, out, args.quantize, rest=args.dtype, bits=args.expert_bits)
    print(f"moekit convert: {out}: {report.line()}")
    print(f"moekit convert: against the float model on the validation split: {quality.line()}")
    return 0


def _convert_hf(args: argparse.Namespace) -> int:
    """The run's MoE model as a Hugging Face folder of ``--hf`` FAMILY, with the run's tokenizer."""
    from .generate import load_run_model
    from .interop import export_hf

    out = Path(args.out) if args.out else Path(f"{str(args.run).rstrip('/')}-{args.hf}")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"--out: {out} exists and is not empty: give a new folder for the export")
    model, _ = load_run_model(args.run)
    export_hf(model, out, args.hf, tokenizer=Path(args.run) / "tokenizer.json")
    print(f"moekit convert: {out}: a {args.hf} checkpoint with the run's tokenizer (transformers, moekit generate)")
    return 0


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default, except where there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "%(default)" not in text
            and action.default not in (None, False, argparse.SUPPRESS)
            and action.option_strings
        ):
            text += " (default: %(default)s)"
        return text


def _shortcut_help(flag: str) -> str:
    """The help of a shortcut flag: its field's comment and default (from the default preset)."""
    from .train.run import default_model_config

    section, dotted = TRAIN_SHORTCUTS[flag]
    obj = default_model_config(DEFAULT_PRESET) if section == "model" else TrainConfig()
    for key in dotted.split(".")[:-1]:
        obj = getattr(obj, key)
    name = dotted.split(".")[-1]
    comment = type(obj).field_comments().get(name, "")
    default = _show(getattr(obj, name))
    if section == "model":
        default += f" with --preset {DEFAULT_PRESET}"
    return f"{comment} (= --set {section}.{dotted}; default: {default})"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    try:
        torch_version = version("torch")
    except PackageNotFoundError:
        torch_version = "not installed"
    return f"moekit {__version__} (torch {torch_version}, Python {sys.version.split()[0]})"


def make_parser() -> argparse.ArgumentParser:
    """The ``moekit`` command line: every subcommand and option, declared in one place (a table
    of ``add_argument`` calls, long by nature; the commands themselves are the ``cmd_*`` functions)."""
    p = argparse.ArgumentParser(
        prog="moekit", description="Mixture-of-Experts for PyTorch", formatter_class=_HelpFormatter
    )
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser(
        "train",
        help="train a MoE LM and its dense twin on the embedded corpus",
        formatter_class=_HelpFormatter,
        description="Train a MoE LM and its dense twin (same active parameters per token) into RUN "
        "= OUT/NAME. Config: --preset, then --config, then the flags, then --set; "
        "`--print-config` lists every field with its meaning.",
    )
    t.add_argument("--name", help="run name (default: a timestamp)")
    t.add_argument("--out", default="runs", help="folder that holds run folders")
    t.add_argument(
        "--preset",
        default=None,
        choices=("deepseek", "mixtral", "switch", "qwen_moe"),
        help="model layout: deepseek (default: 16 fine-grained experts, top-4, 1 shared, sigmoid router), "
        "mixtral (8 experts, top-2), switch (top-1), qwen_moe",
    )
    t.add_argument(
        "--config", metavar="FILE", help='JSON file {"model": {...}, "train": {...}} (a run\'s config.json works)'
    )
    t.add_argument(
        "--set",
        action="append",
        metavar="SECTION.FIELD=VALUE",
        help="override any config field, converted to its type (repeatable; e.g. "
        "--set model.moe.renormalize=false --set model.moe.capacity_factor=none)",
    )
    t.add_argument(
        "--print-config",
        nargs="?",
        const="text",
        choices=("text", "json"),
        default=None,
        help="print the resolved config (text: every field with its meaning; json: a --config file) and exit",
    )
    t.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue a run exactly (also after Ctrl-C, SIGTERM or a crash); "
        "with --steps N, extend a finished run to N steps",
    )
    t.add_argument(
        "--restart-missing",
        action="store_true",
        help="with --resume: train a model whose checkpoint is missing again from step 0 (else refused)",
    )
    t.add_argument(
        "--init-from",
        metavar="HF_DIR",
        help="fine-tune a Hugging Face MoE checkpoint folder (Mixtral, "
        "Qwen2-MoE, Qwen3-MoE, OLMoE) with its tokenizer.json; model flags are ignored, no dense baseline",
    )
    t.add_argument("--no-baseline", action="store_true", help="skip the dense baseline")
    t.add_argument("--dense", action="store_true", help="train only the dense model")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument(
        "--compile",
        action="store_const",
        const=True,
        default=None,
        help="torch.compile the model for the training steps (= --set train.compile=true; faster after "
        "the first steps: see benchmarks/RESULTS.md)",
    )
    t.add_argument(
        "--nproc",
        type=int,
        default=None,
        metavar="N",
        help="train on N processes of this machine (torchrun's launcher, run inside: Ctrl-C and SIGTERM "
        "end with 130 and 143 as with one process); with --expert-parallel; several machines: torchrun",
    )
    t.add_argument(
        "--stop-at",
        type=int,
        default=None,
        metavar="STEP",
        help="checkpoint and exit at this step (as after Ctrl-C); continue later with --resume",
    )
    extra = {
        "expert_parallel": "; with --nproc N (or under torchrun), the remaining ranks are data parallel; "
        "with --resume, continue on another layout",
        "tensor_parallel": "; consecutive ranks, which read the same batch, the sequence split between them "
        "elsewhere; with --resume, continue on another layout",
        "pipeline_parallel": "; stage i on the i-th block of world/N consecutive ranks, the experts of each "
        "stage over its ranks (--expert-parallel); a new run's --microbatches defaults to 2N (with --resume, "
        "give --microbatches when the run's is below N)",
        "microbatches": "; with --pipeline-parallel, what the schedule interleaves",
    }
    types = {"lr": float, "device": str, "data": str, "tokenizer": str, "router": str, "activation_checkpointing": str}
    for flag in TRAIN_SHORTCUTS:
        if flag == "compile":  # a switch, added above
            continue
        names = ["--" + flag.replace("_", "-")] + (["--top-k"] if flag == "top_k_experts" else [])
        t.add_argument(
            *names, dest=flag, type=types.get(flag, int), default=None, help=_shortcut_help(flag) + extra.get(flag, "")
        )
    t.set_defaults(func=cmd_train)

    g = sub.add_parser(
        "generate", help="sample text from a trained run (or a Hugging Face folder)", formatter_class=_HelpFormatter
    )
    g.add_argument("--run", required=True, help="a run folder (RUN) or a Hugging Face checkpoint folder")
    g.add_argument("--prompt", default="", help="text to continue")
    g.add_argument("--max-new-tokens", type=int, default=120, help="tokens to generate (capped by the model's context)")
    g.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (0 = greedy)")
    g.add_argument(
        "--top-p",
        type=float,
        default=0.95,
        help="nucleus sampling: keep the smallest set of tokens with this probability",
    )
    g.add_argument(
        "--top-k-experts", type=int, default=None, help="experts per token at inference (default: as trained)"
    )
    g.add_argument("--model", default="moe", choices=("moe", "dense"), help="which model of the run")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")
    g.add_argument("--no-cache", action="store_true", help="recompute the whole prefix each step (no KV cache)")
    g.add_argument(
        "--compile",
        action="store_true",
        help="decode with torch.compile and a static KV cache (the first "
        "token waits for the compilation, then faster: see benchmarks/RESULTS.md)",
    )
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    g.add_argument(
        "--expert-memory",
        default=None,
        help="keep the experts in the checkpoint file and at most this much of them in memory "
        "(e.g. 200MB, 1GiB): one pool of slots shared by the MoE layers, filled as routing asks "
        "(see docs/inference.md)",
    )
    g.add_argument(
        "--expert-policy",
        default="lfru",
        help="which resident expert a full pool gives up: lfru (recency-weighted frequency), lru or lfu",
    )
    g.add_argument(
        "--prefetch",
        nargs="?",
        type=int,
        const=True,
        default=False,
        metavar="N",
        help="with --expert-memory: read each next MoE layer's guessed experts (its router on this layer's "
        "input: its top_k, or its N best) on a background thread while this layer computes",
    )
    g.add_argument(
        "--dtype",
        default=None,
        help="weights of the linear maps (experts too unless --expert-dtype): fp32, fp16, bf16, int8, int4 "
        "(int4:32 ... int4:256 names its group size); on PyTorch's CPU kernels (see docs/inference.md)",
    )
    g.add_argument(
        "--expert-dtype",
        default=None,
        help="the experts' weights: a --dtype format, or auto (per expert from routing: busier experts get "
        "more bits, within --expert-bits)",
    )
    g.add_argument(
        "--expert-bits",
        type=float,
        default=6.0,
        help="with --expert-dtype auto: bits per expert weight on average, scales included",
    )
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    g.add_argument(
        "--expert-parallel",
        type=int,
        default=None,
        help="spread the experts over this many processes (under torchrun, or with --nproc); each "
        "computes the experts it holds for every token (the same text as one process)",
    )
    g.add_argument(
        "--nproc",
        type=int,
        default=None,
        help="start this many processes on this machine (torchrun's launcher, inside) for --expert-parallel",
    )
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser(
        "inspect", help="which experts take which tokens: tables, heatmaps, HTML report", formatter_class=_HelpFormatter
    )
    i.add_argument("--run", required=True, help="a run folder with a MoE model")
    i.add_argument("--out", default=None, help="output folder (default: RUN/inspect)")
    i.add_argument(
        "--windows",
        type=int,
        default=64,
        help="validation sequences to route (at most the split's non-overlapping windows)",
    )
    i.add_argument("--top-k-experts", type=int, default=None, help="experts per token (default: as trained)")
    i.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    i.set_defaults(func=cmd_inspect)

    c = sub.add_parser(
        "convert",
        help="turn a torchrun run's sharded checkpoints into one-process files, or quantize a run",
        formatter_class=_HelpFormatter,
        description="Replace each model's sharded checkpoint (checkpoint.dcp, one part per rank, written "
        "under torchrun) by the one-process file checkpoint.safetensors with the same state "
        "(weights, optimizer, RNG, step), on this one process. Not needed to generate, "
        "inspect or resume: those read either format.",
    )
    c.add_argument("--run", required=True, help="a run folder")
    c.add_argument("--keep", action="store_true", help="keep the checkpoint.dcp folder too")
    c.add_argument(
        "--quantize",
        default=None,
        help="instead: write a quantized copy of the run's MoE model (experts in fp16, bf16, int8, int4[:G], "
        "or auto: per expert from routing within --expert-bits) to --out, and report its quality",
    )
    c.add_argument("--dtype", default=None, help="with --quantize: the other linear maps' format too")
    c.add_argument("--expert-bits", type=float, default=6.0, help="with --quantize auto: bits per expert weight")
    c.add_argument(
        "--hf",
        default=None,
        metavar="FAMILY",
        help="instead: write the run's MoE model as a Hugging Face folder of this family (glm4_moe holds "
        "the default model; mixtral, qwen2_moe, qwen3_moe, olmoe where the model fits them) to --out",
    )
    c.add_argument(
        "--out", default=None, help="with --quantize or --hf: the new folder (default: RUN-FORMAT, RUN-FAMILY)"
    )
    c.set_defaults(func=cmd_convert)
    return p


def main(argv: Optional[list] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not _launched():
        return _main(argv)
    _report("pid", os.getpid())  # a process `moekit train --nproc` started: tell it how this one ends
    code = 1  # an exception that escapes: Python's exit status
    try:
        code = _main(argv)
    except SystemExit as err:
        code = err.code if isinstance(err.code, int) else int(err.code is not None)
        raise
    finally:
        _report("exit", code)
    return code


def _main(argv: list) -> int:
    from ._io import os_error_text
    from .parallel import ExpertParallelError
    from .train.checkpoint import CheckpointError, CheckpointWriteError
    from .train.lock import RunLockedError
    from .train.trainer import TrainingDiverged

    args = make_parser().parse_args(argv)
    args.argv = argv  # what `train --nproc` passes on to the processes it starts
    where = f" (rank {_rank()})" if "WORLD_SIZE" in os.environ else ""
    old_format = warnings.formatwarning
    warnings.formatwarning = lambda msg, *a, **k: f"moekit {args.command}: warning: {msg}\n"  # one line, no source
    try:
        return args.func(args)
    except (ExpertParallelError, TrainingDiverged, CheckpointWriteError) as err:  # failures while running
        print(f"moekit {args.command}{where}: error: {err}", file=sys.stderr)
        return 1
    except (CheckpointError, RunLockedError, FileNotFoundError, FileExistsError, NotADirectoryError, ValueError) as err:
        # the errors moekit raises for bad input; anything else (a TypeError, ...) is a bug: its traceback shows
        print(f"moekit {args.command}{where}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # what the machine refused (a read-only or full disk, no permission): not a bug
        print(f"moekit {args.command}{where}: error: {os_error_text(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # outside a training loop (which saves a checkpoint itself)
        if _rank() == 0:
            print(f"\nmoekit {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = old_format
        _close_process_group()


def _close_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
