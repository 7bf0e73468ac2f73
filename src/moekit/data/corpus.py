"""The embedded corpus: text every Python installation carries, in two real domains.

* prose: the documentation topics of ``pydoc_data.topics`` (the text of ``help('topic')``);
* code: the standard library's own ``.py`` modules (not its tests).

Documents keep their domain so that each token can be traced back to prose or code. The
held-out split is fixed: the last 10% of every document is validation.
``load_text_path`` reads users' own data instead (a text file or a folder of text files).
"""

from __future__ import annotations

import hashlib
import os
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

DOMAINS = ("prose", "code")
TEXT_SUFFIXES = {
    ".txt",
    ".md",
    ".rst",
    ".py",
    ".c",
    ".h",
    ".js",
    ".ts",
    ".java",
    ".go",
    ".rs",
    ".json",
    ".csv",
    ".html",
    ".tex",
    ".yaml",
    ".yml",
    ".toml",
    ".sh",
}


@dataclass(frozen=True)
class Document:
    name: str  # where it came from
    domain: str  # "prose", "code", or the user's folder name
    text: str


def prose_documents() -> list[Document]:
    from pydoc_data.topics import topics

    return [Document(f"pydoc:{k}", "prose", topics[k]) for k in sorted(topics)]


def code_documents(max_chars: int = 6_000_000) -> list[Document]:
    """Standard-library modules (tests and site-packages left out), in a fixed shuffled order
    so that any budget spans the whole library, until ``max_chars`` characters."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
    paths = sorted(p for p in stdlib.rglob("*.py") if not skip & set(p.relative_to(stdlib).parts))
    random.Random(0).shuffle(paths)
    docs, total = [], 0
    for path in paths:
        if total >= max_chars:
            break
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        docs.append(Document(f"stdlib:{path.relative_to(stdlib).as_posix()}", "code", text))
        total += len(text)
    return docs


def embedded_corpus(code_chars: int = 6_000_000) -> list[Document]:
    """Prose and code documents, evenly interleaved so that both domains run through the stream."""
    prose, code = prose_documents(), code_documents(code_chars)
    keyed = [((i + 0.5) / len(prose), d) for i, d in enumerate(prose)] + [
        ((j + 0.5) / len(code), d) for j, d in enumerate(code)
    ]
    return [d for _, d in sorted(keyed, key=lambda kd: kd[0])]


def load_text_path(path: str) -> list[Document]:
    """A text file, or every text file under a folder (domain = the file's top folder name)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--data: no such file or folder: {path}")
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES)
    if not files:
        raise ValueError(f"--data: no text files ({', '.join(sorted(TEXT_SUFFIXES))}) under {path}")
    docs = []
    for f in files:
        rel = f.relative_to(p) if p.is_dir() else Path(f.name)
        domain = rel.parts[0] if len(rel.parts) > 1 else "text"
        docs.append(Document(str(f), domain, _read_text(f)))
    if not any(d.text.strip() for d in docs):
        raise ValueError(f"--data: {path} holds no text (the file{'s are' if len(docs) > 1 else ' is'} empty)")
    return docs


def _read_text(path: Path, max_binary: float = 0.3) -> str:
    """A file's text as UTF-8 (undecodable bytes replaced), with a warning when it looks binary:
    more than ``max_binary`` of its characters are NUL, control or undecodable."""
    import warnings

    text = path.read_text(encoding="utf-8", errors="replace")
    if text:
        bad = sum(1 for c in text if c == "\ufffd" or (ord(c) < 32 and c not in "\n\r\t\f"))
        if bad > max_binary * len(text):
            warnings.warn(
                f"--data: {path} does not look like text ({bad / len(text):.0%} of it is binary or "
                f"undecodable as UTF-8); training on it anyway",
                stacklevel=2,
            )
    return text


def split_documents(docs: list[Document], val_fraction: float = 0.1) -> tuple[list[Document], list[Document]]:
    """Fixed held-out split: the last ``val_fraction`` of every document (cut at a line break)
    is validation, so both splits hold every domain in its true proportions."""
    train, val = [], []
    for d in docs:
        cut = int(len(d.text) * (1 - val_fraction))
        nl = d.text.rfind("\n", 0, cut)
        cut = nl + 1 if nl > cut // 2 else cut
        train.append(Document(d.name, d.domain, d.text[:cut]))
        if cut < len(d.text):
            val.append(Document(d.name + ":val", d.domain, d.text[cut:]))
    return train, val


def corpus_fingerprint(docs: list[Document]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(d.name.encode("utf-8", "surrogateescape"))  # a file name need not be UTF-8
        h.update(hashlib.sha256(d.text.encode("utf-8", "replace")).digest())
    return h.hexdigest()[:16]


def cache_dir(sub: Optional[str] = None) -> Path:
    base = Path(os.environ.get("MOEKIT_CACHE", Path.home() / ".cache" / "moekit"))
    return base / sub if sub else base
