"""Interoperability with other libraries (Hugging Face transformers)."""

from .blocks import GptOssExpert, deepseek_v3_moe, gpt_oss_moe
from .folders import hf_tokenizer, is_hf_folder
from .hf import (
    SUPPORTED,
    AcceleratedMoEBlock,
    SharedWeightExperts,
    UnsupportedModelError,
    WeightMismatchError,
    accelerate,
    config_from_hf,
    config_to_hf,
    export_hf,
    load_hf,
)

__all__ = [
    "load_hf",
    "export_hf",
    "accelerate",
    "config_from_hf",
    "config_to_hf",
    "SUPPORTED",
    "UnsupportedModelError",
    "WeightMismatchError",
    "AcceleratedMoEBlock",
    "SharedWeightExperts",
    "deepseek_v3_moe",
    "gpt_oss_moe",
    "GptOssExpert",
    "is_hf_folder",
    "hf_tokenizer",
]
