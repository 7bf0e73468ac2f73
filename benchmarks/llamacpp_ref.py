"""llama.cpp reference for moekit's batch-1 greedy decode benchmark (a reference only, never a dependency).

Measures llama.cpp (through llama-cpp-python) decoding a Hugging Face OLMoE folder converted to GGUF,
one token at a time, greedy, so moekit's own decode numbers have a side-by-side baseline.

Modes (three interpreters are involved; none of this touches moekit's own environment's packages):

1. ``--make-hf DIR`` (moekit's venv): the seed-0 OLMoE-shaped model ``olmoe8`` (width 1024, 8 layers,
   16 heads, 64 SwiGLU experts of hidden 512, top-8, vocab 4096, max_seq_len 512, OLMoE's layout:
   softmax top-k router without renormalisation, full-width q/k RMSNorm, untied embeddings) exported
   with ``moekit.interop.export_hf(model, DIR, "olmoe")``, plus a tokenizer (export_hf writes none and
   the converter needs one): a byte-level BPE (GPT-NeoX style: ``<|endoftext|>`` = 0,
   ``<|padding|>`` = 1, GPT-2 byte-level pre-tokenizer) trained with ``tokenizers`` on the Python
   stdlib's ``*.py`` files up to ``vocab_size`` entries. Its quality does not matter: both engines are
   fed token ids directly.
2. ``--convert HF --out DIR --types f32,f16,q8_0`` (any python; the converter runs under
   ``--converter-python``, default moekit's venv, which has torch, numpy, safetensors, transformers):
   llama.cpp's ``convert_hf_to_gguf.py`` writes ``DIR/<name>-F32.gguf`` etc. The converter identifies
   a BPE pre-tokenizer by hashing the ids of a fixed test string and refuses an unknown hash (our
   tokenizer's); this mode runs it with ``TextModel.get_vocab_base_pre`` wrapped to answer
   ``--tokenizer-pre`` (default ``olmo``, OLMoE's own, GPT-2's regex) when the hash is unknown.
   The pre-tokenizer only affects text tokenisation, never decoding given ids. A GLM-4-MoE folder
   (``moekit convert --run RUN --hf glm4_moe``: the default ``moekit train`` model, with its run's
   tokenizer) converts too: llama.cpp's GLM vocabulary writer looks up GLM's own chat tokens, which
   a moekit run's byte-level BPE lacks, so this mode writes it as the plain GPT-2 BPE it is instead.
3. ``--gguf PATH --threads N --new-tokens N --prompt-ids 1,2,...`` (the llama-cpp-python venv): load
   (n_ctx = n_batch = ``--n-ctx``, default 512, mmap, n_threads = n_threads_batch = N, logits of the last token only),
   evaluate all but the last prompt id (untimed), then N decode steps: each evaluates one token (the
   last prompt id first, then the previous step's pick) and takes the argmax of its logits. The
   first ``--warmup`` steps (default 2) are untimed; ``tok_s = (N - warmup) / time of the rest``
   (with ``--rounds R``: the N steps R times from the prefilled prompt, the median time).
   Prints one JSON line: engine, gguf, type, threads, tok_s, tokens (the N greedy ids), peak_rss
   (bytes, ``getrusage`` ru_maxrss), plus load_s, prompt_s, warmup, rounds.

How the pieces were obtained (llama-cpp-python 0.3.36, which vendors llama.cpp; CPU build)::

    python3 -m venv /tmp/llama-venv
    CMAKE_ARGS="-DGGML_NATIVE=ON" /tmp/llama-venv/bin/pip install llama-cpp-python   # compiles llama.cpp
    /tmp/llama-venv/bin/pip download --no-binary :all: --no-deps llama-cpp-python -d /tmp/llama-src
    tar xzf /tmp/llama-src/llama_cpp_python-0.3.36.tar.gz -C /tmp/llama-src
    # converter: /tmp/llama-src/llama_cpp_python-0.3.36/vendor/llama.cpp/convert_hf_to_gguf.py
    # (it puts the vendored gguf-py next to it on sys.path itself; nothing else to install)

    .venv/bin/python benchmarks/llamacpp_ref.py --make-hf /tmp/decode-olmoe8-hf
    .venv/bin/python benchmarks/llamacpp_ref.py --convert /tmp/decode-olmoe8-hf \\
        --out /tmp/decode-olmoe8-gguf --types f32,f16,q8_0
    /tmp/llama-venv/bin/python benchmarks/llamacpp_ref.py --gguf /tmp/decode-olmoe8-gguf/decode-olmoe8-F32.gguf \\
        --threads 1 --new-tokens 64 --prompt-ids 1,2,3,4,5,6,7,8

    # the default trained model (a run of `moekit train` with no arguments, in runs/default):
    moekit convert --run runs/default --hf glm4_moe --out /tmp/default-glm-hf
    .venv/bin/python benchmarks/llamacpp_ref.py --convert /tmp/default-glm-hf --out /tmp/default-glm-gguf --types f32
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import runpy
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

DEFAULT_CONVERTER = "/tmp/llama-src/llama_cpp_python-0.3.36/vendor/llama.cpp/convert_hf_to_gguf.py"
DEFAULT_CONVERTER_PYTHON = str(Path(__file__).resolve().parents[1] / ".venv" / "bin" / "python")
FILE_TYPES = {0: "F32", 1: "F16", 7: "Q8_0", 32: "BF16"}  # GGUF general.file_type (llama_ftype)
SPECIALS = ["<|endoftext|>", "<|padding|>"]


# ------------------------------------------------------------------------------------ --make-hf
def olmoe8_config():
    """moekit's ``olmoe8`` shape in a layout ``export_hf(..., "olmoe")`` accepts."""
    from moekit.config import LMConfig, MoEConfig

    moe = MoEConfig(
        dim=1024,
        hidden_dim=512,
        num_experts=64,
        top_k=8,
        expert="swiglu",
        router="topk",
        renormalize=False,  # OLMoE: norm_topk_prob false
    )
    return LMConfig(
        vocab_size=4096,
        dim=1024,
        n_layers=8,
        n_heads=16,
        max_seq_len=512,
        moe=moe,
        qk_norm="full",
        tie_embeddings=False,
        norm_eps=1e-5,  # the converter writes OLMoE's 1e-5 regardless
    )


def make_tokenizer(path: Path, vocab_size: int, max_bytes: int = 16 << 20) -> int:
    """Train a byte-level BPE of at most ``vocab_size`` entries on stdlib sources; write
    tokenizer.json and tokenizer_config.json under ``path``; return its size."""
    import sysconfig

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))

    def texts():
        n = 0
        for f in files:
            t = f.read_text(encoding="utf-8", errors="replace")
            n += len(t)
            yield t
            if n >= max_bytes:
                return

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts(), trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIALS[0], pad_token=SPECIALS[1])
    hf.save_pretrained(str(path))
    size = tok.get_vocab_size()
    assert size <= vocab_size, size  # the converter pads missing ids up to the model's vocab_size
    return size


def make_hf(path: Path, seed: int = 0) -> None:
    """Build the seed-``seed`` olmoe8 model, export it as an OLMoE transformers folder with a tokenizer."""
    import torch

    from moekit.interop import export_hf
    from moekit.models.lm import MoETransformer

    cfg = olmoe8_config()
    torch.manual_seed(seed)
    model = MoETransformer(cfg)
    export_hf(model, path, "olmoe")
    n = make_tokenizer(path, cfg.vocab_size)
    # export_hf keeps OlmoeConfig's default eos_token_id (50279, OLMoE's real tokenizer), outside a
    # 4096 vocabulary: point it at this tokenizer's <|endoftext|> (decoding here never stops on eos)
    cfg_path = path / "config.json"
    hf_cfg = json.loads(cfg_path.read_text())
    if not 0 <= (hf_cfg.get("eos_token_id") or 0) < cfg.vocab_size:
        hf_cfg["eos_token_id"] = 0
        cfg_path.write_text(json.dumps(hf_cfg, indent=2) + "\n")
    print(json.dumps({"hf": str(path), "vocab_size": cfg.vocab_size, "tokenizer_entries": n}))


# ------------------------------------------------------------------------------------ --convert
def run_converter(converter: str, tokenizer_pre: str, argv: list[str]) -> None:
    """Run convert_hf_to_gguf.py in this process, accepting an unknown BPE pre-tokenizer hash."""
    sys.path.insert(0, str(Path(converter).parent))
    from conversion import base  # the converter's package (llama.cpp >= the split into conversion/)

    original = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            print(
                f"llamacpp_ref: unknown pre-tokenizer hash, writing tokenizer.ggml.pre={tokenizer_pre!r}",
                file=sys.stderr,
            )
            return tokenizer_pre

    original_glm = base.TextModel._set_vocab_glm

    def set_vocab_glm(self) -> None:
        # GLM's vocabulary writer looks up GLM's own chat tokens ([gMASK], <|user|>, ...); a moekit
        # run's tokenizer (a byte-level BPE with <|eos|>) has none: write it as the plain GPT-2 BPE it is
        try:
            original_glm(self)
        except KeyError as err:
            print(f"llamacpp_ref: no GLM special token {err}, writing a plain byte-level BPE", file=sys.stderr)
            for key in [k for kv in self.gguf_writer.kv_data for k in kv if k.startswith("tokenizer.")]:
                self.gguf_writer.remove_key(key)  # what the failed call had written already
            self._set_vocab_gpt2()

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    base.TextModel._set_vocab_glm = set_vocab_glm
    sys.argv = [converter, *argv]
    runpy.run_path(converter, run_name="__main__")


def convert(hf: Path, out: Path, types: list[str], converter: str, python: str, tokenizer_pre: str) -> list[Path]:
    """Convert ``hf`` to one GGUF per type in ``out`` (a subprocess per type under ``python``)."""
    out.mkdir(parents=True, exist_ok=True)
    name = hf.resolve().name.removesuffix("-hf")
    paths = []
    for t in types:
        dst = out / f"{name}-{t.upper()}.gguf"
        cmd = [
            python,
            str(Path(__file__).resolve()),
            "--_run-converter",
            converter,
            "--tokenizer-pre",
            tokenizer_pre,
            "--",
            str(hf),
            "--outtype",
            t,
            "--outfile",
            str(dst),
        ]
        subprocess.run(cmd, check=True)
        paths.append(dst)
        print(json.dumps({"gguf": str(dst), "bytes": dst.stat().st_size}), flush=True)
    return paths


# ------------------------------------------------------------------------------------ --gguf (decode)
def decode(
    gguf: str, threads: int, new_tokens: int, prompt_ids: list[int], warmup: int, rounds: int = 1, n_ctx: int = 512
) -> dict:
    """Greedy batch-1 decode with llama.cpp; the measurement as a dict (see the module docstring)."""
    import llama_cpp
    import numpy as np

    if len(prompt_ids) < 1 or not 0 <= warmup < new_tokens or rounds < 1:
        raise ValueError("need at least one prompt id, 0 <= warmup < new_tokens and rounds >= 1")
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=gguf,
        n_ctx=n_ctx,
        n_batch=n_ctx,
        n_threads=threads,
        n_threads_batch=threads,
        use_mmap=True,
        logits_all=False,
        verbose=False,
    )
    load_s = time.perf_counter() - t0
    if len(prompt_ids) + new_tokens > llm.n_ctx():
        raise ValueError(f"prompt + new tokens exceed n_ctx={llm.n_ctx()}")
    n_vocab = llm.n_vocab()

    def step(ids: list[int]) -> int:
        llm.eval(ids)
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
        return int(np.argmax(logits))

    t0 = time.perf_counter()
    if len(prompt_ids) > 1:
        llm.eval(prompt_ids[:-1])
    prompt_s = time.perf_counter() - t0
    times: list[float] = []
    runs: list[list[int]] = []
    for _ in range(rounds):
        llm.n_tokens = len(prompt_ids) - 1  # back to the prefilled prompt (eval drops the KV cells past it)
        tokens: list[int] = []
        last = prompt_ids[-1]
        for _ in range(warmup):
            last = step([last])
            tokens.append(last)
        t0 = time.perf_counter()
        for _ in range(new_tokens - warmup):
            last = step([last])
            tokens.append(last)
        times.append(time.perf_counter() - t0)
        runs.append(tokens)
    if any(r != runs[0] for r in runs):
        raise RuntimeError("greedy tokens differ between rounds")
    secs = statistics.median(times)
    ftype = FILE_TYPES.get(int(llm.metadata.get("general.file_type", -1)), llm.metadata.get("general.file_type"))
    return {
        "engine": "llama.cpp",
        "gguf": gguf,
        "type": ftype,
        "threads": threads,
        "tok_s": (new_tokens - warmup) / secs,
        "tokens": tokens,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "load_s": load_s,
        "prompt_s": prompt_s,
        "warmup": warmup,
        "rounds": rounds,
        "llama_cpp_python": llama_cpp.__version__,
    }


def main(argv: Optional[list[str]] = None) -> None:
    """Command line (see the module docstring)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--_run-converter":  # internal: the converter, in the converter's interpreter
        sep = argv.index("--")
        converter, tokenizer_pre = argv[1], argv[argv.index("--tokenizer-pre") + 1]
        run_converter(converter, tokenizer_pre, argv[sep + 1 :])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--gguf", help="decode-benchmark this GGUF file")
    mode.add_argument("--convert", metavar="HF_FOLDER", help="convert a transformers folder to GGUF")
    mode.add_argument("--make-hf", metavar="DIR", help="write the seed-0 olmoe8 OLMoE folder (moekit's venv)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-ids", default="1,2,3,4,5,6,7,8", help="comma-separated token ids")
    p.add_argument("--warmup", type=int, default=2, help="untimed first decode steps (their tokens are kept)")
    p.add_argument("--rounds", type=int, default=1, help="decode the new tokens this many times; median time")
    p.add_argument("--n-ctx", type=int, default=512, help="--gguf: the context (KV cache cells); at most the model's")
    p.add_argument("--out", help="--convert: output folder")
    p.add_argument("--types", default="f32,f16,q8_0", help="--convert: comma-separated --outtype values")
    p.add_argument("--converter", default=os.environ.get("LLAMACPP_CONVERTER", DEFAULT_CONVERTER))
    p.add_argument(
        "--converter-python",
        default=DEFAULT_CONVERTER_PYTHON,
        help="interpreter with torch, numpy, safetensors, transformers for the converter",
    )
    p.add_argument("--tokenizer-pre", default="olmo", help="tokenizer.ggml.pre written for an unknown hash")
    a = p.parse_args(argv)
    if a.make_hf:
        make_hf(Path(a.make_hf))
    elif a.convert:
        if not a.out:
            p.error("--convert needs --out")
        convert(Path(a.convert), Path(a.out), a.types.split(","), a.converter, a.converter_python, a.tokenizer_pre)
    else:
        ids = [int(x) for x in a.prompt_ids.split(",") if x.strip()]
        print(json.dumps(decode(a.gguf, a.threads, a.new_tokens, ids, a.warmup, a.rounds, a.n_ctx)), flush=True)


if __name__ == "__main__":
    main()
