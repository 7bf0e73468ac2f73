"""moekit: Mixture-of-Experts layers, models and tools for PyTorch."""

from .config import HierarchicalMoEConfig, MoEConfig, MultiGateMoEConfig, SoftMoEConfig
from .layer import FeedForward, HierarchicalMoE, MoE, MoEFeedForward, MoEOutput, MultiGateMoE, SoftMoE, aux_loss

__version__ = "0.1.0"
__all__ = [
    "MoE",
    "MoEConfig",
    "MoEOutput",
    "MoEFeedForward",
    "aux_loss",
    "FeedForward",
    "__version__",
    "SoftMoE",
    "MultiGateMoE",
    "HierarchicalMoE",
    "SoftMoEConfig",
    "MultiGateMoEConfig",
    "HierarchicalMoEConfig",
]
