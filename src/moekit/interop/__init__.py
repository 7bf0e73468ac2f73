"""Interoperability with other libraries (Hugging Face transformers)."""
from .hf import (SUPPORTED, AcceleratedMoEBlock, SharedWeightExperts, UnsupportedModelError, WeightMismatchError,
                 accelerate, config_from_hf, config_to_hf, export_hf, load_hf)

__all__ = ["load_hf", "export_hf", "accelerate", "config_from_hf", "config_to_hf", "SUPPORTED",
           "UnsupportedModelError", "WeightMismatchError", "AcceleratedMoEBlock", "SharedWeightExperts"]
