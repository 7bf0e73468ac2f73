"""Batch-1 decoding split between threads (moekit.kernels.threads): the same values as one thread,
work done on more than one thread, no deadlock when a split share would split again."""

import threading

import pytest
import torch

from moekit import MoEConfig
from moekit.config import LMConfig
from moekit.kernels import native, threads
from moekit.kernels.lowbit import LowBitWeight
from moekit.models import KVCache, MoETransformer
from moekit.quantize import quantize_model


def test_split_sum_adds_every_term_once_and_uses_the_other_thread():
    terms = [torch.randn(1, 64, dtype=torch.float64) for _ in range(7)]
    seen: list[str] = []

    def run(j: int, acc: torch.Tensor) -> None:
        seen.append(threading.current_thread().name)
        acc.add_(terms[j], alpha=j + 1)

    out = torch.ones(1, 64, dtype=torch.float64)
    with threads.decode_threads(2) as n:
        threads.split_sum(list(range(7)), run, out)
    want = 1 + sum((j + 1) * t for j, t in enumerate(terms))
    assert n == 2 and len(seen) == 7
    assert any(s.startswith("moekit-decode") for s in seen) and threading.main_thread().name in seen
    torch.testing.assert_close(out, want)
    out1 = torch.ones(1, 64, dtype=torch.float64)
    seen.clear()
    threads.split_sum(list(range(7)), run, out1)  # outside the block: all in this thread
    assert set(seen) == {threading.main_thread().name}
    torch.testing.assert_close(out1, want)


@pytest.mark.parametrize("fmt", ["fp32", "fp16", "int8", "int4"])
def test_a_weight_split_by_rows_equals_the_whole(fmt):
    """Every format's rows split between threads (int4's in its packed layout's blocks of 64; the
    formats moekit's native kernels compute split inside them, on the block's threads)."""
    w = LowBitWeight.quantize(torch.randn(640, 2048), fmt)  # int4: 640 KiB, past MIN_SPLIT_BYTES
    x = torch.randn(1, 2048)
    whole = w.linear(x)
    with threads.decode_threads(3):
        split = w.linear(x)
        assert len(w._parts) == (0 if native.handles(fmt, x, w.data) else 3)  # 640 rows: 256, 256, 128
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-5)


def test_a_split_inside_a_split_runs_in_its_share_without_deadlock():
    """An expert's linear map inside a dealt-out expert sum: the share does not split again (it
    waited on the pool's only worker, itself waiting, before)."""
    w = LowBitWeight.quantize(torch.randn(1024, 512), "fp32")
    x = torch.randn(1, 512)
    out = torch.zeros(1, 1024)
    done = threading.Event()

    def decode():
        with threads.decode_threads(2):
            threads.split_sum([0, 1, 2, 3], lambda j, acc: acc.add_(w.linear(x)), out)
        done.set()

    threading.Thread(target=decode, daemon=True).start()
    assert done.wait(30), "a nested split deadlocked"
    torch.testing.assert_close(out, 4 * w.linear(x))


def _lm(seed: int = 0) -> MoETransformer:
    torch.manual_seed(seed)
    moe = MoEConfig(dim=256, hidden_dim=256, num_experts=8, top_k=4)
    cfg = LMConfig(vocab_size=1024, dim=256, n_layers=2, n_heads=4, max_seq_len=64, moe=moe)
    return MoETransformer(cfg).eval()


@pytest.mark.parametrize("quantized", [False, True])
def test_decoding_split_between_threads_gives_one_threads_logits(quantized):
    """A model whose head (1 MiB) and attention (768 KiB) split by rows and whose experts are dealt
    out: one-token steps give one thread's logits to rounding, and generate() the same tokens."""
    m = _lm()
    if quantized:
        quantize_model(m, "int8", rest="fp32")
    idx = torch.randint(0, 1024, (1, 6))
    logits = {}
    for n in (1, 2):
        cache = KVCache.empty(m.cfg, 1, "cpu", torch.float32)
        with torch.no_grad():
            m(idx[:, :-1], cache=cache)
            with threads.decode_threads(n) as used:
                assert used == n
                logits[n] = m(idx[:, -1:], cache=cache).logits
    torch.testing.assert_close(logits[2], logits[1], rtol=1e-5, atol=1e-5)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = m.generate(idx, 12, temperature=0.0)
        torch.set_num_threads(2)
        assert threads.splits(m)
        two = m.generate(idx, 12, temperature=0.0)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_only_float32_models_split_and_the_threads_are_restored():
    m = _lm()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert threads.splits(m)
        quantize_model(m, "fp16", rest="fp16")  # fp16 GEMVs use torch's intra-op threads
        assert not threads.splits(m)
        with threads.decode_threads() as n:
            assert n == 2 and torch.get_num_threads() == 1 and threads.active() == 2
        assert torch.get_num_threads() == 2 and threads.active() == 1
        torch.set_num_threads(1)
        assert not threads.splits(_lm())
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="threads must be >= 1"):
        with threads.decode_threads(0):
            pass
