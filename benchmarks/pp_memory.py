"""Peak memory per process of one training step: one process against pipeline stages, tensor
parallelism (``--tensor-parallel``: all ranks one TP group) and, for scale, FSDP2 data parallelism
on the same global batch (``--data-parallel``).

    PYTHONPATH=src python benchmarks/pp_memory.py                                   # one process
    PYTHONPATH=src OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 benchmarks/pp_memory.py
    PYTHONPATH=src OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 4 benchmarks/pp_memory.py
    PYTHONPATH=src OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 benchmarks/pp_memory.py --tensor-parallel
    PYTHONPATH=src OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 benchmarks/pp_memory.py --data-parallel

The model (8 layers, width 512, 16 SwiGLU experts of 256, top-2, vocabulary 8192, untied
embeddings: ~62 M parameters) is built on the meta device and materialised (a pipeline stage:
only its part, with the one-process values), then one AdamW step on a batch of 8 x 256 tokens
(the stages: 4 microbatches, 1F1B). Each process prints one JSON line: its rank, its parameters,
and its peak resident memory (``ru_maxrss``) after the step.
"""

from __future__ import annotations

import json
import os
import resource
import sys

import torch

from moekit import MoEConfig
from moekit.config import LMConfig
from moekit.models import MoETransformer

CFG = LMConfig(
    vocab_size=8192,
    dim=512,
    n_layers=8,
    n_heads=8,
    max_seq_len=256,
    tie_embeddings=False,
    moe=MoEConfig(dim=512, hidden_dim=256, num_experts=16, top_k=2),
)


def main() -> None:
    torch.manual_seed(0)
    idx, tgt = torch.randint(0, CFG.vocab_size, (8, 256)), torch.randint(0, CFG.vocab_size, (8, 256))
    with torch.device("meta"):
        model = MoETransformer(CFG)
    if "--tensor-parallel" in sys.argv or "--data-parallel" in sys.argv:
        from moekit.parallel import init_distributed, parallelize

        rank, world, _ = init_distributed()
        tp = world if "--tensor-parallel" in sys.argv else 1  # TP: every rank reads the whole batch
        handle = parallelize(model, expert_parallel=1, tensor_parallel=tp)
        if tp == 1:  # FSDP2 data parallelism: each rank its rows of the same global batch
            idx, tgt = idx.chunk(world)[rank], tgt.chunk(world)[rank]
        model.materialize_("cpu")
        params = [p.to_local() for p in model.parameters()]
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        handle.loss(model(idx, tgt)).backward()
    elif "WORLD_SIZE" in os.environ:
        from moekit.parallel import LMPipeline, init_distributed, pipeline_stage

        rank, world, _ = init_distributed()
        stage = pipeline_stage(model, rank, world, 4)
        stage.model.materialize_("cpu")
        pipe = LMPipeline(stage, rank, world, 4)
        params = list(stage.parameters())
        opt = torch.optim.AdamW(params, lr=1e-3)
        pipe.step(idx if rank == 0 else None, tgt if rank > 0 else None)
    else:
        rank, world = 0, 1
        model.materialize_("cpu")
        params = list(model.parameters())
        opt = torch.optim.AdamW(params, lr=1e-3)
        out = model(idx, tgt)
        (out.loss + out.aux_loss).backward()
    opt.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    row = dict(rank=rank, world=world, params=sum(p.numel() for p in params), peak_rss=peak)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
