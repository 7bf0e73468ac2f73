"""The expert store against the all-in-memory model: same logits bit for bit (fp32 and bf16) and
same greedy tokens at budgets from one layer's top_k to every expert; the budget holds by
construction; policies against Belady's optimum on traces; bad input is one clear error."""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch

from moekit.config import LMConfig, MoEConfig
from moekit.models.lm import MoETransformer
from moekit.store import (
    LFRU,
    LFU,
    LRU,
    SafetensorsFiles,
    StoredExperts,
    StoreFileError,
    belady,
    expert_pools,
    load_run_with_store,
    parse_bytes,
    plan_budget,
    pool_trace,
    record_traces,
    replay,
    store_stats,
)
from moekit.train.checkpoint import load_checkpoint, save_checkpoint


def lm_cfg(**moe_kw) -> LMConfig:
    moe = dict(dim=32, hidden_dim=16, num_experts=8, top_k=2, num_shared_experts=1, router="sigmoid")
    moe.update(moe_kw)
    return LMConfig(vocab_size=97, dim=32, n_layers=3, n_heads=4, max_seq_len=96, moe=MoEConfig(**moe))


def saved(tmp_path, cfg: LMConfig, dtype=torch.float32):
    torch.manual_seed(0)
    model = MoETransformer(cfg).to(dtype)
    for m in model.moe_layers:  # a trained model's routing is skewed: make the biases differ
        if hasattr(m.router, "bias_E"):
            m.router.bias_E.normal_(0, 0.5)
    path = tmp_path / "checkpoint.safetensors"
    save_checkpoint(path, model)
    ref = MoETransformer(cfg).to(dtype)
    load_checkpoint(path, ref)
    return path, ref.eval()


def expert_bytes(cfg: LMConfig, dtype=torch.float32) -> int:
    m = cfg.moe
    return (m.dim * 2 * m.hidden_dim + m.hidden_dim * m.dim) * torch.empty((), dtype=dtype).element_size()


@pytest.mark.parametrize("slots", [2, 3, 5, 8, 13, 24])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_and_greedy_tokens_equal_the_all_in_memory_model(tmp_path, slots, dtype):
    """From one layer's top_k (2 slots for 3 layers of 8 experts) to every expert (24)."""
    cfg = lm_cfg()
    path, ref = saved(tmp_path, cfg, dtype)
    budget = slots * expert_bytes(cfg, dtype) + expert_bytes(cfg, dtype) // 2
    model = load_run_with_store(path, cfg, budget)
    assert len(expert_pools(model)) == 1 and all(m.experts.slots == slots for m in model.moe_layers)
    idx = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        assert torch.equal(model(idx).logits, ref(idx).logits)  # the prompt: grouped path, chunked when slots < needed
        assert torch.equal(model(idx[:1, :1]).logits, ref(idx[:1, :1]).logits)  # one token: few-slot path, exact
        few, few_ref = model(idx[:1, :5]).logits, ref(idx[:1, :5]).logits  # few-slot path, 5 tokens
        if slots >= 8:  # one layer's experts fit at once: no chunks
            assert torch.equal(few, few_ref)
        else:  # more experts than slots: served in chunks, summed in another order
            tol = 1e-6 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(few, few_ref, rtol=tol, atol=tol)
    out = model.generate(idx[:1, :6], 40, temperature=0.0)
    assert torch.equal(out, ref.generate(idx[:1, :6], 40, temperature=0.0))
    stats = store_stats(model)
    assert stats.misses > 0 and stats.bytes_read == stats.misses * expert_bytes(cfg, dtype)
    if slots == 24:  # every expert fits: each is read once
        assert stats.misses <= 3 * 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_prompt_served_in_chunks_is_bit_identical_where_the_stack_loops_over_experts(tmp_path, dtype):
    """Experts large enough that the whole stack's few-token path loops over the chosen experts:
    the store, with fewer slots than a 3-token top-4 prompt needs, adds each chunk's experts in the
    same order (first use) into the same rows: the same bits, prompt and decoding."""
    cfg = LMConfig(
        vocab_size=97,
        dim=256,
        n_layers=2,
        n_heads=4,
        max_seq_len=32,
        moe=MoEConfig(dim=256, hidden_dim=512, num_experts=16, top_k=4, router="topk"),  # > 3 x 3 MiB in bf16
    )
    path, ref = saved(tmp_path, cfg, dtype)
    model = load_run_with_store(path, cfg, 5 * expert_bytes(cfg, dtype))
    idx = torch.randint(0, 97, (1, 3), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(idx).logits, ref(idx).logits)
    assert store_stats(model).misses > 2 * 5  # more experts than slots: chunks
    assert torch.equal(model.generate(idx, 8, temperature=0.0), ref.generate(idx, 8, temperature=0.0))


def test_a_failed_read_leaves_no_half_read_expert_behind(tmp_path):
    """A read that fails (a disk error) raises in the caller; the experts of that batch are not
    left resident with half-written slots: the next call reads them again and is exact."""
    cfg = lm_cfg()
    path, ref = saved(tmp_path, cfg)
    model = load_run_with_store(path, cfg, 9 * expert_bytes(cfg))
    pool = expert_pools(model)[0]
    source = pool.source

    class Failing:
        def check(self, *args):
            source.check(*args)

        def read_expert(self, layer, e, up_DH, down_FD):
            up_DH.fill_(float("nan"))
            if e % 2:
                raise OSError("the disk went away")
            source.read_expert(layer, e, up_DH, down_FD)

    pool.source = Failing()
    idx = torch.randint(0, 97, (1, 12))
    with torch.no_grad(), pytest.raises(OSError, match="disk went away"):
        model(idx)
    assert not pool.loading and all(e % 2 == 0 for _, e in pool.slot_of)
    pool.source = source
    with torch.no_grad():
        assert torch.equal(model(idx).logits, ref(idx).logits)


def test_a_decode_step_computes_on_the_experts_already_in_while_the_rest_are_read(tmp_path):
    """A one-token call starts its misses' reads together and computes each expert once its read
    is in: the second expert's read is held until the first expert has been computed (it would
    wait forever if the call waited for every read first), and the output is bit-identical to the
    all-in-memory experts' all the same."""
    cfg = lm_cfg()
    path, ref = saved(tmp_path, cfg)
    model = load_run_with_store(path, cfg, 2 * expert_bytes(cfg))
    pool, experts = expert_pools(model)[0], model.moe_layers[0].experts
    source, computed = pool.source, threading.Event()
    first, second = 5, 2

    class Slow:  # the second expert's read begins only once the first expert has been computed
        def check(self, *args):
            source.check(*args)

        def read_parts(self, layer, e, up_DH, down_FD):
            parts = source.read_parts(layer, e, up_DH, down_FD)
            held = lambda: (computed.wait(5), parts[0]())  # noqa: E731
            return [held, *parts[1:]] if e == second else parts

    class Seen(list):  # the pool's per-slot views, noting when the first expert's is used
        def __getitem__(self, s):
            if s == pool.slot_of.get((0, first)):
                computed.set()
            return super().__getitem__(s)

    pool.source = Slow()
    pool.views = tuple(Seen(v) for v in pool.views)
    x_TD = torch.randn(1, cfg.dim)
    experts_TK, weights_TK = torch.tensor([[first, second]]), torch.tensor([[0.7, 0.3]])
    with torch.no_grad():
        t0 = time.perf_counter()
        out = experts.few_slots(x_TD, experts_TK, weights_TK)
        waited = time.perf_counter() - t0
        want = ref.moe_layers[0].experts.few_slots(x_TD, experts_TK, weights_TK)
    assert computed.is_set() and waited < 4  # not the 5 s the held read times out after
    assert torch.equal(out, want) and not pool.loading
    assert experts.stats.misses == 2 and experts.stats.bytes_read == 2 * expert_bytes(cfg)


def test_a_failed_read_while_decoding_leaves_no_half_read_expert_behind(tmp_path):
    """The overlapped decode path: a failing read raises in the caller and frees the call's slots."""
    cfg = lm_cfg()
    path, ref = saved(tmp_path, cfg)
    model = load_run_with_store(path, cfg, 4 * expert_bytes(cfg))
    pool = expert_pools(model)[0]
    source = pool.source

    class Failing:
        def check(self, *args):
            source.check(*args)

        def read_parts(self, layer, e, up_DH, down_FD):
            def fail():
                up_DH.fill_(float("nan"))
                raise OSError("the disk went away")

            return [fail] if e % 2 else source.read_parts(layer, e, up_DH, down_FD)

    pool.source = Failing()
    idx = torch.randint(0, 97, (1, 1))
    failed = 0
    for token in range(97):
        with torch.no_grad():
            try:
                model(torch.full((1, 1), token))
            except OSError:
                failed += 1
        assert not pool.loading and all(e % 2 == 0 for _, e in pool.slot_of)
    assert failed
    pool.source = source
    with torch.no_grad():
        assert torch.equal(model(idx).logits, ref(idx).logits)


def test_the_pool_is_all_the_expert_memory_there_is(tmp_path):
    cfg = lm_cfg(num_experts=16)
    path, _ = saved(tmp_path, cfg)
    model = load_run_with_store(path, cfg, 3 * 3 * expert_bytes(cfg))
    assert all(isinstance(m.experts, StoredExperts) for m in model.moe_layers)
    pools = expert_pools(model)
    held = sum(p.up_SDH.nbytes + p.down_SFD.nbytes for p in pools)
    assert len(pools) == 1 and held == 3 * 3 * expert_bytes(cfg)
    assert not any("experts" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        model.generate(torch.randint(0, 97, (1, 4)), 30, temperature=0.0)
    assert sum(p.up_SDH.nbytes + p.down_SFD.nbytes for p in pools) == held  # nothing grew


def test_too_small_a_budget_and_a_damaged_file_are_clear_errors(tmp_path):
    cfg = lm_cfg()
    path, _ = saved(tmp_path, cfg)
    with pytest.raises(ValueError, match="decoding needs at least one layer's top_k=2 resident at once"):
        load_run_with_store(path, cfg, 2 * expert_bytes(cfg) - 1)
    with pytest.raises(StoreFileError, match="does not exist"):
        load_run_with_store(tmp_path / "nope.safetensors", cfg, 10**9)
    other = lm_cfg(num_experts=4)
    with pytest.raises(StoreFileError, match=r"has shape \(8, 32, 32\); the model expects \(4, 32, 32\)"):
        load_run_with_store(path, LMConfig(**{**other.to_dict(), "moe": other.moe}), 10**9)
    for text in ("12XB", "-1", "", "1.5.2GB"):
        with pytest.raises(ValueError, match="size"):
            parse_bytes(text)
    assert parse_bytes("1.5GiB") == 3 * 2**29 and parse_bytes("200MB") == 200 * 10**6


def test_a_read_leaves_no_page_cache_copy_of_what_it_read(tmp_path):
    """posix_fadvise(DONTNEED) after each read: the expert bytes are not kept twice (pool + cache).
    Checked through mincore-free means: the file's pages dropped means a re-read is a real read."""
    cfg = lm_cfg()
    path, _ = saved(tmp_path, cfg)
    files = SafetensorsFiles.of(path)
    name = "model.blocks.0.ffn.experts.w_up"
    row = torch.empty(files.entry(name).shape[1:])
    files.read_rows(name, row, 3)
    full = files.read(name)
    assert torch.equal(row, full[3]) and files.bytes_read == row.nbytes + full.nbytes


def policy_trace(seed: int, calls: int, experts: int, k: int) -> list[list[int]]:
    """Skewed, bursty routing: a Zipf-like popularity and runs of similar tokens."""
    rng = random.Random(seed)
    weights = [1.0 / (i + 1) ** 1.1 for i in range(experts)]
    out, last = [], rng.choices(range(experts), weights, k=k)
    for _ in range(calls):
        pick = set(last[: k // 2]) if rng.random() < 0.5 else set()
        while len(pick) < k:
            pick.add(rng.choices(range(experts), weights)[0])
        last = list(pick)
        out.append(sorted(pick))
    return out


@pytest.mark.parametrize("slots", [4, 8, 16])
def test_no_policy_beats_belady_and_each_policy_counts_every_access(slots):
    trace = policy_trace(0, 800, 64, 8)
    best_hits, best_misses = belady(trace, slots)
    for policy in (LRU(), LFU(), LFRU()):
        hits, misses = replay(trace, slots, policy)
        assert hits + misses == best_hits + best_misses == sum(len(c) for c in trace)
        assert hits <= best_hits, f"{policy.name} beat Belady's optimum"
    assert best_hits > 0


def test_lfru_in_a_shared_pool_gives_up_the_expert_whose_layer_runs_last():
    """Layers run in turn: the next layer's expert will be asked for first, so with equal odds the
    expert of the layer furthest ahead goes, even if it was used more recently."""
    plain, shared = LFRU(), LFRU(half_life=64.0, layers=3)
    for policy in (plain, shared):
        for key in [(1, 5), (2, 6), (0, 1)]:  # layer 0 is running
            policy.touch(key)
    assert plain.victim([(1, 5), (2, 6)]) == (1, 5)  # the older
    assert shared.victim([(1, 5), (2, 6)]) == (2, 6)  # layer 2 runs after layer 1
    assert shared.victim([(0, 2), (2, 6)]) == (0, 2)  # layer 0's others: not before the next token
    shared.touch((0, 2))
    assert shared.victim([(0, 2), (1, 5)]) == (0, 2)


def test_belady_is_optimal_on_a_trace_small_enough_to_search():
    """Against every eviction choice, exhaustively, on short random traces."""
    import functools

    rng = random.Random(1)
    for _ in range(30):
        trace = [[rng.randrange(5)] for _ in range(10)]
        slots = 2

        @functools.cache
        def best(i: int, resident: frozenset) -> int:
            if i == len(trace):
                return 0
            e = trace[i][0]
            if e in resident:
                return 1 + best(i + 1, resident)
            if len(resident) < slots:
                return best(i + 1, resident | {e})
            return max(best(i + 1, (resident - {r}) | {e}) for r in resident)

        assert belady(trace, slots)[0] == best(0, frozenset())


def test_the_replayed_trace_of_a_model_matches_its_store_counts(tmp_path):
    """The hits a policy scores in replay are the hits the store got on the same calls."""
    cfg = lm_cfg()
    path, _ = saved(tmp_path, cfg)
    model = load_run_with_store(path, cfg, 3 * 3 * expert_bytes(cfg), policy="lru")
    record_traces(model)
    with torch.no_grad():
        model.generate(torch.randint(0, 97, (1, 8)), 40, temperature=0.0)
    s = store_stats(model)
    assert replay(pool_trace(model), 9, LRU()) == (s.hits, s.misses)
    assert belady(pool_trace(model), 9)[0] >= s.hits


def test_the_shared_pool_gives_slots_to_the_layer_that_needs_them(tmp_path):
    """One layer routes every token to the same two experts, the others spread: under LFU the
    shared pool keeps the skewed layer's two and spends the other seven slots on the others, where
    equal pools per layer (three each) would waste one on the skewed layer."""
    cfg = lm_cfg(router="topk")
    path, ref = saved(tmp_path, cfg)
    model = load_run_with_store(path, cfg, 9 * expert_bytes(cfg), policy="lfu")
    skewed = model.moe_layers[0]
    record_traces(model)
    with torch.no_grad():
        skewed.router.linear.weight.zero_()  # every token ties: the first two experts
        ref.moe_layers[0].router.linear.weight.zero_()
        prompt = torch.randint(0, 97, (1, 4))
        out = model.generate(prompt, 40, temperature=0.0)
    assert torch.equal(out, ref.generate(prompt, 40, temperature=0.0))
    pool = expert_pools(model)[0]
    used = {e for call in skewed.experts.stats.trace for e in call}
    assert len(used) == 2 and set(pool.residents(0)) == used
    assert len(pool.residents(1)) + len(pool.residents(2)) == 7


def test_plan_mixed_gives_every_format_the_same_share_of_its_experts():
    from moekit.store.mixed import plan_mixed

    formats = [["int4"] * 6 + ["int8"] * 2, ["int4"] * 4 + ["int8"] * 4]  # 10 int4, 6 int8 experts
    size = {"int4": 100, "int8": 200}
    assert plan_mixed(10**6, formats, size, 2) == {"int4": 10, "int8": 6}  # all of them
    half = plan_mixed(5 * 100 + 3 * 200, formats, size, 2)
    assert half == {"int4": 5, "int8": 3}
    assert plan_mixed(2 * 100 + 2 * 200, formats, size, 2) == {"int4": 2, "int8": 2}  # top_k of each
    with pytest.raises(ValueError, match="give at least 600 bytes"):
        plan_mixed(599, formats, size, 2)
    assert plan_mixed(10**6, [["int4"] * 7 + ["int8"]], size, 4)["int8"] == 1  # only one exists


def test_plan_budget_fills_one_shared_pool_and_caps_at_every_expert():
    assert plan_budget(10_000, 100, 4, 64, 2).slots == 100
    assert plan_budget(10**9, 100, 4, 64, 2).slots == 256


@pytest.mark.parametrize("slots", [3, 6, 12])
@pytest.mark.parametrize("width", [True, 4])
def test_prefetch_changes_no_token_and_scores_its_guesses(tmp_path, slots, width):
    """With prefetch (each next layer's top_k guessed, or its 4 best) the greedy tokens and the
    decode logits are the all-in-memory model's; every read is either a counted miss or a
    prefetch; the guess counts add up."""
    from moekit.store import prefetch_stats

    cfg = lm_cfg(router="topk")
    path, ref = saved(tmp_path, cfg)
    model = load_run_with_store(path, cfg, slots * expert_bytes(cfg), prefetch=width)
    assert model.prefetcher.width == (None if width is True else width)
    try:
        prompt = torch.randint(0, 97, (1, 6))
        out = model.generate(prompt, 40, temperature=0.0)
        assert torch.equal(out, ref.generate(prompt, 40, temperature=0.0))
        with torch.no_grad():  # to rounding: the model in memory sums a token's experts in one native call
            torch.testing.assert_close(model(out[:, :1]).logits, ref(out[:, :1]).logits, rtol=1e-5, atol=1e-6)
        p, s = prefetch_stats(model), store_stats(model)
        assert p.guessed > 0 and 0 < p.right <= min(p.guessed, p.needed)
        if width == 4:  # 4 guesses for top_k = 2 experts per decoded token
            assert p.guessed >= 1.5 * p.needed
        prefetched_reads = s.bytes_read // expert_bytes(cfg) - s.misses
        assert prefetched_reads >= 0 and p.wasted_bytes <= prefetched_reads * expert_bytes(cfg)
    finally:
        model.prefetcher.close()


def test_prefetch_needs_two_budgeted_layers_and_a_store(tmp_path):
    from moekit.generate import load_run_model
    from moekit.store import Prefetcher

    with pytest.raises(ValueError, match="at least two MoE layers"):
        Prefetcher(MoETransformer(lm_cfg()))
    path, _ = saved(tmp_path, lm_cfg())
    model = load_run_with_store(path, lm_cfg(), 4 * expert_bytes(lm_cfg()))
    for width in (0, 9):
        with pytest.raises(ValueError, match=f"prefetch width must be 1..8 experts per layer .*; got {width}"):
            Prefetcher(model, width=width)
    with pytest.raises(ValueError, match="give expert_memory"):
        load_run_model(str(tmp_path), prefetch=True)


def test_a_float_run_in_an_int8_store_equals_the_model_quantized_in_memory(tmp_path):
    from moekit.kernels.lowbit import format_bytes
    from moekit.quantize import quantize_model

    cfg = lm_cfg()
    path, ref = saved(tmp_path, cfg)
    quantize_model(ref, "int8")
    m = cfg.moe
    e_bytes = format_bytes("int8", 2 * m.hidden_dim, m.dim) + format_bytes("int8", m.dim, m.hidden_dim)
    model = load_run_with_store(path, cfg, 3 * e_bytes, fmt="int8")
    idx = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        assert torch.equal(model(idx).logits, ref(idx).logits)
    prompt = idx[:1, :5]
    assert torch.equal(model.generate(prompt, 20, temperature=0.0), ref.generate(prompt, 20, temperature=0.0))
