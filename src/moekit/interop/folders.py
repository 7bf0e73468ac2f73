"""Hugging Face checkpoint folders on disk: telling one from a moekit run folder, and its tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Union

from .._io import read_json
from ..data.tokenizer import Tokenizer, load_tokenizer


def is_hf_folder(path: Union[str, Path]) -> bool:
    """A Hugging Face checkpoint folder (config.json with a model_type), not a moekit run."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        obj = read_json(cfg)
    except ValueError:  # not JSON (random bytes included): not a Hugging Face folder; the run reader names it
        return False
    return isinstance(obj, dict) and "model_type" in obj


def hf_tokenizer(path: Union[str, Path]) -> Tokenizer:
    """The fast-tokenizer file (``tokenizer.json``) of a Hugging Face checkpoint folder."""
    tok_file = Path(path) / "tokenizer.json"
    if not tok_file.is_file():
        raise FileNotFoundError(f"{path} has no tokenizer.json (moekit reads Hugging Face fast-tokenizer files)")
    return load_tokenizer(tok_file)
