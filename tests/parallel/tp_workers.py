"""Tensor parallelism in real gloo process groups, run by test_tensor_parallel.py (spawned
processes import this module by name, so it must not be a test module itself). Each rank writes
"ok" or what went wrong to ``out_dir/<case>.<rank>``."""

from __future__ import annotations

import copy
import os

import torch
import torch.distributed as dist
from ep_edge_workers import _record
from ep_workers import full, init
from torch.distributed.tensor import DTensor

from moekit import MoEConfig
from moekit.config import LMConfig
from moekit.models import MoETransformer
from moekit.parallel import parallelize
from moekit.train.distcp import load_distributed, read_full_state, save_distributed


def _config() -> LMConfig:
    """Every kind of map tensor parallelism touches: a dense layer first, then MoE layers with a
    shared expert; grouped-query attention with per-head q/k norms and biases; the balance and z
    losses; an untied head."""
    moe = MoEConfig(
        dim=32,
        hidden_dim=8,
        num_experts=4,
        top_k=2,
        num_shared_experts=1,
        shared_hidden_dim=12,
        router_dtype="float64",
        balance_loss_weight=0.1,
        z_loss_weight=0.01,
    )
    return LMConfig(
        vocab_size=50,
        dim=32,
        n_layers=3,
        n_heads=4,
        n_kv_heads=2,
        max_seq_len=16,
        qk_norm="head",
        attn_bias=True,
        ffn_hidden_dim=20,
        first_dense_layers=1,
        moe=moe,
    )


def _batch():
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 50, (4, 8), generator=g)
    tgt = torch.randint(0, 50, (4, 8), generator=g)
    tgt[torch.rand(4, 8, generator=g) < 0.3] = -100  # unequal counts per rank and position
    return idx, tgt


def equals_one_process(
    rank: int, world: int, store: str, out_dir: str, tp: int, ep: int, ac: str = "none", compiled: bool | str = False
) -> None:
    """Issue 25, item 10: ``tp`` x ``ep`` x (world / tp / ep) ranks (with activation checkpointing
    ``ac`` and each block compiled when ``compiled``). The loss, every gradient, the routing
    statistics, the clipped gradients and an AdamW step equal one process on the whole batch
    (float64), and the full state dict is one process's. A model built on the meta device and
    sharded the same way materialises to the one-process initial values."""
    init(rank, world, store, timeout_s=120 if compiled else 60)

    def check():
        torch.manual_seed(0)
        with torch.device("meta"):
            on_meta = MoETransformer(_config())
        h = parallelize(on_meta, expert_parallel=ep, tensor_parallel=tp)
        on_meta.materialize_("cpu")
        torch.manual_seed(0)
        ref = MoETransformer(_config())
        initial = h.full_state_dict()
        for name, t in ref.state_dict().items():
            assert torch.equal(initial[name], t), f"{name}: the meta-built model's initial value differs"
        ref = ref.double()
        model = copy.deepcopy(ref)
        h = parallelize(model, expert_parallel=ep, tensor_parallel=tp, activation_checkpointing=ac, compile=compiled)
        assert (h.tp_size, h.data_size) == (tp, world // tp)
        sharded = [n for n, p in model.named_parameters() if "tp" in (_full_mesh_names(p))]
        assert any("attn.wq" in n for n in sharded) and any("shared.w_gate" in n for n in sharded), sharded
        idx, tgt = _batch()
        mine = slice(h.data_rank * 4 // h.data_size, (h.data_rank + 1) * 4 // h.data_size)
        out = model(idx[mine], tgt[mine])
        assert out.logits.shape == (4 // h.data_size, 8 // tp, 50)
        loss = h.loss(out)
        loss.backward()
        want = ref(idx, tgt)
        (want.loss + want.aux_loss).backward()
        # (float64 everywhere but the rotary embedding, which runs in float32 as one process's)
        got_loss = float(h.sum(h.global_mean(out.loss_sum, out.n_targets).detach().reshape(1)))
        assert abs(got_loss - float(want.loss)) < 1e-7 * float(want.loss), (got_loss, float(want.loss))
        assert abs(float(out.aux_loss) - float(want.aux_loss)) < 1e-6, (float(out.aux_loss), float(want.aux_loss))
        ref_params = dict(ref.named_parameters())
        for name, p in model.named_parameters():
            assert p.grad is not None, f"{name} got no gradient"
            torch.testing.assert_close(full(p.grad), ref_params[name].grad, rtol=1e-6, atol=1e-9, msg=name)
        ref_buffers = dict(ref.named_buffers())
        for name, b in model.named_buffers():
            if name.endswith("expert_usage"):
                torch.testing.assert_close(full(b), ref_buffers[name], msg=name)
        norm, want_norm = h.clip_grad_norm_(0.05), torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
        assert abs(float(norm) - float(want_norm)) < 1e-6 * float(want_norm), (float(norm), float(want_norm))
        opt, ref_opt = torch.optim.AdamW(model.parameters(), lr=1e-2), torch.optim.AdamW(ref.parameters(), lr=1e-2)
        opt.step()
        ref_opt.step()
        after = h.full_state_dict()
        for name, t in ref.state_dict().items():
            torch.testing.assert_close(after[name], t, rtol=1e-6, atol=1e-9, msg=f"{name} after a step")

    _record(out_dir, f"tp{tp}-ep{ep}-{ac}{'-compiled' if compiled else ''}", check)
    dist.destroy_process_group()


def _full_mesh_names(p) -> tuple:
    return tuple(p.device_mesh.mesh_dim_names or ()) if isinstance(p, DTensor) else ()


def checkpoint_reshards(rank: int, world: int, store: str, out_dir: str) -> None:
    """A DCP checkpoint saved by a TP=2 x EP=2 layout (4 ranks), after a step, loads into an
    EP=4 layout with no tensor parallelism and into TP=2 x DP=2, and one process reads the whole:
    every tensor (optimizer moments included) equals the saved model's."""
    init(rank, world, store, timeout_s=60)
    path = os.path.join(out_dir, "tp.dcp")

    def check():
        torch.manual_seed(0)
        base = MoETransformer(_config()).double()
        model = copy.deepcopy(base)
        h = parallelize(model, expert_parallel=2, tensor_parallel=2)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        idx, tgt = _batch()
        mine = slice(h.data_rank * 2, h.data_rank * 2 + 2)
        h.loss(model(idx[mine], tgt[mine])).backward()
        opt.step()
        want = h.full_state_dict()
        want_opt = h.full_optimizer_state_dict(opt)
        save_distributed(path, model, opt, h, meta={"step": 1})
        for ep, tp in ((4, 1), (1, 2)):
            other = copy.deepcopy(base)
            h2 = parallelize(other, expert_parallel=ep, tensor_parallel=tp)
            opt2 = torch.optim.AdamW(other.parameters(), lr=1e-2)
            load_distributed(path, other, opt2, h2)
            got = h2.full_state_dict()
            for name, t in want.items():
                torch.testing.assert_close(got[name], t, rtol=0, atol=0, msg=f"ep={ep} tp={tp}: {name}")
            got_opt = h2.full_optimizer_state_dict(opt2)
            for i, st in want_opt["state"].items():
                for k, v in st.items():
                    torch.testing.assert_close(got_opt["state"][i][k], v, rtol=0, atol=0, msg=f"moment {i} {k}")
        if rank == 0:
            sd, _opt, _meta, _rng = read_full_state(path)
            for name, t in want.items():
                torch.testing.assert_close(sd[name], t, rtol=0, atol=0, msg=f"one process: {name}")

    _record(out_dir, "tp-dcp", check)
    dist.destroy_process_group()


def refused(rank: int, world: int, store: str, out_dir: str) -> None:
    """Layouts tensor parallelism cannot take fail with the argument named, before any collective
    could hang: heads not divisible, 'full' q/k norms, a sequence not divisible."""
    init(rank, world, store, timeout_s=30)

    def check():
        import dataclasses

        for change, words in (
            ({"n_heads": 2, "n_kv_heads": 1}, "n_kv_heads=1 must be divisible by tensor_parallel=2"),
            ({"qk_norm": "full"}, "qk_norm='full'"),
        ):
            model = MoETransformer(dataclasses.replace(_config(), **change)).double()
            try:
                parallelize(model, expert_parallel=1, tensor_parallel=2)
            except ValueError as e:
                assert words in str(e), str(e)
            else:
                raise AssertionError(f"{change} was accepted")
        try:
            parallelize(MoETransformer(_config()), expert_parallel=1, tensor_parallel=2, compile=True,
                        activation_checkpointing="selective")  # fmt: skip
        except ValueError as e:
            assert "not 'selective'" in str(e), str(e)
        else:
            raise AssertionError("compiled selective checkpointing was accepted under tensor parallelism")
        model = MoETransformer(_config()).double()
        parallelize(model, expert_parallel=1, tensor_parallel=2)
        try:
            model(torch.zeros(2, 7, dtype=torch.long))
        except ValueError as e:
            assert "sequence length 7 must be divisible by tensor_parallel=2" in str(e), str(e)
        else:
            raise AssertionError("a sequence of 7 was split 2 ways")

    _record(out_dir, "tp-refused", check)
    dist.destroy_process_group()
