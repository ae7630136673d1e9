"""Run the ```python examples of the user documentation, so they cannot rot.

Each page's blocks run in order in one fresh namespace (a later block may use names defined by an
earlier one on the same page), inside a temporary working directory.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

DOCS = Path(__file__).resolve().parent.parent / "docs"

# The pages whose examples this file checks (other pages are checked by their owners' tests).
PAGES = [
    "index.md",
    "TorchModel.md",
    "TraceNTK.md",
    "PseudoNTK.md",
    "EmpiricalNTK.md",
    "EmbeddingKernel.md",
    "GradCosKernel.md",
    "KernelSurrogate.md",
    "fidelity.md",
    "FeatureCache.md",
    "projection.md",
    "gradients.md",
    "training.md",
    "plotting.md",
    "main_job.md",
    "tracin.md",
    "attribution_core.md",
]

NEEDS = {"plotting.md": ["matplotlib"]}

_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)


def python_blocks(text):
    """The bodies of the ```python fenced blocks of a markdown text, in order."""
    return [m.group(1) for m in _BLOCK.finditer(text)]


def test_block_extraction():
    text = "a\n```python\nx = 1\n```\n```bash\nls\n```\n```python\ny = x\n```\n"
    assert python_blocks(text) == ["x = 1\n", "y = x\n"]


@pytest.mark.parametrize("page", PAGES)
def test_page_examples(page, tmp_path, monkeypatch):
    for mod in NEEDS.get(page, []):
        pytest.importorskip(mod)
    path = DOCS / page
    assert path.exists(), f"docs/{page} is missing"
    blocks = python_blocks(path.read_text())
    assert blocks, f"docs/{page} has no ```python example"
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    namespace = {"__name__": f"docs_{Path(page).stem}"}
    for i, src in enumerate(blocks):
        code = compile(src, f"{os.fspath(path)} (python block {i + 1})", "exec")
        exec(code, namespace)
