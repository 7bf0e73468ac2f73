"""Worker functions run in real gloo process groups by test_expert_parallel.py (spawned processes
import this module by name, so it must not be a test module itself).

Every worker compares the expert-parallel model on its slice of a global batch with the
single-process model on the whole batch, built on every rank from the same seed."""

from __future__ import annotations

import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from moekit import MoE, MoEConfig
from moekit.config import LMConfig
from moekit.layer import after_optimizer_step
from moekit.models import MoETransformer
from moekit.parallel import ExpertParallelError, apply_expert_parallel, make_mesh

TOL = 1e-9  # float64 everywhere, router included


def init(rank: int, world: int, store: str, timeout_s: float = float(os.environ.get("EP_TIMEOUT", 60))) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s)
    )
    dist.barrier()  # as moekit's init_distributed: no rank leaves while a peer is still connecting


def full(t):
    """A DTensor's whole tensor (a plain tensor as it is)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def close(a, b, what, tol=TOL):
    err = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    scale = max(1.0, b.double().abs().max().item() if b.numel() else 0.0)
    assert err <= tol * scale, f"rank {dist.get_rank()}: {what} differs by {err:.3g} (scale {scale:.3g})"


def _skew(moe: MoE, dead: list[int]) -> None:
    """Make some experts unreachable, so they receive no tokens at all."""
    with torch.no_grad():
        if moe.router.learned:
            moe.router.linear.weight[dead] = 0.0
            if moe.router.linear.bias is not None:
                moe.router.linear.bias[dead] = -1e4
            else:
                moe.router.linear.weight[dead, 0] = -50.0


SCENARIOS = {
    "topk": dict(
        top_k=2,
        balance_loss_weight=0.1,
        z_loss_weight=0.01,
        importance_loss_weight=0.1,
        sq_load_loss_weight=0.1,
        entropy_loss_weight=0.01,
    ),
    "drop": dict(top_k=2, capacity_factor=1.0, balance_loss_weight=0.1),
    "reroute": dict(
        top_k=2, capacity_factor=1.0, overflow="reroute", capacity_priority="score", balance_loss_weight=0.1
    ),
    "expert_choice": dict(router="expert_choice", top_k=2, balance_loss_weight=0.1),
    "sigmoid": dict(
        router="sigmoid", top_k=3, num_groups=4, topk_groups=2, bias_update_rate=0.01, num_shared_experts=1
    ),
    "noisy_eval": dict(router="noisy_topk", top_k=2, load_loss_weight=0.1, importance_loss_weight=0.1),
    "shared_gate": dict(top_k=2, num_shared_experts=1, shared_expert_gate=True, renormalize=True),
    # router randomness in training: drawn for the global batch, so equal to one process's
    "noisy_train": dict(router="noisy_topk", top_k=2, load_loss_weight=0.1, importance_loss_weight=0.1),
    "jitter": dict(top_k=2, router_jitter=0.2, balance_loss_weight=0.1),
    "random_train": dict(router="random", top_k=2, balance_loss_weight=0.1),
}


def layer_equivalence(rank: int, world: int, store: str, ep: int, names: list[str]) -> None:
    """Forward outputs, losses, stats and every parameter's gradient equal the single-process
    model's on the global batch."""
    init(rank, world, store)
    T, D = 10 + 3 * rank, 16  # uneven token counts per rank
    sizes = [10 + 3 * r for r in range(world)]
    for name in names:
        torch.manual_seed(1)
        cfg = MoEConfig(
            dim=D,
            hidden_dim=8,
            num_experts=8,
            router_bias=name != "expert_choice",
            router_dtype="float64",
            **SCENARIOS[name],
        )
        ref = MoE(cfg).double()
        _skew(ref, [5, 6, 7] if name != "expert_choice" else [])
        x = torch.randn(sum(sizes), D, dtype=torch.float64)
        tgt = torch.randn_like(x)
        moe = MoE(cfg).double()
        moe.load_state_dict(ref.state_dict())
        if name == "noisy_eval":
            ref.eval(), moe.eval()
        lo = sum(sizes[:rank])
        torch.manual_seed(2)  # the same random state before each forward: routing noise must match
        r = ref(x)
        # the objective: the mean task loss over the whole batch (ranks hold unequal token counts)
        ((r.out * tgt).mean() + r.aux_loss).backward()
        h = apply_expert_parallel(moe, expert_parallel=ep)
        torch.manual_seed(2)
        o = moe(x[lo : lo + T])
        # this rank's term: its summed loss over every rank's count; FSDP sums the gradients
        (h.global_mean((o.out * tgt[lo : lo + T]).sum(), torch.tensor(T * D)) + h.aux_share(o.aux_loss)).backward()
        what = f"[{name}, ep={ep}, world={world}]"
        close(o.out, r.out[lo : lo + T], f"{what} output")
        close(o.aux_loss, r.aux_loss, f"{what} aux loss")
        for k in r.losses:
            close(o.losses[k], r.losses[k], f"{what} loss {k}", tol=1e-8)
        assert torch.equal(o.stats["tokens_per_expert"], r.stats["tokens_per_expert"]), f"{what} tokens_per_expert"
        close(o.stats["dropped_fraction"], r.stats["dropped_fraction"], f"{what} dropped_fraction")
        if name in ("topk", "drop", "reroute", "sigmoid"):
            assert (r.stats["tokens_per_expert"] == 0).sum() >= 3, f"{what}: the skew must leave experts without tokens"
        if name == "drop":
            assert float(r.stats["dropped_fraction"]) > 0, f"{what}: capacity must drop slots"
        mine = dict(moe.named_parameters())
        for pname, p in ref.named_parameters():
            assert isinstance(mine[pname], DTensor), f"{what} {pname} is not sharded"
            assert mine[pname].grad is not None, f"{what} {pname}: no gradient"
            g = mine[pname].grad.full_tensor()
            close(g, p.grad, f"{what} gradient of {pname}", tol=1e-8)
        assert mine["experts.w_up"].to_local().shape[0] * ep * (world // ep) <= 8 + world, "experts are not sharded"
        if name == "topk":  # expert surgery needs every expert on one rank
            for call in (lambda: moe.add_experts(1), lambda: moe.revive_dead_experts(1)):
                try:
                    call()
                    raise AssertionError("expert surgery on an expert-parallel layer must raise")
                except ValueError as err:
                    assert "expert-parallel" in str(err), err
        if name == "sigmoid":
            after_optimizer_step(ref), after_optimizer_step(moe)
            assert torch.equal(moe.router.bias_E, ref.router.bias_E), f"{what} sigmoid bias update"
            assert bool(moe.router.bias_E.abs().sum() > 0)

    dist.barrier()
    dist.destroy_process_group()


def _lm_cfg(num_experts: int = 8) -> LMConfig:
    moe = MoEConfig(
        dim=32,
        hidden_dim=16,
        num_experts=num_experts,
        top_k=1,  # a causal LM with a capacity limit takes top-1 (top-2 drops would see later tokens)
        renormalize=False,
        capacity_factor=1.5,
        balance_loss_weight=0.01,
        z_loss_weight=1e-3,
        num_shared_experts=1,
        router_dtype="float64",
    )
    return LMConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, max_seq_len=16, moe=moe)


def reference_step(world: int, num_experts: int = 8):
    """The single-process reference of :func:`ep_dp_step`: (ref model after one AdamW step with
    clipping, its optimizer, the gradient norm, a copy of the initial model, inputs, targets)."""
    torch.manual_seed(3)
    ref = MoETransformer(_lm_cfg(num_experts)).double()
    model = MoETransformer(_lm_cfg(num_experts)).double()
    model.load_state_dict(ref.state_dict())
    B = 2 * world
    idx = torch.randint(0, 64, (B, 12))
    tgt = torch.randint(0, 64, (B, 12))
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    out = ref(idx, tgt)
    (out.loss + out.aux_loss).backward()
    gn_ref = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
    opt_ref.step()
    return ref, opt_ref, gn_ref, model, idx, tgt


def masked_targets_step(rank: int, world: int, store: str, ep: int) -> None:
    """Issue 25, fault 2: targets masked with ignore_index, a different number on every rank (rank
    q keeps (q + 1) / world of its targets): the logged loss and every gradient equal one
    process's on the global batch (a mean of the ranks' means would weigh a rank's few targets
    like another's many)."""
    init(rank, world, store)
    torch.manual_seed(3)
    ref = MoETransformer(_lm_cfg()).double()
    model = MoETransformer(_lm_cfg()).double()
    model.load_state_dict(ref.state_dict())
    B = 2 * world
    idx = torch.randint(0, 64, (B, 12))
    tgt = torch.randint(0, 64, (B, 12))
    for q in range(world):
        tgt[2 * q : 2 * q + 2, 12 * (q + 1) // world :] = -100
    out = ref(idx, tgt)
    (out.loss + out.aux_loss).backward()  # one process: the mean over every counted target
    h = apply_expert_parallel(model, make_mesh(ep, "cpu"))
    rows = slice(2 * rank, 2 * rank + 2)
    o = model(idx[rows], tgt[rows])
    h.loss(o).backward()
    total, count = h.sum(torch.stack([o.loss_sum.detach(), o.n_targets.double()])).tolist()
    close(torch.tensor(total / count), out.loss.detach(), "the global batch's loss", tol=1e-6)  # fp32 cross-entropy
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        close(g, ref_params[name].grad, f"gradient of {name} (world={world}, ep={ep})", tol=1e-6)
    dist.destroy_process_group()


def ep_dp_step(rank: int, world: int, store: str, ep: int, ckpt_dir: str) -> None:
    """EP x DP: one AdamW step with clipping equals the single-process step; checkpoints gathered
    from the EP run equal the single-process state and reshard into another EP size; so does the
    sharded (DCP) checkpoint, which every rank writes its part of (the test then loads it in one
    process, without a process group)."""
    from moekit.train.checkpoint import load_checkpoint, save_checkpoint
    from moekit.train.distcp import load_distributed, save_distributed

    init(rank, world, store)
    ref, opt_ref, gn_ref, model, idx, tgt = reference_step(world)
    B = idx.shape[0]

    mesh = make_mesh(ep, "cpu")
    h = apply_expert_parallel(model, mesh)
    assert (h.ep_size, h.dp_size) == (ep, world // ep)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    b = B // world
    o = model(idx[rank * b : (rank + 1) * b], tgt[rank * b : (rank + 1) * b])
    h.loss(o).backward()
    gn = h.clip_grad_norm_(0.5)
    close(gn, gn_ref, "total gradient norm", tol=1e-6)  # the LM computes rotary angles in fp32
    opt.step()
    full = h.full_state_dict()
    for k, v in ref.state_dict().items():
        close(full[k], v, f"parameter {k} after one AdamW step", tol=1e-7)
    # checkpoint written by rank 0 from the EP run loads into a single-process model
    path = os.path.join(ckpt_dir, "ep.safetensors")
    opt_full = h.full_optimizer_state_dict(opt)
    if rank == 0:
        save_checkpoint(path, model, model_state=full, optimizer_state=opt_full)
    dist.barrier()
    single = MoETransformer(_lm_cfg()).double()
    single_opt = torch.optim.AdamW(single.parameters(), lr=1e-2)
    load_checkpoint(path, single, single_opt)
    probe = torch.randint(0, 64, (2, 12))
    single.eval(), ref.eval()
    close(single(probe).logits, ref(probe).logits, "single-process model from an EP checkpoint")
    for i, st in opt_ref.state_dict()["state"].items():
        close(single_opt.state_dict()["state"][i]["exp_avg"], st["exp_avg"], f"optimizer state {i}")
    # and back into an EP model of another EP size: same outputs on the same global batch
    other = 1 if ep > 1 else world
    model2 = MoETransformer(_lm_cfg()).double()
    h2 = apply_expert_parallel(model2, expert_parallel=other, sync_init=False)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    load_checkpoint(path, model2, opt2, parallel=h2)
    model2.eval()
    pb = torch.randint(0, 64, (world, 12))
    close(
        model2(pb[rank : rank + 1]).logits,
        ref(pb).logits[rank : rank + 1],
        f"EP={other} model from an EP={ep} checkpoint",
    )

    # the sharded checkpoint: every rank writes its part, it loads on every other layout, exactly
    dcp_path = os.path.join(ckpt_dir, "ep.dcp")
    rng_states = [None] * world
    dist.all_gather_object(rng_states, torch.get_rng_state())
    save_distributed(dcp_path, model, opt, h, rng={"torch": torch.get_rng_state()}, meta={"step": 1, "label": "moe"})
    for other in sorted({1, 2, world} - {ep}):
        m = MoETransformer(_lm_cfg()).double()
        hh = apply_expert_parallel(m, expert_parallel=other, sync_init=False)
        mo = torch.optim.AdamW(m.parameters(), lr=1e-2)
        meta, rng = load_distributed(dcp_path, m, mo, hh)
        assert meta == {"step": 1, "label": "moe"}, meta
        assert torch.equal(rng["torch"], rng_states[0]), "the RNG state restored is not rank 0's"
        for k, v in hh.full_state_dict().items():
            assert torch.equal(v, full[k]), f"rank {rank}: {k} differs after EP={ep} -> EP={other} through DCP"
        got = hh.full_optimizer_state_dict(mo)
        assert got["param_groups"] == opt_full["param_groups"], (got["param_groups"], opt_full["param_groups"])
        for i, st in opt_full["state"].items():
            for key, v in st.items():
                assert torch.equal(got["state"][i][key], v), (
                    f"rank {rank}: optimizer state {i}.{key} differs (EP={other})"
                )
        m.eval()
        close(
            m(pb[rank : rank + 1]).logits,
            ref(pb).logits[rank : rank + 1],
            f"EP={other} model from an EP={ep} DCP checkpoint",
        )
    dist.barrier()
    dist.destroy_process_group()


def check_dcp_in_one_process(ckpt_dir: str, world: int, ep: int) -> None:
    """In the test process (no process group): the DCP checkpoint of :func:`ep_dp_step` loads
    into one model, equal to the single-process step and bitwise to the gathered single file;
    every rank wrote its part, replicated tensors once, experts once per shard."""
    import pickle

    from moekit.train.checkpoint import read_checkpoint
    from moekit.train.distcp import convert_to_single_file, load_distributed

    path = os.path.join(ckpt_dir, "ep.dcp")
    with open(os.path.join(path, ".metadata"), "rb") as f:
        md = pickle.load(f)
    stored: dict = {}
    for index, info in md.storage_data.items():
        stored.setdefault(index.fqn, []).append(info.relative_path)
    params = {n for n, _ in MoETransformer(_lm_cfg()).named_parameters()}
    sharded = 0
    for key, meta in md.state_dict_metadata.items():
        if not hasattr(meta, "chunks"):
            continue
        name = key.split(".", 1)[1]
        name = name.rsplit(".", 1)[0] if key.startswith("optim.") else name
        # parameters and their optimizer state are sharded over all ranks (FSDP; experts over ep x dp),
        # each part written once by the rank holding it; buffers once
        want = min(world, meta.size[0]) if name in params and len(meta.size) else 1
        assert len(meta.chunks) == want and len(set(stored[key])) == want, (key, len(meta.chunks), stored.get(key))
        sharded += want > 1
    assert sharded >= len(params), "parameters are not sharded in the checkpoint"
    sizes = [os.path.getsize(os.path.join(path, f"__{r}_0.distcp")) for r in range(world)]
    assert max(sizes) < 1.5 * min(sizes), f"unbalanced writes per rank: {sizes}"

    ref, opt_ref, _, _, _, _ = reference_step(world)
    single = MoETransformer(_lm_cfg()).double()
    opt = torch.optim.AdamW(single.parameters(), lr=1e-2)
    meta, rng = load_distributed(path, single, opt)
    assert meta["step"] == 1 and set(rng) == {"torch"}
    for k, v in ref.state_dict().items():
        close(single.state_dict()[k], v, f"{k} loaded in one process", tol=1e-7)
    for i, st in opt_ref.state_dict()["state"].items():
        close(opt.state_dict()["state"][i]["exp_avg_sq"], st["exp_avg_sq"], f"optimizer state {i}", tol=1e-7)
    # bitwise: the gathered single file of the same state, and the conversion of the folder
    gathered, _ = read_checkpoint(os.path.join(ckpt_dir, "ep.safetensors"))
    conv, info = read_checkpoint(convert_to_single_file(path, os.path.join(ckpt_dir, "converted.safetensors")))
    assert info["meta"]["step"] == 1 and "rng.torch" in conv
    for k, v in gathered.items():
        assert torch.equal(conv[k], v), f"{k} differs between the gathered file and the converted DCP folder"
    for k, v in single.state_dict().items():
        assert torch.equal(v, gathered["model." + k]), k


def bad_setup(rank: int, world: int, store: str, case: str, out_dir: str) -> None:
    """Setup errors are clear and raised on every rank."""
    init(rank, world, store, timeout_s=30)
    E = {"indivisible": 7, "mismatch": 8 if rank == 0 else 16, "world": 8, "zero": 8}[case]
    ep = {"indivisible": 2, "mismatch": 2, "world": 4, "zero": 0}[case]
    moe = MoE(MoEConfig(dim=8, hidden_dim=4, num_experts=E, top_k=2))
    try:
        apply_expert_parallel(moe, expert_parallel=ep)
        msg = "no error"
    except ValueError as err:
        msg = str(err)
    with open(os.path.join(out_dir, f"{case}.{rank}"), "w") as f:
        f.write(msg)
    dist.destroy_process_group()


def fails_mid_step(rank: int, world: int, store: str, out_dir: str, timeout_s: float, mode: str) -> None:
    """Rank 1 dies abruptly (or hangs) after its forward pass; rank 0 must fail with a clear error
    within a bounded time, not hang."""
    init(rank, world, store, timeout_s=timeout_s)
    torch.manual_seed(0)
    moe = MoE(MoEConfig(dim=8, hidden_dim=4, num_experts=4, top_k=2))
    apply_expert_parallel(moe, expert_parallel=world)
    x = torch.randn(6, 8)
    o = moe(x)
    if rank == 1:
        if mode == "hangs":
            time.sleep(timeout_s * 3)
        os._exit(3)
    t0 = time.perf_counter()
    try:
        for _ in range(3):  # backward, then more steps: the dead peer must surface as an error
            o.out.sum().backward()
            o = moe(x)
        msg = "no error"
    except ExpertParallelError as err:
        msg = f"ExpertParallelError after {time.perf_counter() - t0:.1f}s: {err}"
    except Exception as err:  # noqa: BLE001 - recorded for the test to show
        msg = f"{type(err).__name__}: {err}"
    with open(os.path.join(out_dir, f"{mode}.{rank}"), "w") as f:
        f.write(msg)
    os._exit(0)


def meta_init_equals_single_process(rank: int, world: int, store: str, eps: list[int]) -> None:
    """A model built on the meta device, sharded, then materialised holds exactly the
    single-process model's values (its slice of every expert tensor), for every layout; its
    buffers are the constructor's and the random state after it is the same as after one process."""
    init(rank, world, store)
    try:
        cfg = LMConfig(
            vocab_size=64,
            dim=32,
            n_layers=2,
            n_heads=4,
            max_seq_len=16,
            moe=MoEConfig(dim=32, hidden_dim=16, num_experts=8, top_k=2, router="sigmoid", num_shared_experts=1),
        )
        import moekit.models.lm as lm

        for ep, chunk in [(e, c) for e in eps for c in (lm.INIT_CHUNK_BYTES, 96)]:
            lm.INIT_CHUNK_BYTES = chunk  # 96 bytes: every parameter drawn in many blocks of rows
            torch.manual_seed(7)
            ref = MoETransformer(cfg)
            after_ref = torch.get_rng_state()
            torch.manual_seed(7)
            with torch.device("meta"):
                model = MoETransformer(cfg)
            apply_expert_parallel(model, expert_parallel=ep)
            model.materialize_("cpu")
            assert torch.equal(torch.get_rng_state(), after_ref), "the random state after init differs"
            full = ref.state_dict()
            for name, t in model.state_dict().items():
                got = t.full_tensor() if isinstance(t, DTensor) else t
                assert torch.equal(got, full[name]), (
                    f"rank {rank}, ep {ep}, blocks of {chunk} bytes: {name} differs from the single-process init"
                )
            # every parameter is sharded over all ranks: each holds about 1/world of them
            total = sum(p.numel() for p in ref.parameters())
            mine = sum(p.to_local().numel() for p in model.parameters())
            biggest = max(p.numel() for p in ref.parameters())
            assert abs(mine - total / world) <= biggest, (
                f"rank {rank}, ep {ep}: holds {mine} of {total} parameter values"
            )
            for (name, b), (_, b_ref) in zip(model.named_buffers(), ref.named_buffers()):
                assert torch.equal(b, b_ref), f"rank {rank}: buffer {name}"
    finally:
        dist.destroy_process_group()


def call_mismatch(rank: int, world: int, store: str, case: str) -> None:
    """Ranks that call an expert-parallel layer differently get a clear error on every rank (not a
    hang until the timeout)."""
    init(rank, world, store, timeout_s=30)
    try:
        torch.manual_seed(0)
        moe = MoE(MoEConfig(dim=8, hidden_dim=8, num_experts=4, top_k=2, capacity_factor=1.0))
        apply_expert_parallel(moe, expert_parallel=world)
        x = torch.randn(5, 8)
        if case == "top_k":

            def call():
                return moe(x, top_k=1 if rank == 1 else 2)
        elif case == "eval":
            moe.train(rank != 1)

            def call():
                return moe(x)
        else:  # grad mode

            def call():
                with torch.set_grad_enabled(rank != 1):
                    return moe(x)

        t0 = time.monotonic()
        try:
            call()
            raise AssertionError(f"rank {rank}: a mismatched call must raise")
        except ValueError as err:
            assert "called differently on different ranks" in str(err) and "rank 1" in str(err), err
        assert time.monotonic() - t0 < 20, "the error must come at once, not after the timeout"
    finally:
        dist.destroy_process_group()


def balanced_expert_shards(rank: int, world: int, store: str, ckpt_dir: str) -> None:
    """Issue 25, fault 3: EP=2 x DP=2 with 2 experts (one per EP rank, fewer than DP ranks): FSDP
    must not leave one DP rank with the expert and the other with nothing; every rank holds the
    same share of every expert weight, and the step and a sharded checkpoint stay exact."""
    from moekit.train.distcp import load_distributed, save_distributed

    init(rank, world, store)
    ref, _, gn_ref, model, idx, tgt = reference_step(world, num_experts=2)
    h = apply_expert_parallel(model, make_mesh(2, "cpu"))
    sizes = torch.tensor([float(p.to_local().numel()) for n, p in model.named_parameters() if ".experts." in n])
    every = [torch.empty_like(sizes) for _ in range(world)]
    dist.all_gather(every, sizes)
    assert all(torch.equal(e, every[0]) for e in every) and (sizes > 0).all(), f"expert shard sizes {every}"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    b = idx.shape[0] // world
    o = model(idx[rank * b : (rank + 1) * b], tgt[rank * b : (rank + 1) * b])
    h.loss(o).backward()
    close(h.clip_grad_norm_(0.5), gn_ref, "total gradient norm", tol=1e-6)
    opt.step()
    full = h.full_state_dict()
    for k, v in ref.state_dict().items():
        close(full[k], v, f"parameter {k} after one AdamW step", tol=1e-7)
    path = os.path.join(ckpt_dir, "balanced.dcp")
    save_distributed(path, model, opt, h, meta={"step": 1})
    for other in (2, 1):
        m = MoETransformer(_lm_cfg(2)).double()
        hh = apply_expert_parallel(m, expert_parallel=other, sync_init=False)
        load_distributed(path, m, torch.optim.AdamW(m.parameters(), lr=1e-2), hh)
        for k, v in hh.full_state_dict().items():
            assert torch.equal(v, full[k]), f"rank {rank}: {k} differs after a round trip into EP={other}"
    dist.barrier()
    dist.destroy_process_group()
