"""moekit: Mixture-of-Experts layers, models and tools for PyTorch."""
from .config import MoEConfig
from .layer import FeedForward, HierarchicalMoE, MoE, MoEOutput, MultiGateMoE, SoftMoE

__version__ = "0.1.0"
__all__ = ["MoE", "MoEConfig", "MoEOutput", "FeedForward", "__version__", "SoftMoE", "MultiGateMoE", "HierarchicalMoE"]
