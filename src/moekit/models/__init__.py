"""MoE models built from moekit layers."""

from ..config import LMConfig
from .lm import PRESETS, KVCache, LMOutput, MoETransformer

__all__ = ["LMConfig", "LMOutput", "MoETransformer", "KVCache", "PRESETS"]
