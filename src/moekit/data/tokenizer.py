"""Tokenizers that need no download: raw bytes, or a small byte-level BPE (Sennrich et al. 2016)
trained locally with the ``tokenizers`` library and cached by corpus fingerprint."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Union

from .._io import atomic_write_text, read_json

EOS = "<|eos|>"
OTHER_EOS = ("</s>", "<|endoftext|>", "<|im_end|>", "<eos>", "<|end_of_text|>")  # Hugging Face tokenizers


class ByteTokenizer:
    """UTF-8 bytes 0..255 plus an end-of-document token 256."""

    kind = "bytes"

    def __init__(self) -> None:
        self.vocab_size = 257
        self.eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def token_str(self, i: int) -> str:
        return "<eos>" if i == 256 else bytes([i]).decode("latin-1")

    def save(self, path: Union[str, Path]) -> None:
        atomic_write_text(Path(path), json.dumps({"kind": "bytes"}))


class BPETokenizer:
    """A byte-level BPE trained on the corpus itself (deterministic for a given corpus), or any
    ``tokenizers`` tokenizer such as a Hugging Face checkpoint's ``tokenizer.json``."""

    kind = "bpe"

    def __init__(self, tok) -> None:
        self.tok = tok
        self.vocab_size = tok.get_vocab_size()
        self.eos_id = next((tok.token_to_id(t) for t in (EOS, *OTHER_EOS) if tok.token_to_id(t) is not None), None)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS],
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([int(i) for i in ids if int(i) != self.eos_id], skip_special_tokens=False)

    def token_str(self, i: int) -> str:
        return self.tok.decode([int(i)]) if int(i) != self.eos_id else "<eos>"

    def save(self, path: Union[str, Path]) -> None:
        atomic_write_text(Path(path), self.tok.to_str())


Tokenizer = Union[ByteTokenizer, BPETokenizer]


def load_tokenizer(path: Union[str, Path]) -> Tokenizer:
    """The tokenizer saved at ``path``: ``{"kind": "bytes"}`` or a ``tokenizers`` JSON (a trained BPE,
    a Hugging Face ``tokenizer.json``). ValueError naming the file when it is neither."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    obj = read_json(path)  # ValueError naming the file when it is not JSON
    if isinstance(obj, dict) and obj.get("kind") == "bytes":
        return ByteTokenizer()
    from tokenizers import Tokenizer as HFTokenizer

    try:
        if not isinstance(obj, dict) or "model" not in obj:
            raise ValueError("no 'model' entry")
        tok = HFTokenizer.from_str(path.read_text(encoding="utf-8"))
    except Exception as err:  # noqa: BLE001 - the tokenizers library raises plain Exception
        reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise ValueError(
            f'tokenizer file {path} is invalid: expected {{"kind": "bytes"}} or a tokenizers JSON '
            f"with a model ({reason})"
        ) from None
    return BPETokenizer(tok)
