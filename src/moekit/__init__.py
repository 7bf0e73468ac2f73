"""moekit: Mixture-of-Experts layers, models and tools for PyTorch."""
__version__ = "0.1.0"
