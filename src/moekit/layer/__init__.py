"""The MoE layer, one module per stage of the data path."""

from .dispatch import DispatchPlan, apply_capacity, combine, dispatch, expert_capacity, plan_dispatch, undispatch
from .experts import FeedForward, GroupedExperts, ModuleListExperts
from .hierarchical import HierarchicalMoE
from .moe import MoE, MoEFeedForward, MoEOutput, after_optimizer_step, aux_loss
from .multigate import MultiGateMoE, MultiGateOutput
from .router import ROUTERS, Router, Routing, build_router
from .soft import SoftMoE, SoftMoEOutput

__all__ = [
    "MoE",
    "MoEOutput",
    "MoEFeedForward",
    "aux_loss",
    "after_optimizer_step",
    "Router",
    "Routing",
    "ROUTERS",
    "build_router",
    "FeedForward",
    "GroupedExperts",
    "ModuleListExperts",
    "DispatchPlan",
    "plan_dispatch",
    "dispatch",
    "combine",
    "undispatch",
    "apply_capacity",
    "expert_capacity",
    "SoftMoE",
    "SoftMoEOutput",
    "MultiGateMoE",
    "MultiGateOutput",
    "HierarchicalMoE",
]
