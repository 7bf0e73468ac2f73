"""What the benchmark scripts share: printing table lines (and appending them to a markdown file
as they come, so a partial run keeps its tables) and naming the CPU they ran on."""

from __future__ import annotations

import platform
from typing import Optional

_markdown: Optional[str] = None


def write_markdown_to(path: Optional[str]) -> None:
    """From now on :func:`emit` also appends each line to ``path`` (None: print only)."""
    global _markdown
    _markdown = path


def emit(line: str = "") -> None:
    """Print a line and, after :func:`write_markdown_to`, append it to that file at once."""
    print(line, flush=True)
    if _markdown:
        with open(_markdown, "a") as f:
            f.write(line + "\n")


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (else what ``platform`` knows)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"
