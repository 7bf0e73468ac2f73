"""Token streams with a domain label per token, and the batches cut from them.

Shape legend: B batch, S sequence length, N tokens in a stream.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .corpus import DOMAINS, Document, cache_dir, corpus_fingerprint, embedded_corpus, load_text_path, split_documents
from .tokenizer import BPETokenizer, ByteTokenizer, Tokenizer, load_tokenizer


@dataclass
class TokenData:
    """Train and validation streams; ``*_domain_N`` indexes ``domains``."""

    tokenizer: Tokenizer
    domains: list  # domain names, e.g. ["prose", "code"]
    train_ids_N: Tensor  # int64
    train_domain_N: Tensor  # uint8
    val_ids_N: Tensor
    val_domain_N: Tensor
    source: str  # "embedded" or the --data path


def get_tokenizer(kind: str, train_docs: list[Document], vocab_size: int) -> Tokenizer:
    """Bytes, or a BPE trained on the training documents (cached by corpus fingerprint)."""
    if kind == "bytes":
        return ByteTokenizer()
    if kind != "bpe":
        raise ValueError(f"tokenizer must be 'bpe' or 'bytes'; got {kind!r}")
    path = cache_dir("tokenizers") / f"bpe-{corpus_fingerprint(train_docs)}-{vocab_size}.json"
    if path.exists():
        try:
            return load_tokenizer(path)
        except Exception:  # noqa: BLE001 - a broken cache entry is rebuilt
            path.unlink(missing_ok=True)
    tok = BPETokenizer.train((d.text for d in train_docs), vocab_size)
    tok.save(path)
    return tok


def _stream(docs: list[Document], tok: Tokenizer, domains: list) -> tuple[Tensor, Tensor]:
    texts = [d.text for d in docs]
    encoded = tok.encode_batch(texts) if hasattr(tok, "encode_batch") else [tok.encode(t) for t in texts]
    ids, dom = [], []
    for d, e in zip(docs, encoded):
        e = e + ([tok.eos_id] if tok.eos_id is not None else [])
        ids.append(torch.tensor(e, dtype=torch.int64))
        dom.append(torch.full((len(e),), domains.index(d.domain), dtype=torch.uint8))
    return torch.cat(ids), torch.cat(dom)


def build_data(
    data_path: Optional[str] = None,
    tokenizer: str = "bpe",
    vocab_size: int = 4096,
    code_chars: int = 6_000_000,
    tok: Optional[Tokenizer] = None,
) -> TokenData:
    """Load the corpus (embedded, or ``data_path``), split it, tokenize it."""
    docs = load_text_path(data_path) if data_path else embedded_corpus(code_chars)
    train, val = split_documents(docs)
    domains = sorted({d.domain for d in docs}, key=lambda n: (DOMAINS.index(n) if n in DOMAINS else len(DOMAINS), n))
    tok = tok or get_tokenizer(tokenizer, train, vocab_size)
    tr_ids, tr_dom = _stream(train, tok, domains)
    va_ids, va_dom = _stream(val, tok, domains)
    return TokenData(tok, domains, tr_ids, tr_dom, va_ids, va_dom, data_path or "embedded")


def random_batches(
    ids_N: Tensor, seq_len: int, batch_size: int, generator: torch.Generator
) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless (inputs_BS, targets_BS) pairs from random windows of the stream."""
    n = ids_N.numel() - seq_len - 1
    if n <= 0:
        raise ValueError(f"the training stream ({ids_N.numel()} tokens) is shorter than seq_len+1 ({seq_len + 1})")
    while True:
        starts = torch.randint(0, n, (batch_size,), generator=generator)
        yield window(ids_N, starts, seq_len)


def window(ids_N: Tensor, starts_B: Tensor, seq_len: int) -> tuple[Tensor, Tensor]:
    idx_BS = starts_B[:, None] + torch.arange(seq_len + 1)
    chunk = ids_N[idx_BS]
    return chunk[:, :-1], chunk[:, 1:]


def fixed_windows(n_tokens: int, seq_len: int, max_windows: int) -> Tensor:
    """Start offsets of non-overlapping validation windows (the same every time)."""
    starts = torch.arange(0, max(1, n_tokens - seq_len - 1), seq_len)
    if starts.numel() > max_windows:
        starts = starts[torch.linspace(0, starts.numel() - 1, max_windows).long()]
    return starts


def covering_windows(domain_N: Tensor, seq_len: int, max_windows: int) -> tuple[Tensor, Tensor]:
    """(starts_W, extra_W): :func:`fixed_windows`, then, for each domain of the stream whose tokens
    none of those windows predicts, ``max(1, max_windows // domains)`` windows whose first target is
    of that domain, evenly spaced over its tokens (``extra_W`` marks them). The fixed windows give the
    overall validation loss as before; the extra ones give a rare domain (a few short documents
    among long ones) a loss instead of none."""
    starts = fixed_windows(domain_N.numel(), seq_len, max_windows)
    n = domain_N.numel() - seq_len - 1
    if n <= 0:
        return starts, torch.zeros(starts.numel(), dtype=torch.bool)
    covered = set(domain_N[starts[:, None] + torch.arange(1, seq_len + 1)].unique().tolist())
    present = domain_N[1 : n + 1].unique().tolist()  # a window starting at s predicts tokens s+1 .. s+seq_len
    extra = []
    for d in present:
        if d in covered:
            continue
        cand = (domain_N[1 : n + 1] == d).nonzero().flatten()
        share = min(cand.numel(), max(1, max_windows // len(present)))
        extra.append(cand[torch.linspace(0, cand.numel() - 1, share).long()].unique())
    if not extra:
        return starts, torch.zeros(starts.numel(), dtype=torch.bool)
    more = torch.cat(extra)
    mask = torch.cat([torch.zeros(starts.numel(), dtype=torch.bool), torch.ones(more.numel(), dtype=torch.bool)])
    return torch.cat([starts, more]), mask


def balanced_windows(domain_N: Tensor, seq_len: int, windows: int) -> Tensor:
    """Start offsets of ``windows`` windows split evenly over the domains (by the domain of each
    window's first token), evenly spaced inside each domain: a rare domain (prose in the default
    corpus) is measured as well as a common one. Falls back to :func:`fixed_windows` for one domain."""
    n = domain_N.numel() - seq_len - 1
    if n <= 0:
        return fixed_windows(domain_N.numel(), seq_len, windows)
    present = [d for d in domain_N[:n].unique().tolist()]
    if len(present) <= 1:
        return fixed_windows(domain_N.numel(), seq_len, windows)
    starts = []
    for i, d in enumerate(present):
        share = windows // len(present) + (1 if i < windows % len(present) else 0)
        cand = (domain_N[:n] == d).nonzero().flatten()
        if share and cand.numel():
            starts.append(cand[torch.linspace(0, cand.numel() - 1, share).long()])
    return torch.cat(starts).sort().values
