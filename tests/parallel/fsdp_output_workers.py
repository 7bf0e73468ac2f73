"""Worker run in real gloo process groups by test_fsdp_outputs.py (spawned processes import this
module by name, so it must not be a test module itself)."""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from ep_workers import _lm_cfg, close, init
from torch.distributed.tensor import DTensor

from moekit.layer import after_optimizer_step
from moekit.models import MoETransformer
from moekit.parallel import apply_expert_parallel, make_mesh

VIEW_WARNING = "returned a view tensor"  # FSDP2's warning for each view among a wrapped module's outputs


def steps_without_view_outputs(rank: int, world: int, store: str, ep: int, steps: int) -> None:
    """A few AdamW steps of the LM under expert parallelism + FSDP2 (and of its dense twin, data
    parallel): no FSDP2-wrapped module returns a view, and the logits, each MoE layer's output and
    every parameter's gradient equal the single-process model's on the global batch at every step."""
    init(rank, world, store)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for cfg in (_lm_cfg(), _lm_cfg().dense_twin()):
            torch.manual_seed(3)
            ref = MoETransformer(cfg).double()
            model = MoETransformer(cfg).double()
            model.load_state_dict(ref.state_dict())
            h = apply_expert_parallel(model, make_mesh(ep, "cpu"))
            opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
            ref_params = dict(ref.named_parameters())
            gen = torch.Generator().manual_seed(5)
            B = 2 * world
            rows = slice(rank * 2, rank * 2 + 2)
            for step in range(steps):
                idx, tgt = torch.randint(0, 64, (2, B, 12), generator=gen)
                o_ref = ref(idx, tgt)
                (o_ref.loss + o_ref.aux_loss).backward()
                o = model(idx[rows], tgt[rows])
                h.loss(o).backward()
                views = [str(w.message) for w in caught if VIEW_WARNING in str(w.message)]
                assert not views, f"rank {rank}, step {step}: {len(views)} FSDP2 warnings, e.g. {views[0]}"
                close(o.logits, o_ref.logits[rows], f"step {step}: logits", tol=1e-7)
                for i, (r, r_ref) in enumerate(zip(o.moe, o_ref.moe)):
                    if r is not None:  # what the block returns of the layer's output: read-only, the same values
                        assert not r.out.requires_grad and r.out._base is None
                        close(r.out, r_ref.out[rows], f"step {step}: layer {i} MoE output", tol=1e-7)
                for name, p in model.named_parameters():
                    assert p.grad is not None, name
                    g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
                    close(g, ref_params[name].grad, f"step {step}: gradient of {name}", tol=1e-6)
                for o_, m in ((opt, model), (opt_ref, ref)):
                    o_.step()
                    o_.zero_grad(set_to_none=True)
                    after_optimizer_step(m)
    dist.barrier()
    dist.destroy_process_group()
