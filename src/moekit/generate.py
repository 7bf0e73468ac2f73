"""Text generation from a trained run folder."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from .data import BPETokenizer, load_tokenizer
from .train.run import TOKENIZER, load_run_config, sub_runs
from .train.trainer import load_trained


def is_hf_folder(path) -> bool:
    """A Hugging Face checkpoint folder (config.json with a model_type), not a moekit run."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return "model_type" in json.loads(cfg.read_text())
    except json.JSONDecodeError:
        return False


def hf_tokenizer(path) -> "BPETokenizer":
    tok_file = Path(path) / "tokenizer.json"
    if not tok_file.is_file():
        raise FileNotFoundError(f"{path} has no tokenizer.json (moekit reads Hugging Face fast-tokenizer files)")
    return load_tokenizer(tok_file)


def load_run_model(run: str, model: str = "moe", device: str = "cpu"):
    """(model, tokenizer) of a run folder's ``moe`` or ``dense`` sub-run, or of a Hugging Face
    checkpoint folder (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) converted by :mod:`moekit.interop`."""
    run_dir = Path(run)
    if is_hf_folder(run_dir):
        from .interop import load_hf

        return load_hf(str(run_dir)).to(device).eval(), hf_tokenizer(run_dir)
    model_cfg, _, raw = load_run_config(run_dir)
    available = dict(sub_runs(raw, model_cfg))
    if model not in available:
        raise ValueError(f"run {run_dir} has no {model!r} model (it has: {', '.join(available)})")
    tok = load_tokenizer(run_dir / TOKENIZER)
    return load_trained(run_dir / model, available[model], device), tok


def generate_text(run: str, prompt: str, *, max_new_tokens: int = 120, temperature: float = 0.8, top_p: float = 0.95,
                  top_k_experts: Optional[int] = None, seed: int = 0, model: str = "moe", use_cache: bool = True,
                  device: str = "cpu") -> str:
    """Sample a continuation of ``prompt`` (KV cache on by default; temperature 0 = greedy)."""
    net, tok = load_run_model(run, model, device)
    ids = tok.encode(prompt) or [tok.eos_id if tok.eos_id is not None else 0]
    room = net.cfg.max_seq_len - len(ids)
    if room <= 0:
        raise ValueError(f"prompt is {len(ids)} tokens; the model's context is {net.cfg.max_seq_len}")
    gen = torch.Generator(device=device).manual_seed(seed)
    out = net.generate(torch.tensor([ids], device=device), min(max_new_tokens, room), temperature=temperature,
                       top_p=top_p, top_k_experts=top_k_experts, use_cache=use_cache, generator=gen)
    return tok.decode(out[0].tolist())
