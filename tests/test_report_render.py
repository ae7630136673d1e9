"""The main job's report, generated for real at its tiny size and opened in headless Chromium.

One module-scoped run of ``python -m skattr --size tiny`` (every section, the smallest sizes)
feeds every test here.  The browser checks need ``/usr/bin/chromium`` (Debian's ``chromium``
package, installed by ``.ci/run``); without it they are skipped, except under ``CI=true``,
where they fail.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import re
import shutil
import subprocess

import pytest

pytest.importorskip("matplotlib")

from skattr.__main__ import SECTIONS, main  # noqa: E402
from skattr.reports.html import GLOSSARY  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("skattr_report")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["--size", "tiny", "--out", str(out)]) == 0
    return out, buf.getvalue()


def _chromium():
    path = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
    if path is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("chromium is not installed, and CI=true: .ci/run must install it "
                        "(apt-get install -y chromium).")
        pytest.skip("chromium is not installed (Debian: apt-get install chromium); "
                    "the report's rendering is not checked.")
    return path


def _run_chromium(chromium, profile, *args):
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def test_progress_steps_match_the_declared_count(report):
    _, stdout = report
    steps = re.findall(r"^\[skattr\] step +(\d+)/(\d+) ", stdout, re.M)
    assert steps, stdout[:500]
    total = {int(t) for _, t in steps}
    assert len(total) == 1
    assert [int(i) for i, _ in steps] == list(range(1, total.pop() + 1))


def test_report_has_every_section_summary_and_embedded_pngs(report):
    out, _ = report
    html = (out / "report.html").read_text()
    for name in SECTIONS:
        assert f'<h2 id="{name}">' in html, name
    summary = html[html.index('id="summary"'): html.index(f'id="{next(iter(SECTIONS))}"')]
    for word in ("tau", "LDS", "ARI", "HYDRA", "flipped", "accuracy"):
        assert word in summary, word
    srcs = re.findall(r'<img src="([^"]*)"', html)
    assert len(srcs) >= 12
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == PNG
    for target in re.findall(r'href="#([^"]+)"', html):
        assert f'id="{target}"' in html, target
    assert not re.search(r'(src|href)="(?!data:|#)', html)  # nothing outside the page
    # no raw dumps of dictionaries or Python reprs
    text = re.sub(r"<img[^>]*>", "", html)
    assert not re.search(r"\{&#x27;\w+&#x27;: |\(np\.float|\bnan\b", text)
    # abbreviations used in the tables' headers are explained in the glossary
    terms = " ".join(t for t, _ in GLOSSARY)
    for abbr in ("trNTK", "pNTK", "kGLM", "KLR", "SVC", "KRR", "LDS", "tau", "AUC", "ARI", "SGLD"):
        assert abbr in terms, abbr


def test_markdown_links_resolve(report):
    out, _ = report
    md = (out / "report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) >= 12
    for rel in links:
        with open(out / rel, "rb") as f:
            assert f.read(8) == PNG, rel


def test_report_renders_in_headless_chromium(report, tmp_path):
    chromium = _chromium()
    out, _ = report
    html = (out / "report.html").read_text()
    n_img = html.count("<img ")
    # a copy of the page that writes, once loaded, how many images decoded into the DOM
    probe = tmp_path / "probe.html"
    probe.write_text(html.replace(
        "</body>",
        "<script>window.addEventListener('load', function () {"
        "var imgs = Array.from(document.images);"
        "var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;"
        "var d = document.createElement('div'); d.id = 'img-check';"
        "d.setAttribute('data-ok', ok); d.setAttribute('data-total', imgs.length);"
        "document.body.appendChild(d); });</script></body>"))
    r = _run_chromium(chromium, tmp_path / "profile1", "--virtual-time-budget=10000", "--dump-dom",
                      probe.as_uri())
    m = re.search(r'id="img-check" data-ok="(\d+)" data-total="(\d+)"', r.stdout)
    assert m, f"the page did not finish loading in chromium: {r.stderr[-2000:]}"
    assert int(m.group(2)) == n_img
    assert int(m.group(1)) == n_img, f"{n_img - int(m.group(1))} of {n_img} images did not load"
    # and a screenshot of the page itself is not blank
    shot = tmp_path / "report.png"
    r = _run_chromium(chromium, tmp_path / "profile2", "--window-size=1280,4000",
                      f"--screenshot={shot}", (out / "report.html").as_uri())
    assert shot.is_file(), r.stderr[-2000:]
    from matplotlib.image import imread

    img = imread(shot)[..., :3]
    assert img.shape[:2] == (4000, 1280)
    assert img.std() > 0.05
    # more than text on white: the page's figures colour a visible share of the pixels
    assert (img.min(-1) < 0.9).mean() > 0.05
