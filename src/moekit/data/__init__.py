"""Embedded corpora, tokenizers and token streams."""

from .corpus import Document, embedded_corpus, load_text_path, split_documents
from .stream import TokenData, build_data, covering_windows, fixed_windows, random_batches, window
from .tokenizer import BPETokenizer, ByteTokenizer, load_tokenizer

__all__ = [
    "Document",
    "embedded_corpus",
    "load_text_path",
    "split_documents",
    "TokenData",
    "build_data",
    "random_batches",
    "fixed_windows",
    "covering_windows",
    "window",
    "BPETokenizer",
    "ByteTokenizer",
    "load_tokenizer",
]
