"""Every ```python block of README.md and docs/*.md runs as written, on its own (imports
included), in a fresh namespace and an empty working folder.

A block that cannot run on a test machine is skipped by a marker it contains, each with its
reason (the list is small and explicit; every marker must still match a block).
"""

import re
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")  # a snippet that plots draws off screen

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

SKIP = {  # a string in the block -> why it cannot run here
    "init_distributed(": "needs torchrun (several processes) and GPUs",
    "triton_moe_ffn(": "needs a GPU (Triton kernels)",
    "path/to/save_pretrained_folder": "needs a Hugging Face checkpoint folder (downloaded: the network)",
    'load_run_model("runs/NAME"': "needs a trained run folder (tests/store/test_generate_store.py trains one)",
}

_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _blocks() -> list:
    found = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for m in _BLOCK.finditer(text):
            line = text.count("\n", 0, m.start(1)) + 1
            found.append(pytest.param(m.group(1), id=f"{path.relative_to(ROOT)}:{line}"))
    return found


BLOCKS = _blocks()


def test_the_docs_have_python_blocks_and_every_skip_marker_is_used():
    assert len(BLOCKS) >= 10
    for marker in SKIP:
        assert any(marker in p.values[0] for p in BLOCKS), f"skip marker {marker!r} matches no block: remove it"


@pytest.mark.parametrize("code", BLOCKS)
def test_snippet_runs(code, request, tmp_path, monkeypatch):
    reasons = [why for marker, why in SKIP.items() if marker in code]
    if reasons:
        pytest.skip(reasons[0])
    monkeypatch.chdir(tmp_path)  # files a snippet writes (a plot) land here
    name = request.node.callspec.id
    exec(compile(code, name, "exec"), {"__name__": "__doc_snippet__"})
