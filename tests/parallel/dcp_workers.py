"""Workers for test_distributed_checkpoint.py: sharded (DCP) checkpoints in real gloo process
groups, and a process that saves in a loop until the test kills it (spawned processes import this
module by name, so it must not be a test module itself)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

import torch
import torch.distributed as dist
from ep_workers import _lm_cfg, init

from moekit.config import LMConfig
from moekit.models import MoETransformer
from moekit.parallel import apply_expert_parallel
from moekit.train.checkpoint import CheckpointError
from moekit.train.distcp import MANIFEST, load_distributed, save_distributed

# the damaged copies of one good checkpoint, and what loading each must say
CASES = {
    "missing_shard": "is missing the shard file __1_0.distcp",
    "truncated_shard": "the shard file __0_0.distcp has",
    "flipped_byte": "does not match its SHA-256 checksum",
    "no_manifest": "is incomplete: it has no moekit.json",
    "other_model": "does not fit this model",
    "no_folder": "no checkpoint at",
}


def _one_step(model, h, opt, world: int, rank: int) -> None:
    torch.manual_seed(5)
    idx = torch.randint(0, 64, (2 * world, 12))
    o = model(idx[2 * rank : 2 * rank + 2], idx[2 * rank : 2 * rank + 2])
    h.loss(o).backward()
    opt.step()


def optimizer_item(path: str, rank: int) -> tuple[str, dict]:
    """(key, manifest entry) of the largest optimizer item that ``rank`` wrote."""
    items = json.loads(open(os.path.join(path, MANIFEST)).read())["items"]
    mine = [(k, v) for k, v in items.items() if k.startswith("optim.") and v["file"] == f"__{rank}_0.distcp"]
    return max(mine, key=lambda kv: kv[1]["length"])


def damage(good: str, out_dir: str) -> None:
    """Make the damaged copies of ``good`` (one process)."""
    for case in ("missing_shard", "truncated_shard", "flipped_byte", "no_manifest"):
        shutil.copytree(good, os.path.join(out_dir, case))
    os.unlink(os.path.join(out_dir, "missing_shard", "__1_0.distcp"))
    f = os.path.join(out_dir, "truncated_shard", "__0_0.distcp")
    os.truncate(f, os.path.getsize(f) // 2)
    _, item = optimizer_item(good, 1)  # a byte inside an optimizer tensor: the model alone still loads
    with open(os.path.join(out_dir, "flipped_byte", item["file"]), "r+b") as fh:
        pos = item["offset"] + item["length"] - 64
        fh.seek(pos)
        b = fh.read(1)
        fh.seek(pos)
        fh.write(bytes([b[0] ^ 0xFF]))
    os.unlink(os.path.join(out_dir, "no_manifest", MANIFEST))


def bad_checkpoints(rank: int, world: int, store: str, out_dir: str) -> None:
    """Each damaged checkpoint is a CheckpointError naming it on every rank, quickly (no rank waits
    in a collective for another); the process group still works afterwards."""
    init(rank, world, store, timeout_s=60)
    torch.manual_seed(0)
    model = MoETransformer(_lm_cfg()).double()
    h = apply_expert_parallel(model, expert_parallel=world)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _one_step(model, h, opt, world, rank)
    good = os.path.join(out_dir, "good")
    save_distributed(good, model, opt, h, rng={"torch": torch.get_rng_state()}, meta={"step": 1})
    other = MoETransformer(LMConfig.from_dict({**_lm_cfg().to_dict(), "vocab_size": 96, "n_layers": 3})).double()
    save_distributed(
        os.path.join(out_dir, "other_model"), other, None, apply_expert_parallel(other, expert_parallel=world)
    )
    if rank == 0:
        damage(good, out_dir)
    dist.barrier()
    for case in CASES:
        path = os.path.join(out_dir, case)
        m = MoETransformer(_lm_cfg()).double()
        hh = apply_expert_parallel(m, expert_parallel=world, sync_init=False)
        mo = torch.optim.AdamW(m.parameters(), lr=1e-2)
        t0 = time.perf_counter()
        try:
            load_distributed(path, m, mo, hh)
            msg = "no error"
        except CheckpointError as err:
            msg = f"CheckpointError after {time.perf_counter() - t0:.1f}s: {err}"
        except Exception as err:  # noqa: BLE001 - recorded for the test to show
            msg = f"{type(err).__name__}: {err}"
        with open(os.path.join(out_dir, f"{case}.{rank}"), "w") as f:
            f.write(msg)
    # the group is still in step: a good load works and equals the saved model
    m = MoETransformer(_lm_cfg()).double()
    hh = apply_expert_parallel(m, expert_parallel=world, sync_init=False)
    load_distributed(good, m, None, hh, rng=False)
    ok = all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), model.state_dict().values()))
    with open(os.path.join(out_dir, f"after.{rank}"), "w") as f:
        f.write("ok" if ok else "the good checkpoint loaded different tensors")
    dist.barrier()
    dist.destroy_process_group()


def mixtral_cfg() -> LMConfig:
    from moekit import MoEConfig

    return LMConfig(
        vocab_size=64,
        dim=32,
        n_layers=2,
        n_heads=4,
        max_seq_len=16,
        moe=MoEConfig(dim=32, hidden_dim=16, num_experts=4, top_k=2),
    )


def save_mixtral(rank: int, world: int, store: str, sub_dir: str) -> None:
    """An EP=2 Mixtral-like model (rank 0's initialisation, seed 0) saved as a sub-run's checkpoint.dcp."""
    init(rank, world, store)
    torch.manual_seed(0)
    model = MoETransformer(mixtral_cfg())
    h = apply_expert_parallel(model, expert_parallel=world)
    save_distributed(os.path.join(sub_dir, "checkpoint.dcp"), model, None, h, meta={"step": 0, "label": "moe"})
    dist.destroy_process_group()


def _fsdp_model():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(3)
    model = MoETransformer(_lm_cfg()).double()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def fsdp_round_trip(rank: int, world: int, store: str, out_dir: str) -> None:
    """A model whose parameters are DTensors already (FSDP2, sharded over all ranks): saved as it
    is, reloaded into the same layout exactly (optimizer state staying DTensors), and its full
    tensors written for the test to compare with a one-process load."""
    from types import SimpleNamespace

    init(rank, world, store)
    model = _fsdp_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(1)
    idx = torch.randint(0, 64, (2, 12))
    o = model(idx, idx)
    (o.loss + o.aux_loss).backward()
    opt.step()
    par = SimpleNamespace(ep_size=1)  # no expert parallelism: only what DCP needs
    path = os.path.join(out_dir, "fsdp")
    save_distributed(path, model, opt, par, meta={"step": 1})
    model2 = _fsdp_model()
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    load_distributed(path, model2, opt2, par)
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(_local(a), _local(b)), k
    sa, sb = opt.state_dict()["state"], opt2.state_dict()["state"]
    for i, st in sa.items():
        for k, v in st.items():
            assert type(v) is type(sb[i][k]) and torch.equal(_local(v), _local(sb[i][k])), (i, k)
    full = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
    if rank == 0:
        torch.save(full, os.path.join(out_dir, "fsdp-full.pt"))
    dist.barrier()
    dist.destroy_process_group()


def meta_mesh_refused(rank: int, world: int, store: str, out_dir: str) -> None:
    """A (dp, ep) mesh made for the ``meta`` device cannot hold the sharded parameters (FSDP and
    the checkpoints need the device they will live on): a clear error on every rank at setup."""
    from moekit.parallel import make_mesh

    init(rank, world, store)
    with torch.device("meta"):
        model = MoETransformer(_lm_cfg())
    try:
        apply_expert_parallel(model, make_mesh(world, "meta"))
        raise AssertionError("a meta mesh must be refused")
    except ValueError as err:
        assert "mesh" in str(err) and "'meta'" in str(err), err
    dist.destroy_process_group()


def save_forever(path: str) -> None:
    """One process: save the tiny model with every weight equal to the step, step after step,
    printing each step once its save has returned, until killed."""
    torch.set_num_threads(1)
    model = MoETransformer(_lm_cfg())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)).loss.backward()
    opt.step()
    step = 0
    while True:
        step += 1
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float(step))
        save_distributed(path, model, opt, None, rng={"torch": torch.get_rng_state()}, meta={"step": step})
        print(step, flush=True)


if __name__ == "__main__":
    save_forever(sys.argv[1])


def per_rank_statistics(rank: int, world: int, store: str, out_dir: str, statistics: str) -> None:
    """With routing statistics kept per rank (``statistics="local"``), each rank's ``expert_usage``
    and ``steps_unused`` differ; a sharded save and load must give each rank back its own (a
    resumed run then equals an uninterrupted one), and a one-process load reads rank 0's."""
    from moekit.parallel import make_mesh

    init(rank, world, store)
    torch.manual_seed(0)
    model = MoETransformer(_lm_cfg()).double()
    par = apply_expert_parallel(model, make_mesh(1, "cpu"), statistics=statistics)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(100 + rank)  # each rank its own tokens: its own statistics
    for _ in range(3):
        idx = torch.randint(0, 64, (2, 12))
        o = model(idx, idx)
        par.loss(o).backward()
        opt.step()
        opt.zero_grad()
        for m in model.moe_layers:
            m.after_optimizer_step()
    mine = {k: v.clone() for k, v in model.state_dict().items() if k.endswith(("expert_usage", "steps_unused"))}
    assert mine
    path = os.path.join(out_dir, "stats")
    save_distributed(path, model, opt, par, meta={"step": 3})
    torch.manual_seed(0)
    model2 = MoETransformer(_lm_cfg()).double()
    par2 = apply_expert_parallel(model2, make_mesh(1, "cpu"), statistics=statistics)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    load_distributed(path, model2, opt2, par2)
    got = model2.state_dict()
    for k, v in mine.items():
        assert torch.equal(got[k], v), f"rank {rank}: {k} is not this rank's after the round trip"
    if rank == 0:
        torch.save(mine, os.path.join(out_dir, "stats-rank0.pt"))
    flat = torch.cat([v.double().reshape(-1) for v in mine.values()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    if rank == 0 and statistics == "local":
        assert not torch.equal(gathered[0], gathered[1]), "the ranks' statistics should differ in this test"
    dist.barrier()
    dist.destroy_process_group()
