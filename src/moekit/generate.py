"""Text generation from a trained run folder."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch

from .data import load_tokenizer
from .interop import load_hf
from .interop.folders import hf_tokenizer, is_hf_folder
from .models.lm import MoETransformer
from .runs import TOKENIZER, load_run_config, sub_runs
from .train.trainer import checkpoint_step, find_checkpoint, load_trained


def load_run_model(
    run: str,
    model: str = "moe",
    device: str = "cpu",
    *,
    top_k_experts: Optional[int] = None,
    expert_memory: Optional[int] = None,
    expert_policy: str = "lfru",
    prefetch: Union[bool, int] = False,
    expert_dtype: Optional[str] = None,
):
    """(model, tokenizer) of a run folder's ``moe`` or ``dense`` sub-run, or of a Hugging Face
    checkpoint folder (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) converted by :mod:`moekit.interop`.
    ``top_k_experts`` (experts per token the caller will ask for) is refused for a model without
    MoE layers, before its weights are read. ``expert_memory`` (bytes): the experts stay in the
    checkpoint file and come into a pool of that size as routing asks (:mod:`moekit.store`);
    ``prefetch``: each next layer's guessed experts are read while the current one computes;
    ``expert_dtype`` (fp32, fp16, bf16): the store's slots in that dtype, (out, in) layout."""
    run_dir = Path(run)
    if expert_memory is not None:
        args = (run_dir, model, device, top_k_experts, expert_memory, expert_policy, prefetch, expert_dtype)
        return _load_with_store(*args)
    if prefetch:
        raise ValueError("prefetch reads experts into an expert store: give expert_memory (--expert-memory) too")
    if is_hf_folder(run_dir):
        net = load_hf(str(run_dir))
        _check_top_k_experts(net.cfg.moe, top_k_experts, f"the model in {run_dir}")
        return net.to(device).eval(), hf_tokenizer(run_dir)
    model_cfg, _, raw = load_run_config(run_dir)
    available = dict(sub_runs(raw, model_cfg))
    if model not in available:
        raise ValueError(f"run {run_dir} has no {model!r} model (it has: {', '.join(available)})")
    _check_top_k_experts(available[model].moe, top_k_experts, f"the {model} model of {run_dir}")
    tok = load_tokenizer(run_dir / TOKENIZER)
    return load_trained(run_dir / model, available[model], device), tok


def _load_with_store(
    run_dir: Path,
    model: str,
    device: str,
    top_k_experts,
    expert_memory: int,
    policy: str,
    prefetch: Union[bool, int],
    fmt: Optional[str] = None,
):
    from .store import load_run_with_store

    if torch.device(device).type != "cpu":
        raise ValueError(f"--expert-memory keeps experts in host memory for now: use --device cpu (got {device!r})")
    if is_hf_folder(run_dir):
        net = load_hf(
            str(run_dir), expert_memory=expert_memory, expert_policy=policy, prefetch=prefetch, expert_dtype=fmt
        )
        _check_top_k_experts(net.cfg.moe, top_k_experts, f"the model in {run_dir}")
        return net, hf_tokenizer(run_dir)
    cfg, path = _moe_sub_run(run_dir, model, "--expert-memory", "no experts to keep on disk", top_k_experts)
    return load_run_with_store(path, cfg, expert_memory, policy, prefetch, fmt), load_tokenizer(run_dir / TOKENIZER)


def _moe_sub_run(run_dir: Path, model: str, flag: str, need: str, top_k_experts: Optional[int] = None):
    """(config, checkpoint path) of a run's ``model`` sub-run, which ``flag`` needs experts of
    (a missing sub-run, a dense model or a missing checkpoint is an error naming it)."""
    model_cfg, _, raw = load_run_config(run_dir)
    available = dict(sub_runs(raw, model_cfg))
    if model not in available:
        raise ValueError(f"run {run_dir} has no {model!r} model (it has: {', '.join(available)})")
    cfg = available[model]
    _check_top_k_experts(cfg.moe, top_k_experts, f"the {model} model of {run_dir}")
    if cfg.moe is None:
        raise ValueError(f"{flag}: the {model} model of {run_dir} is dense ({need})")
    path = find_checkpoint(run_dir / model)
    if path is None:
        raise FileNotFoundError(f"run {run_dir} has no checkpoint for its {model!r} model")
    return cfg, path


def load_expert_parallel(run: str, model: str, expert_parallel: int, device: str = "cpu"):
    """(model, tokenizer) of a run's sub-run on this process's share of an expert-parallel layout
    (under torchrun: every process calls it): built on the meta device, its experts sharded over
    ``expert_parallel`` ranks (:func:`moekit.parallel.apply_expert_parallel`), materialised and
    read from the run's checkpoint (one file or a sharded DCP folder), in eval mode. Every rank then
    decodes the same tokens, the experts computed where they live (GShard's all-to-all)."""
    from .parallel import apply_expert_parallel, init_distributed
    from .train.checkpoint import load_checkpoint
    from .train.distcp import load_distributed

    run_dir = Path(run)
    if is_hf_folder(run_dir):
        raise ValueError("--expert-parallel reads moekit runs; load a Hugging Face folder in one process")
    cfg, path = _moe_sub_run(run_dir, model, "--expert-parallel", "no experts to spread")
    init_distributed(device)
    with torch.device("meta"):
        net = MoETransformer(cfg)
    handle = apply_expert_parallel(net, expert_parallel=expert_parallel, sync_init=False)
    net.materialize_(device)
    if path.is_dir():
        load_distributed(path, net, None, handle, rng=False)
    else:
        load_checkpoint(path, net, parallel=handle)
    return net.eval(), load_tokenizer(run_dir / TOKENIZER)


def _check_top_k_experts(moe, top_k_experts: Optional[int], which: str) -> None:
    if top_k_experts is not None and moe is None:
        raise ValueError(
            f"--top-k-experts {top_k_experts}: {which} is dense (no MoE layers, no experts to choose); leave it out"
        )


def run_progress(run: str, model: str = "moe") -> Optional[tuple[int, int]]:
    """(step of the checkpoint, steps the run was configured for) of a run folder's sub-run, read
    without loading a tensor; None for a Hugging Face folder or when the step is unknown."""
    run_dir = Path(run)
    if is_hf_folder(run_dir):
        return None
    _, train_cfg, _ = load_run_config(run_dir)
    path = find_checkpoint(run_dir / model)
    step = checkpoint_step(path) if path is not None else None
    return None if step is None else (step, train_cfg.steps)


@dataclass(frozen=True)
class GenerationStats:
    """How long one :func:`generate_text` call took to decode (model loading and tokenizing excluded)."""

    new_tokens: int  # tokens generated after the prompt
    seconds: float  # wall time of the decoding loop (device synchronised on CUDA)
    use_cache: bool  # whether the KV cache was on
    prompt_tokens: int
    expert_store: Optional[str] = None  # the expert store's budget and counts, when there is one
    precision: Optional[str] = None  # the low-bit formats (moekit.quantize), when asked for

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("nan")

    def line(self) -> str:
        """``120 tokens in 0.85 s (141 tokens/s, KV cache on)``."""
        rate = f"{self.tokens_per_s:.0f} tokens/s" if self.new_tokens and self.seconds > 0 else "no tokens"
        return (
            f"{self.new_tokens} token{'s' if self.new_tokens != 1 else ''} in {self.seconds:.2f} s "
            f"({rate}, KV cache {'on' if self.use_cache else 'off'})"
            + (f"; {self.precision}" if self.precision else "")
            + (f"; {self.expert_store}" if self.expert_store else "")
        )


def generate_text(
    run: str,
    prompt: str,
    *,
    max_new_tokens: int = 120,
    temperature: float = 0.8,
    top_p: float = 0.95,
    top_k_experts: Optional[int] = None,
    seed: int = 0,
    model: str = "moe",
    use_cache: bool = True,
    device: str = "cpu",
    on_stats: Optional[Callable[[GenerationStats], None]] = None,
    compile: bool = False,
    expert_memory: Optional[int] = None,
    expert_policy: str = "lfru",
    prefetch: Union[bool, int] = False,
    dtype: Optional[str] = None,
    expert_dtype: Optional[str] = None,
    expert_bits: float = 6.0,
    threads: Optional[int] = None,
    expert_parallel: Optional[int] = None,
) -> str:
    """Sample a continuation of ``prompt`` (KV cache on by default; temperature 0 = greedy).

    ``on_stats``, when given, is called once with the decoding loop's :class:`GenerationStats`
    before the text is returned. ``expert_memory``: see :func:`load_run_model`. ``dtype``: a
    format (:data:`moekit.kernels.lowbit.FORMATS`) for the linear maps, experts included unless
    ``expert_dtype`` names theirs (a format, or ``auto``: chosen per expert from routing within
    ``expert_bits`` per weight on average); see :func:`moekit.quantize.quantize_model`. With
    ``compile``, ``dtype`` fp32 casts nothing (inductor's loops read the float experts); fp16,
    bf16, int8 and any ``expert_dtype`` quantize as without it and compile around moekit's native
    CPU kernels (without them fp16 / bf16 cast the whole model: :func:`cast_when_compiled`; int4
    and ``auto`` decode eagerly; benchmarks/RESULTS.md).
    ``threads``: torch's intra-op threads. ``expert_parallel``: this process is one of that many
    (torchrun) holding the experts between them (:func:`load_expert_parallel`); every one returns
    the same text."""
    check_precision(dtype, expert_dtype, expert_bits, expert_memory, compile, device)
    if expert_parallel is not None:
        check_expert_parallel_decoding(expert_memory, dtype, expert_dtype, compile)
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1; got {threads}")
        torch.set_num_threads(threads)
    if expert_parallel is not None:
        net, tok = load_expert_parallel(run, model, expert_parallel, device)
    else:
        net, tok = load_run_model(
            run,
            model,
            device,
            top_k_experts=top_k_experts,
            expert_memory=expert_memory,
            expert_policy=expert_policy,
            prefetch=prefetch,
            expert_dtype=expert_dtype if expert_memory is not None else None,
        )
    precision = None
    if compile and expert_dtype is None and cast_when_compiled(dtype):
        net.to(CAST_DTYPES[str(dtype)])
        precision = f"{dtype} (the whole model cast, compiled)"
    elif dtype is not None or expert_dtype is not None:
        from .quantize import quantize_model

        experts = (expert_dtype or dtype) if net.cfg.moe is not None and expert_memory is None else None
        if experts is None and expert_dtype is not None:
            raise ValueError(f"--expert-dtype {expert_dtype}: the {model} model of {run} is dense (no experts)")
        rest = None if dtype in (None, "fp32") else dtype
        precision = quantize_model(net, experts, rest=rest, bits=expert_bits).line() or None
    elif net.cfg.moe is not None and expert_memory is None:
        from .quantize import describe

        precision = describe(net)  # a quantized run's own formats
    ids = tok.encode(prompt) or [tok.eos_id if tok.eos_id is not None else 0]
    room = net.cfg.max_seq_len - len(ids)
    if room <= 0:
        raise ValueError(f"prompt is {len(ids)} tokens; the model's context is {net.cfg.max_seq_len}")
    gen = torch.Generator(device=device).manual_seed(seed)
    idx = torch.tensor([ids], device=device)
    _sync(idx.device)
    t0 = time.perf_counter()
    out = net.generate(
        idx,
        min(max_new_tokens, room),
        temperature=temperature,
        top_p=top_p,
        top_k_experts=top_k_experts,
        use_cache=use_cache,
        generator=gen,
        compile=compile,
    )
    _sync(idx.device)
    seconds = time.perf_counter() - t0
    if on_stats is not None:
        store = _store_line(net) if expert_memory is not None else None
        on_stats(GenerationStats(out.shape[1] - len(ids), seconds, use_cache, len(ids), store, precision))
    if getattr(net, "prefetcher", None) is not None:
        net.prefetcher.close()
    return tok.decode(out[0].tolist())


CAST_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # --dtype with --compile


def cast_when_compiled(dtype: Optional[str]) -> bool:
    """Whether compiled decoding at ``dtype`` casts the whole model (inductor's loops over the
    stacked experts): fp32 always; fp16 / bf16 only without moekit's native kernels, whose 16-bit
    weights with float32 rows decode faster compiled (1.06-1.19x at 1 thread, 0.93-1.09x at 2,
    and nearer fp32's tokens: benchmarks/RESULTS.md, "Native decode kernels")."""
    from .kernels import native

    return dtype in CAST_DTYPES and (dtype == "fp32" or not native.available())


def check_precision(
    dtype: Optional[str],
    expert_dtype: Optional[str],
    expert_bits: float,
    expert_memory: Optional[int],
    compile: bool,
    device: str,
    names: tuple[str, str, str] = ("dtype", "expert_dtype", "expert_bits"),
) -> None:
    """ValueError naming the argument for a precision request moekit cannot serve, before loading."""
    from .kernels.lowbit import check_format

    if dtype is not None:
        check_format(dtype, names[0])
    if expert_dtype is not None and expert_dtype != "auto":
        check_format(expert_dtype, names[1])
    if not 1.0 <= expert_bits <= 32.0:
        raise ValueError(f"{names[2]} must be in [1, 32] bits per weight; got {expert_bits}")
    if dtype is None and expert_dtype is None:
        return
    if torch.device(device).type != "cpu":
        raise ValueError(f"{names[0]} / {names[1]}: the low-bit kernels are PyTorch's CPU ones; got device {device!r}")
    if compile and (expert_dtype is not None or dtype not in CAST_DTYPES):
        from .kernels import native
        from .kernels.lowbit import parse_format

        given = [f for f in (dtype, expert_dtype) if f is not None]
        if not native.available() or any(f == "auto" or parse_format(f)[0] not in native.FORMATS for f in given):
            raise ValueError(
                f"{names[0]} / {names[1]} {' / '.join(given)} decode eagerly: leave out compile (compiled "
                f"decoding takes formats moekit's native CPU kernels compute, {', '.join(native.FORMATS)}"
                + ("" if native.available() else ", and those are not built here: no C compiler")
                + ")"
            )


def check_expert_parallel_decoding(expert_memory, dtype, expert_dtype, compile: bool) -> None:
    """ValueError naming what expert-parallel decoding does not combine with (before loading)."""
    for given, name in ((expert_memory, "--expert-memory"), (dtype, "--dtype"), (expert_dtype, "--expert-dtype")):
        if given is not None:
            raise ValueError(f"--expert-parallel decodes the run's float experts where they live: leave out {name}")
    if compile:
        raise ValueError("--expert-parallel decodes eagerly (torch.compile under expert parallelism is not there yet)")


def _store_line(net) -> str:
    """The expert store's budget and what it did (prompt and decoding together)."""
    from .store import StoredExperts, expert_pools, prefetch_stats, store_stats

    pools = expert_pools(net)
    layers = [m for m in net.modules() if isinstance(m, StoredExperts)]
    held = sum(p.nbytes for p in pools)
    total = sum(m.num_experts for m in layers)
    s = store_stats(net)
    line = (
        f"expert memory {held / 2**20:.1f} MiB ({sum(p.slots for p in pools)} of {total} experts, "
        f"{len(layers)} layers sharing the slots, {pools[0].policy.name}"
        + (f", {pools[0].fmt} slots" if pools[0].fmt else "")
        + f"): hit rate {s.hit_rate:.1%}, "
        f"{s.misses} experts read on demand, "
        f"{s.bytes_read / 2**20:.1f} MiB read in all in {s.read_s:.2f} s"
    )
    if getattr(net, "prefetcher", None) is not None:
        p = prefetch_stats(net)
        line += f"; prefetch recall {p.recall:.1%}, precision {p.precision:.1%}"
    return line


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
