"""Pipeline parallelism in real gloo process groups, run by test_pipeline.py (spawned processes
import this module by name, so it must not be a test module itself). Each rank writes "ok" or
what went wrong to ``out_dir/<case>.<rank>``."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from ep_edge_workers import _record
from ep_workers import full, init

from moekit import MoEConfig
from moekit.config import LMConfig
from moekit.models import MoETransformer
from moekit.parallel.pipeline import LMPipeline, pipeline_stage


def _config(tie: bool = False) -> LMConfig:
    moe = MoEConfig(dim=32, hidden_dim=24, num_experts=4, top_k=2, balance_loss_weight=0.1, z_loss_weight=0.01)
    return LMConfig(
        vocab_size=50, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=16, tie_embeddings=tie, moe=moe
    )


def pipeline_equals_accumulation(
    rank: int, world: int, store: str, out_dir: str, schedule: str, tie: bool = False
) -> None:
    """Issue 25, item 11: ``world`` stages over 4 microbatches (1F1B or GPipe): every stage's
    gradients, its routing statistics and the last stage's loss equal one process accumulating
    the same microbatches (float64; masked targets; auxiliary losses on every stage); so do the
    gradients clipped by the whole model's norm and a forward-only evaluation's loss. ``tie``:
    with the input embedding tied to the output projection (held by the first and last stage)."""
    init(rank, world, store, timeout_s=60)

    def check():
        torch.manual_seed(0)
        ref = MoETransformer(_config(tie)).double()
        model = copy.deepcopy(ref)
        M = 4
        idx = torch.randint(0, 50, (8, 12))
        tgt = torch.randint(0, 50, (8, 12))
        tgt[torch.rand(8, 12) < 0.3] = -100  # unequal counts per microbatch
        n = (tgt != -100).sum()
        total = 0.0
        for i_mb, t_mb in zip(idx.chunk(M), tgt.chunk(M)):  # the reference: accumulation
            out = ref(i_mb, t_mb)
            loss = out.loss_sum / n
            (loss + out.aux_loss / M).backward()
            total += float(loss)
        stage = pipeline_stage(model, rank, world, M)
        pipe = LMPipeline(stage, rank, world, M, schedule=schedule)
        got = pipe.step(idx if rank == 0 else None, tgt if rank > 0 else None)  # the middle ones: the shape
        if rank == world - 1:
            assert got is not None and abs(float(got) - total) < 1e-6 * total, (float(got), total)  # float32 CE
        ref_params = dict(ref.named_parameters())
        names = [n for n, _ in stage.named_parameters()]
        assert names, "the stage holds no parameters"
        for name, p in stage.named_parameters():
            want = ref_params[name.removeprefix("model.")].grad
            assert p.grad is not None, f"stage {rank}: {name} got no gradient"
            torch.testing.assert_close(p.grad, want, rtol=1e-10, atol=1e-12, msg=f"stage {rank}: {name}")
        ref_buffers = dict(ref.named_buffers())
        for name, b in stage.named_buffers():
            if name.endswith("expert_usage"):
                torch.testing.assert_close(b, ref_buffers[name.removeprefix("model.")], msg=f"stage {rank}: {name}")

        # clipping by the whole model's norm, then a forward-only evaluation, as one process
        want_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
        norm = pipe.clip_grad_norm_(0.05)
        assert abs(float(norm) - float(want_norm)) < 1e-6 * float(want_norm), (float(norm), float(want_norm))
        for name, p in stage.named_parameters():
            want = ref_params[name.removeprefix("model.")].grad
            torch.testing.assert_close(p.grad, want, rtol=1e-6, atol=1e-9, msg=f"stage {rank}: {name} clipped")
        idx2, tgt2 = torch.randint(0, 50, (8, 12)), torch.randint(0, 50, (8, 12))
        tgt2[:, :3] = -100
        ev = pipe.evaluate(idx2 if rank == 0 else None, tgt2 if rank > 0 else None)
        with torch.no_grad():
            want_ev = float(ref.eval()(idx2, tgt2).loss)
        if rank == world - 1:
            assert ev is not None and abs(float(ev) - want_ev) < 1e-6 * want_ev, (float(ev), want_ev)
        assert stage.training  # evaluate puts the stage back in training mode

    _record(out_dir, f"pipeline-{schedule}{'-tied' if tie else ''}", check)
    dist.destroy_process_group()


def pipeline_checkpoint(rank: int, world: int, store: str, out_dir: str, tie: bool = False) -> None:
    """Every stage saves its part of the model and of AdamW's state into one DCP folder: a fresh
    pipeline (other initial weights) loads its stage back exactly, and one process reads the
    folder as the whole model and optimizer one process has after the same step."""
    import os

    from moekit.train.distcp import load_distributed, read_full_state, save_distributed

    init(rank, world, store, timeout_s=60)

    def check():
        def built(seed: int):
            torch.manual_seed(seed)
            full = MoETransformer(_config(tie)).double()
            ref = copy.deepcopy(full)
            stage = pipeline_stage(full, rank, world, 4)
            pipe = LMPipeline(stage, rank, world, 4)
            return ref, stage, pipe, torch.optim.AdamW(stage.parameters(), lr=0.01)

        ref, stage, pipe, opt = built(0)
        ref_opt = torch.optim.AdamW(ref.parameters(), lr=0.01)
        idx, tgt = torch.randint(0, 50, (8, 12)), torch.randint(0, 50, (8, 12))
        pipe.step(idx if rank == 0 else None, tgt if rank > 0 else None)
        opt.step()
        n = (tgt != -100).sum()
        for i_mb, t_mb in zip(idx.chunk(4), tgt.chunk(4)):
            out = ref(i_mb, t_mb)
            (out.loss_sum / n + out.aux_loss / 4).backward()
        ref_opt.step()
        folder = os.path.join(out_dir, f"pp{int(tie)}.dcp")
        save_distributed(folder, stage.model, opt, pipe, meta={"step": 1})
        _, fresh, fresh_pipe, fresh_opt = built(7)
        load_distributed(folder, fresh.model, fresh_opt, fresh_pipe)
        for (name, a), b in zip(stage.model.state_dict().items(), fresh.model.state_dict().values()):
            assert torch.equal(a, b), f"stage {rank}: {name} differs after the load"
        for p, q in zip(stage.parameters(), fresh.parameters()):
            for k, v in opt.state[p].items():
                assert torch.equal(torch.as_tensor(v), torch.as_tensor(fresh_opt.state[q][k])), (rank, k)
        if rank == 0:
            whole, opt_sd, _, meta = read_full_state(folder)
            assert meta == {"step": 1}
            for name, t in ref.state_dict().items():
                torch.testing.assert_close(whole[name], t, rtol=1e-10, atol=1e-12, msg=name)
            want = ref_opt.state_dict()
            assert opt_sd is not None and len(opt_sd["state"]) == len(want["state"])
            for i, st in want["state"].items():
                torch.testing.assert_close(opt_sd["state"][i]["exp_avg"], st["exp_avg"], rtol=1e-10, atol=1e-12)

    _record(out_dir, f"pipeline-checkpoint{'-tied' if tie else ''}", check)
    dist.destroy_process_group()


def pipeline_with_expert_and_data_parallelism(
    rank: int, world: int, store: str, out_dir: str, dp: int, ep: int, tie: bool
) -> None:
    """Issue 25: PP=2 x (DP, EP) on 4 ranks, a ``(pp, dp, ep)`` mesh. Each stage is parallelized
    on its ``(dp, ep)`` slice (experts split over ``ep``, FSDP2 over the slice) and each slice
    position runs its own pipeline over its rows. The loss, every gradient, ``expert_usage`` and
    the clipped gradients equal one process accumulating the global microbatches (float64); so do
    the per-target losses of a forward pass whose rows the pipelines split unevenly (one none).
    ``tie``: the embedding tied to the output projection (its FSDP shards on the first and the
    last stage of each pipeline, their gradients summed)."""

    from moekit.parallel import make_mesh, parallelize_pipeline

    init(rank, world, store, timeout_s=60)

    def check():
        mesh = make_mesh(ep, pipeline_parallel=2)
        s_idx, replica = mesh.get_local_rank("pp"), mesh.get_local_rank("dp") * ep + mesh.get_local_rank("ep")
        cfg = _config(tie)
        cfg.moe.router_dtype = "float64"  # (a fresh config: its router in the model's dtype)
        torch.manual_seed(0)
        ref = MoETransformer(cfg).double()
        model = copy.deepcopy(ref)
        M, R, B = 2, dp * ep, 8  # microbatches per pipeline, pipelines, global rows
        g = torch.Generator().manual_seed(3)
        idx, tgt = torch.randint(0, 50, (B, 12), generator=g), torch.randint(0, 50, (B, 12), generator=g)
        tgt[torch.rand(B, 12, generator=g) < 0.3] = -100
        rows = B // R  # each pipeline's rows, in M microbatches of rows // M
        n, total = (tgt != -100).sum(), 0.0
        for m in range(M):  # the reference: one process on the global microbatches, accumulated
            pick = torch.cat(
                [torch.arange(r * rows + m * (rows // M), r * rows + (m + 1) * (rows // M)) for r in range(R)]
            )
            out = ref(idx[pick], tgt[pick])
            (out.loss_sum / n + out.aux_loss / M).backward()
            total += float(out.loss_sum / n)
        layout = parallelize_pipeline(model, mesh, M)
        stage, handle, pipe = layout.stage, layout.stage_parallel, layout.pipe
        mine = slice(replica * rows, (replica + 1) * rows)
        got = pipe.step(idx[mine] if s_idx == 0 else None, tgt[mine] if s_idx == 1 else None)
        if s_idx == 1:
            assert got is not None
            summed = float(handle.sum(got.reshape(1)))
            assert abs(summed - total) < 1e-6 * total, (summed, total)  # (float32 rotary)
        ref_params = dict(ref.named_parameters())
        names = [n for n, _ in stage.named_parameters()]
        assert names, "the stage holds no parameters"
        for name, p in stage.named_parameters():
            assert p.grad is not None, f"stage {s_idx}: {name} got no gradient"
            want = ref_params[name.removeprefix("model.")].grad
            torch.testing.assert_close(full(p.grad), want, rtol=1e-6, atol=1e-9, msg=f"stage {s_idx}: {name}")
        ref_buffers = dict(ref.named_buffers())
        for name, b in stage.named_buffers():
            if name.endswith("expert_usage"):
                torch.testing.assert_close(full(b), ref_buffers[name.removeprefix("model.")], msg=name)
        want_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
        norm = pipe.clip_grad_norm_(0.05)
        assert abs(float(norm) - float(want_norm)) < 1e-6 * float(want_norm), (float(norm), float(want_norm))
        for name, p in stage.named_parameters():
            want = ref_params[name.removeprefix("model.")].grad
            torch.testing.assert_close(full(p.grad), want, rtol=1e-6, atol=1e-9, msg=f"{name} clipped")

        idx2, tgt2 = torch.randint(0, 50, (3, 12), generator=g), torch.randint(0, 50, (3, 12), generator=g)
        tgt2[:, :2] = -100
        rows2 = slice(0, 3) if replica == 0 else slice(0, 0)  # the other pipelines read nothing
        got2 = pipe.token_losses(idx2[rows2] if s_idx == 0 else None, tgt2[rows2] if s_idx == 1 else None)
        with torch.no_grad():
            logits = ref.eval()(idx2).logits
        want2 = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tgt2.flatten(), reduction="none")
        if s_idx == 1:
            assert got2 is not None and got2.shape == (rows2.stop, 12), got2
            torch.testing.assert_close(got2, want2.view(3, 12)[rows2], rtol=1e-6, atol=1e-9)
        else:
            assert got2 is None

        # FSDP's bf16 compute (param_dtype) of a float32 model: the stages send bf16 activations,
        # told so (they were told the parameters' float32 and read bf16 bytes as float32: nan)
        bf16 = parallelize_pipeline(copy.deepcopy(ref).float().train(), mesh, M, param_dtype=torch.bfloat16)
        got3 = bf16.pipe.step(idx[mine] if s_idx == 0 else None, tgt[mine] if s_idx == 1 else None)
        if s_idx == 1:
            assert got3 is not None
            summed = float(handle.sum(got3.double().reshape(1)))
            assert abs(summed - total) < 0.05 * total, (summed, total)

    _record(out_dir, f"pipeline-dp{dp}-ep{ep}{'-tied' if tie else ''}", check)
    dist.destroy_process_group()
