"""Edge cases of expert parallelism, run in real gloo process groups by test_ep_edge_cases.py
(spawned processes import this module by name, so it must not be a test module itself).

Each worker writes one line per rank to ``out_dir`` (``<case>.<rank>``) starting with "ok" or with
what went wrong, so a failure on any rank shows in the test's message."""

from __future__ import annotations

import os
import traceback

import torch
import torch.distributed as dist
from ep_workers import close, init

from moekit import MoE, MoEConfig
from moekit.parallel import apply_expert_parallel


def _record(out_dir: str, case: str, fn) -> None:
    try:
        fn()
        msg = "ok"
    except Exception as err:  # noqa: BLE001 - written for the test to show
        msg = f"{type(err).__name__}: {err}\n{traceback.format_exc()[-1500:]}"
    with open(os.path.join(out_dir, f"{case}.{dist.get_rank()}"), "w") as f:
        f.write(msg)


def stages_on_their_own_ranks(rank: int, world: int, store: str, out_dir: str) -> None:
    """Issue 25, fault 6: two models, each expert-parallel over its own half of 4 ranks (the
    (dp, ep) slice of a (stage, dp, ep) mesh, as pipeline stages get), built from different seeds
    and called a different number of times: each equals one process's (outputs, auxiliary loss,
    every gradient); no collective of one reaches the other's ranks (a world-scoped one would mix
    their statistics, overwrite one's weights with the other's or wait forever)."""
    from torch.distributed.device_mesh import init_device_mesh

    init(rank, world, store, timeout_s=20)

    def check():
        mesh3 = init_device_mesh("cpu", (2, 1, 2), mesh_dim_names=("stage", "dp", "ep"))
        stage = mesh3.get_local_rank("stage")
        torch.manual_seed(10 + stage)
        cfg = MoEConfig(dim=8, hidden_dim=4, num_experts=4, top_k=2, router_dtype="float64", balance_loss_weight=0.1)
        ref = MoE(cfg).double()
        moe = MoE(cfg).double()
        moe.load_state_dict(ref.state_dict())
        apply_expert_parallel(moe, mesh3["dp", "ep"])
        me = mesh3.get_local_rank("ep")
        for call in range(1 + 2 * stage):  # stage 0 calls its layer once, stage 1 three times
            x = torch.randn(8, 8, dtype=torch.float64)
            r = ref(x)
            (r.out.sum() / 2 + r.aux_loss).backward()
            o = moe(x[4 * me : 4 * me + 4])
            ((o.out.sum() + o.aux_loss) / 2).backward()  # this rank's term; FSDP sums
            close(o.out, r.out[4 * me : 4 * me + 4], f"stage {stage}, call {call}: output")
            close(o.aux_loss, r.aux_loss, f"stage {stage}, call {call}: aux loss")
        close(moe.router.linear.weight.grad.full_tensor(), ref.router.linear.weight.grad, "router gradient")
        close(moe.experts.w_up.grad.full_tensor(), ref.experts.w_up.grad, "expert gradient")

    _record(out_dir, "stages", check)
    dist.destroy_process_group()


HOST_READS = ("tolist", "item", "__int__", "__float__", "__bool__")


def host_reads_per_call(rank: int, world: int, store: str, out_dir: str) -> None:
    """Issue 25, fault 4: what expert parallelism adds to a layer call's reads of tensor values on
    the host (each a device-to-host sync on a GPU: ``tolist``, ``item``, ``int()``, ``float()``,
    ``bool()``, ``torch.equal``), counted in a forward and backward against one process's. Written
    to the result file as "ok" or the counts."""
    init(rank, world, store, timeout_s=20)
    count = [0]
    originals = {n: getattr(torch.Tensor, n) for n in HOST_READS}
    equal = torch.equal

    def counted(fn):
        def wrapped(*args, **kwargs):
            count[0] += 1
            return fn(*args, **kwargs)

        return wrapped

    def reads(layer, x) -> int:
        for n, fn in originals.items():
            setattr(torch.Tensor, n, counted(fn))
        torch.equal = counted(equal)
        count[0] = 0
        try:
            o = layer(x)
            (o.out.sum() + o.aux_loss).backward()
        finally:
            for n, fn in originals.items():
                setattr(torch.Tensor, n, fn)
            torch.equal = equal
        return count[0]

    def check():
        for kw in ({}, dict(capacity_factor=1.0)):
            torch.manual_seed(0)
            cfg = MoEConfig(dim=8, hidden_dim=4, num_experts=4, top_k=2, balance_loss_weight=0.1, **kw)
            ref, moe = MoE(cfg), MoE(cfg)
            moe.load_state_dict(ref.state_dict())
            x = torch.randn(8, 8)
            one = reads(ref, x)
            apply_expert_parallel(moe, expert_parallel=world)
            reads(moe, x[4 * rank : 4 * rank + 4])  # the first call: FSDP's lazy setup
            ep = reads(moe, x[4 * rank : 4 * rank + 4])
            allowed = 2  # the call check's one read and the split sizes' one
            assert ep - one <= allowed, f"{kw}: one process {one} host reads, expert-parallel {ep} (+{allowed} allowed)"

    _record(out_dir, "host-reads", check)
    dist.destroy_process_group()


def frozen_experts(rank: int, world: int, store: str, out_dir: str) -> None:
    """Experts frozen before sharding stay frozen: no gradient, nothing for an optimizer to move;
    the router still trains exactly as one process would."""
    init(rank, world, store, timeout_s=20)

    def check():
        torch.manual_seed(0)
        cfg = MoEConfig(dim=8, hidden_dim=4, num_experts=4, top_k=2, router_dtype="float64")
        ref = MoE(cfg).double()
        moe = MoE(cfg).double()
        moe.load_state_dict(ref.state_dict())
        for m in (ref, moe):
            m.experts.requires_grad_(False)
        x = torch.randn(12, 8, dtype=torch.float64)
        r = ref(x)
        (r.out.sum() / world + r.aux_loss).backward()
        apply_expert_parallel(moe, expert_parallel=world)
        assert not moe.experts.w_up.requires_grad and not moe.experts.w_down.requires_grad, (
            "sharding unfroze the experts"
        )
        lo = 12 // world * rank
        o = moe(x[lo : lo + 12 // world])
        ((o.out.sum() + o.aux_loss) / world).backward()  # this rank's term; FSDP sums
        assert moe.experts.w_up.grad is None and moe.experts.w_down.grad is None, "frozen experts got a gradient"
        close(moe.router.linear.weight.grad.full_tensor(), ref.router.linear.weight.grad, "router gradient")

    _record(out_dir, "frozen", check)
    dist.destroy_process_group()


def sigmoid_bias_replicated(rank: int, world: int, store: str, out_dir: str) -> None:
    """Under statistics="expert" or "local" the sigmoid router's bias (replicated state) still
    moves by the global load: it stays equal on every rank and equals one process's."""
    init(rank, world, store, timeout_s=20)
    for statistics, ep in (("local", world), ("expert", 1)):

        def check():
            torch.manual_seed(0)
            cfg = MoEConfig(
                dim=8,
                hidden_dim=4,
                num_experts=4,
                top_k=2,
                router="sigmoid",
                bias_update_rate=0.1,
                router_dtype="float64",
            )
            ref = MoE(cfg).double()
            moe = MoE(cfg).double()
            moe.load_state_dict(ref.state_dict())
            apply_expert_parallel(moe, expert_parallel=ep, statistics=statistics)
            x = torch.randn(world * 6, 8, dtype=torch.float64)
            x[6:, 0] += 3.0  # the ranks see different loads
            for _ in range(3):
                ref(x), moe(x[rank * 6 : rank * 6 + 6])
                ref.after_optimizer_step(), moe.after_optimizer_step()
            biases = [torch.empty_like(moe.router.bias_E) for _ in range(world)]
            dist.all_gather(biases, moe.router.bias_E)
            assert all(torch.equal(b, biases[0]) for b in biases), f"the bias differs between ranks: {biases}"
            assert torch.equal(moe.router.bias_E, ref.router.bias_E), (moe.router.bias_E, ref.router.bias_E)

        _record(out_dir, f"bias-{statistics}", check)
    dist.destroy_process_group()


MISMATCHES = ("capacity_factor", "router_kind", "statistics", "sync_init")


def mismatched_settings(rank: int, world: int, store: str, out_dir: str) -> None:
    """Settings that decide which collectives a forward runs must agree on every rank: a
    difference is a clear error on every rank at setup, not a hang until the timeout."""
    init(rank, world, store, timeout_s=10)
    for case in MISMATCHES:

        def check():
            kw, apply_kw = dict(top_k=2), {}
            if case == "capacity_factor":
                kw["capacity_factor"] = 1.0 if rank == 0 else None
            if case == "router_kind":  # same parameters, but expert choice gathers rows
                kw["router"] = "topk" if rank == 0 else "expert_choice"
            if case == "statistics":
                apply_kw["statistics"] = "global" if rank == 0 else "local"
            if case == "sync_init":
                apply_kw["sync_init"] = rank == 0
            moe = MoE(MoEConfig(dim=8, hidden_dim=4, num_experts=4, **kw))
            try:
                apply_expert_parallel(moe, expert_parallel=world, **apply_kw)
            except ValueError as err:
                assert "built a different model" in str(err), err
                return
            o = moe(torch.randn(6, 8))
            ((o.out.sum() + o.aux_loss) / world).backward()  # this rank's term; FSDP sums
            raise AssertionError("no setup error")

        _record(out_dir, f"mismatch-{case}", check)
    dist.destroy_process_group()


def empty_rank(rank: int, world: int, store: str, out_dir: str) -> None:
    """A rank with no tokens joins the collectives (no lone error that leaves the others hanging):
    the layer equals one process on the other ranks' tokens, and validation splits its windows
    unevenly over the ranks instead of dropping some, so it equals the single-process value."""
    from moekit.config import LMConfig, TrainConfig
    from moekit.data import TokenData
    from moekit.models import MoETransformer
    from moekit.train.trainer import evaluate

    init(rank, world, store, timeout_s=20)
    sizes = [7] + [0] * (world - 1)
    for name, kw in (
        ("capacity", dict(capacity_factor=1.0, overflow="reroute")),
        ("expert_choice", dict(router="expert_choice")),
    ):

        def layer():
            torch.manual_seed(1)
            cfg = MoEConfig(
                dim=8, hidden_dim=4, num_experts=4, top_k=2, router_dtype="float64", balance_loss_weight=0.1, **kw
            )
            ref = MoE(cfg).double()
            moe = MoE(cfg).double()
            moe.load_state_dict(ref.state_dict())
            x = torch.randn(sum(sizes), 8, dtype=torch.float64)
            r = ref(x)
            (r.out.sum() / world + r.aux_loss).backward()
            apply_expert_parallel(moe, expert_parallel=world)
            lo = sum(sizes[:rank])
            o = moe(x[lo : lo + sizes[rank]])
            assert o.out.shape == (sizes[rank], 8)
            ((o.out.sum() + o.aux_loss) / world).backward()  # this rank's term; FSDP sums
            close(o.out, r.out[lo : lo + sizes[rank]], "output")
            close(o.aux_loss, r.aux_loss, "aux loss")
            assert torch.equal(o.stats["tokens_per_expert"], r.stats["tokens_per_expert"])
            close(moe.router.linear.weight.grad.full_tensor(), ref.router.linear.weight.grad, "router gradient")
            close(moe.experts.w_up.grad.full_tensor(), ref.experts.w_up.grad, "expert gradient")

        _record(out_dir, f"empty-{name}", layer)

    def validation():
        moe_cfg = MoEConfig(
            dim=16, hidden_dim=8, num_experts=4, top_k=1, renormalize=False, capacity_factor=1.0, router_dtype="float64"
        )
        torch.manual_seed(2)
        ref = MoETransformer(
            LMConfig(vocab_size=32, dim=16, n_layers=1, n_heads=2, max_seq_len=8, moe=moe_cfg)
        ).double()
        model = MoETransformer(
            LMConfig(vocab_size=32, dim=16, n_layers=1, n_heads=2, max_seq_len=8, moe=moe_cfg)
        ).double()
        model.load_state_dict(ref.state_dict())
        h = apply_expert_parallel(model, expert_parallel=world)
        g = torch.Generator().manual_seed(0)
        val = torch.randint(0, 32, (60,), generator=g)
        data = TokenData(
            None,
            ["prose", "code"],
            val,
            torch.zeros(60, dtype=torch.uint8),
            val,
            (torch.arange(60) % 3 == 0).to(torch.uint8),
            "test",
        )
        cfg = TrainConfig(batch_size=4, seq_len=8, eval_windows=5)  # batches of 4 and 1 windows
        want = evaluate(ref, data, cfg, torch.device("cpu"))
        got = evaluate(model, data, cfg, torch.device("cpu"), parallel=h)
        assert got.keys() == want.keys(), (got.keys(), want.keys())
        for k in want:
            if k.startswith("val_loss"):
                assert abs(got[k] - want[k]) < 1e-6, (k, got[k], want[k])
        assert got["val_tokens_per_expert"] == want["val_tokens_per_expert"]

    _record(out_dir, "empty-validation", validation)
    dist.destroy_process_group()


def accumulation(rank: int, world: int, store: str, out_dir: str, ep: int, sync_each: bool = False) -> None:
    """Gradient accumulation: a backward per micro-batch, FSDP reducing the gradients after every
    one (``sync_each``) or only after the last (``set_requires_gradient_sync(False)`` before the
    others), equals one process accumulating the same global micro-batches."""
    init(rank, world, store, timeout_s=20)

    def check():
        torch.manual_seed(0)
        cfg = MoEConfig(
            dim=8,
            hidden_dim=4,
            num_experts=4,
            top_k=2,
            capacity_factor=1.0,
            router_dtype="float64",
            balance_loss_weight=0.1,
        )
        ref = MoE(cfg).double()
        moe = MoE(cfg).double()
        moe.load_state_dict(ref.state_dict())
        apply_expert_parallel(moe, expert_parallel=ep)
        micro = [torch.randn(world * 5, 8, dtype=torch.float64) for _ in range(2)]
        for i, x in enumerate(micro):
            r = ref(x)
            ((r.out**2).sum() / (world * 2) + r.aux_loss / 2).backward()
            moe.set_requires_gradient_sync(sync_each or i == len(micro) - 1)
            o = moe(x[rank * 5 : rank * 5 + 5])
            (((o.out**2).sum() / 2 + o.aux_loss / 2) / world).backward()
        mine = dict(moe.named_parameters())
        for name, p in ref.named_parameters():
            close(mine[name].grad.full_tensor(), p.grad, f"gradient of {name}")

    _record(out_dir, f"accumulation-{ep}{'-each' if sync_each else ''}", check)
    dist.destroy_process_group()


def other_layers_data_parallel(rank: int, world: int, store: str, out_dir: str) -> None:
    """SoftMoE, HierarchicalMoE and MultiGateMoE as the model itself, data parallel (EP=1, FSDP over
    the ranks): every parameter's gradient equals one process's on the global batch. (A root layer
    whose output FSDP cannot see into gets no gradient reduction at all.)"""
    from moekit import HierarchicalMoE, MultiGateMoE, SoftMoE

    init(rank, world, store, timeout_s=30)
    cases = {
        "soft": (lambda: SoftMoE(8, 8, 4, 1), lambda: torch.randn(2 * world, 5, 8, dtype=torch.float64)),
        "hierarchical": (lambda: HierarchicalMoE(8, 8, 2, 2), lambda: torch.randn(4 * world, 8, dtype=torch.float64)),
        "multigate": (lambda: MultiGateMoE(8, 8, 3, 2, 4), lambda: torch.randn(4 * world, 8, dtype=torch.float64)),
    }
    for name, (build, data) in cases.items():

        def check(build=build, data=data):
            torch.manual_seed(0)
            ref, model = build().double(), build().double()
            model.load_state_dict(ref.state_dict())
            x = data()
            n = x.shape[0] // world

            def loss(m, xs):  # (task loss, auxiliary loss)
                res = m(xs)
                outs = res.outs if hasattr(res, "outs") else [res.out]
                return sum(o.square().mean() for o in outs), res.aux_loss

            (sum(sum(loss(ref, x[q * n : (q + 1) * n])) for q in range(world)) / world).backward()
            h = apply_expert_parallel(model, expert_parallel=1)
            task, aux = loss(model, x[rank * n : (rank + 1) * n])
            (task / world + h.aux_share(aux)).backward()  # this rank's term; FSDP sums
            mine = dict(model.named_parameters())
            for pname, p in ref.named_parameters():
                g = mine[pname].grad
                assert g is not None, f"{pname}: no gradient"
                close(g.full_tensor() if hasattr(g, "full_tensor") else g, p.grad, f"{name}: gradient of {pname}")

        _record(out_dir, f"layers-{name}", check)
    dist.destroy_process_group()


def collectives_release_their_tensors(rank: int, world: int, store: str, out_dir: str) -> None:
    """Every collective moekit runs returns only once gloo's worker threads hold none of its
    tensors (a tensor freed last by a worker during interpreter shutdown aborts the process), and
    the object gather equals torch's."""
    from moekit.parallel.collectives import all_gather_objects, run_collective

    init(rank, world, store, timeout_s=20)

    def held(tensors) -> list[int]:
        return [i for i, t in enumerate(tensors) if t._use_count() > 1]

    def check():
        for step in range(60):
            mine = torch.full((3,), float(rank + step))
            every = [torch.empty_like(mine) for _ in range(world)]
            run_collective("gather", dist.all_gather, every, mine)
            assert not held([mine, *every]), f"step {step}: all_gather's tensors still held: {held([mine, *every])}"
            total = mine.clone()
            run_collective("sum", dist.all_reduce, total)
            assert not held([total]), f"step {step}: all_reduce's tensor still held"
            sent, got = torch.arange(4.0) + rank, torch.empty(4)
            run_collective("exchange", dist.all_to_all_single, got, sent)
            assert not held([sent, got]), f"step {step}: all_to_all's tensors still held"
            assert torch.equal(torch.stack(every)[:, 0], torch.arange(world, dtype=torch.float32) + step)
        objects = [None, "x" * (rank * 1000), ("rank", rank, {"nested": [rank] * rank})]
        for obj in objects:
            ours = all_gather_objects("objects", obj)
            theirs = [None] * world
            dist.all_gather_object(theirs, obj)
            assert ours == theirs, (ours, theirs)

    try:
        _record(out_dir, "collectives", check)
    finally:
        dist.destroy_process_group()


def no_gloo_thread_left_at_exit(rank: int, world: int, store: str, out_dir: str) -> None:
    """A data-parallel (FSDP) model, a step, the groups destroyed, the function returns: when the
    interpreter starts to finalize, no gloo worker thread of a group moekit's layout made is left
    (one holding a tensor then aborts the process); only the user's own default group's threads,
    which torch keeps, may be. The check runs at exit after moekit's own exit step (atexit is
    last-in, first-out: it is registered before moekit's)."""
    import atexit

    def gloo_threads() -> list[str]:
        names = sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
        return [n for n in names if n.startswith(("pt_gloo", "gloo"))]

    def threads_at_exit() -> None:
        left = gloo_threads()
        with open(os.path.join(out_dir, f"exit.{rank}"), "w") as f:
            f.write("ok" if len(left) <= len(own) else f"gloo threads alive at exit: {left}; after init: {own}")

    atexit.register(threads_at_exit)
    init(rank, world, store, timeout_s=30)
    torch.ones(1).sum()
    dist.barrier()  # the default group's threads exist now
    own = gloo_threads()
    torch.manual_seed(0)
    model = MoE(MoEConfig(dim=8, hidden_dim=8, num_experts=4, top_k=2)).double()
    apply_expert_parallel(model, expert_parallel=1)
    res = model(torch.randn(6, 8, dtype=torch.float64))
    (res.out.square().mean() + res.aux_loss).backward()
    dist.destroy_process_group()


def experts_raise_once(rank: int, world: int, store: str, out_dir: str) -> None:
    """Experts that raise between the all-to-all hooks (after the rows were dispatched, before they
    were combined), on every rank: the call leaves nothing behind (its received rows are freed,
    not kept by a stale handle), and the next call and its backward equal one process's."""
    import gc
    import weakref

    init(rank, world, store, timeout_s=20)

    def check():
        torch.manual_seed(3)
        cfg = MoEConfig(dim=8, hidden_dim=4, num_experts=4, top_k=2, router_dtype="float64", balance_loss_weight=0.1)
        ref = MoE(cfg).double()
        moe = MoE(cfg).double()
        moe.load_state_dict(ref.state_dict())
        x = torch.randn(12, 8, dtype=torch.float64)
        r = ref(x)
        (r.out.sum() / world + r.aux_loss).backward()
        apply_expert_parallel(moe, expert_parallel=world)
        received = []

        def raise_once(_module, args):  # runs after the all-to-all pre-hook: args[0] are the received rows
            if not received:
                received.append(weakref.ref(args[0]))
                raise RuntimeError("expert failure")

        hook = moe.experts.register_forward_pre_hook(raise_once)
        lo = 12 // world * rank
        x_local = x[lo : lo + 12 // world]
        try:
            moe(x_local)
            raise AssertionError("the experts did not raise")
        except RuntimeError as err:
            assert "expert failure" in str(err), err
        gc.collect()
        assert received and received[0]() is None, "the failed call's received rows are still held (a stale handle)"
        o = moe(x_local)
        ((o.out.sum() + o.aux_loss) / world).backward()  # this rank's term; FSDP sums
        hook.remove()
        close(o.out, r.out[lo : lo + 12 // world], "output")
        close(o.aux_loss, r.aux_loss, "aux loss")
        close(moe.router.linear.weight.grad.full_tensor(), ref.router.linear.weight.grad, "router gradient")
        close(moe.experts.w_up.grad.full_tensor(), ref.experts.w_up.grad, "expert gradient")

    try:
        _record(out_dir, "raise-once", check)
    finally:
        dist.destroy_process_group()


def stage_checkpoints_on_their_own_ranks(rank: int, world: int, store: str, out_dir: str) -> None:
    """Issue 25: each half of 4 ranks (a stage's (dp, ep) slice of a (stage, dp, ep) mesh) saves
    its own model and AdamW state to its own DCP folder at the same time, and loads it back into a
    fresh model on the same ranks: equal to what it saved; one process reads each folder whole.
    (World-scoped, the two saves' collectives met each other.)"""
    from torch.distributed.device_mesh import init_device_mesh

    from moekit.train.distcp import load_distributed, read_full_state, save_distributed

    init(rank, world, store, timeout_s=30)

    def check():
        mesh3 = init_device_mesh("cpu", (2, 1, 2), mesh_dim_names=("stage", "dp", "ep"))
        stage = mesh3.get_local_rank("stage")
        cfg = MoEConfig(dim=8, hidden_dim=4, num_experts=4, top_k=2, balance_loss_weight=0.1)

        def built(seed: int):
            torch.manual_seed(seed)
            moe = MoE(cfg)
            par = apply_expert_parallel(moe, mesh3["dp", "ep"])
            return moe, par, torch.optim.AdamW(moe.parameters(), lr=0.01)

        moe, par, opt = built(20 + stage)
        out = moe(torch.randn(4 + stage, 8))
        (out.out.square().sum() + out.aux_loss).backward()
        opt.step()
        folder = os.path.join(out_dir, f"stage{stage}.dcp")
        save_distributed(folder, moe, opt, par, meta={"stage": stage})
        want, want_opt = par.full_state_dict(), par.full_optimizer_state_dict(opt)
        fresh, fresh_par, fresh_opt = built(99)
        meta, _ = load_distributed(folder, fresh, fresh_opt, fresh_par)
        assert meta == {"stage": stage}, meta
        got, got_opt = fresh_par.full_state_dict(), fresh_par.full_optimizer_state_dict(fresh_opt)
        for k in want:
            assert torch.equal(got[k], want[k]), f"stage {stage}: {k} differs after the load"
        for i, st in want_opt["state"].items():
            for k, v in st.items():
                assert torch.equal(torch.as_tensor(got_opt["state"][i][k]), torch.as_tensor(v)), (stage, i, k)
        whole, _, _, _ = read_full_state(folder)
        for k in want:
            assert torch.equal(whole[k], want[k]), f"stage {stage}: {k} read in one process differs"

    _record(out_dir, "stage-checkpoints", check)
    dist.destroy_process_group()
