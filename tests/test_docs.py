"""Run the ```python examples of the user documentation and the README, so they cannot rot.

Each page's blocks run in order in one fresh namespace (a later block may use names defined by an
earlier one on the same page), inside a temporary working directory. A block that only
illustrates (a fragment, or one that needs resources CI lacks) is fenced ```python no-run and
is not executed; such blocks must stay few. Every page of docs/ with runnable blocks is run here
or by the test named in ``ELSEWHERE``; ``test_every_page_is_run`` fails for a page left out.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

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
    "loss_kernel.md",
    "representation.md",
    "../README.md",
]

# Pages whose examples another test module runs (it must name the page).
ELSEWHERE = {
    "trak.md": "test_trak.py",
    "influence.md": "test_influence.py",
    "hydra.md": "test_hydra.py",
    "scaling.md": "test_feature_map.py",
}

# Illustration-only blocks (```python no-run) allowed in all of docs/ and the README together.
MAX_NO_RUN = 5

NEEDS = {"plotting.md": ["matplotlib"]}

_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
_NO_RUN = re.compile(r"^```python[ \t]+no-run[ \t]*$", re.M)


def python_blocks(text):
    """The bodies of the ```python fenced blocks of a markdown text, in order."""
    return [m.group(1) for m in _BLOCK.finditer(text)]


def test_block_extraction():
    text = "a\n```python\nx = 1\n```\n```bash\nls\n```\n```python\ny = x\n```\n"
    assert python_blocks(text) == ["x = 1\n", "y = x\n"]
    # an illustration fenced ```python no-run is not extracted, and is counted
    text = "```python no-run\nfragment(\n```\n```python\nz = 2\n```\n"
    assert python_blocks(text) == ["z = 2\n"]
    assert len(_NO_RUN.findall(text)) == 1


def _pages_with_blocks():
    pages = sorted(p.name for p in DOCS.glob("*.md")) + ["../README.md"]
    return [p for p in pages if python_blocks((DOCS / p).read_text())]


def test_every_page_is_run():
    """Each page with ```python blocks is run by this module or by the test ELSEWHERE names."""
    missing = []
    for page in _pages_with_blocks():
        if page in PAGES:
            continue
        other = ELSEWHERE.get(page)
        if other is None or page not in (ROOT / "tests" / other).read_text():
            missing.append(page)
    assert not missing, f"pages whose ```python blocks no test runs: {missing}"


def test_few_illustration_blocks():
    files = list(DOCS.glob("*.md")) + [ROOT / "README.md"]
    n = sum(len(_NO_RUN.findall(f.read_text())) for f in files)
    assert n <= MAX_NO_RUN, f"{n} ```python no-run blocks; make them run or raise the limit"


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
