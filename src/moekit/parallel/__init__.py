"""Expert parallelism (all-to-all token dispatch) combined with data parallelism, on torch.distributed."""

from .collectives import ExpertParallelError
from .dispatch import ExpertAllToAll
from .expert_parallel import ExpertParallel, apply_expert_parallel, parallelize
from .mesh import barrier, init_distributed, make_mesh

__all__ = [
    "ExpertAllToAll",
    "ExpertParallel",
    "ExpertParallelError",
    "apply_expert_parallel",
    "barrier",
    "init_distributed",
    "make_mesh",
    "parallelize",
]
