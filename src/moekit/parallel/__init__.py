"""Expert parallelism (all-to-all token dispatch) combined with data parallelism, and pipeline
parallelism for the language model, on torch.distributed."""

from .collectives import ExpertParallelError
from .dispatch import ExpertAllToAll
from .handle import ExpertParallel
from .mesh import barrier, init_distributed, make_mesh
from .parallelize import apply_expert_parallel, parallelize, parallelize_pipeline
from .pipeline import LMPipeline, PipelineParallel, pipeline_stage

__all__ = [
    "ExpertAllToAll",
    "ExpertParallel",
    "ExpertParallelError",
    "LMPipeline",
    "PipelineParallel",
    "apply_expert_parallel",
    "barrier",
    "init_distributed",
    "make_mesh",
    "parallelize",
    "parallelize_pipeline",
    "pipeline_stage",
]
