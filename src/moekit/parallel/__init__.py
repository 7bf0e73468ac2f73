"""Expert parallelism (all-to-all token dispatch) combined with data parallelism, on torch.distributed."""
from .expert_parallel import (
    AllToAllDispatcher,
    ExpertParallel,
    ExpertParallelError,
    apply_expert_parallel,
    barrier,
    init_distributed,
    make_mesh,
)

__all__ = ["AllToAllDispatcher", "ExpertParallel", "ExpertParallelError", "apply_expert_parallel", "barrier", "init_distributed", "make_mesh"]
