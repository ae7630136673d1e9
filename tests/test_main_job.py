"""The command line of the main job (``python -m skattr``): arguments, sizes, progress, outputs.

The sections are replaced by a fake one (two steps, a table and one figure) so that these tests
check the command line itself in well under a second each; ``tests/test_report_render.py`` runs
the real sections at their tiny size.
"""

from __future__ import annotations

import base64
import csv
import json
import re
import types

import numpy as np
import pytest

import skattr.__main__ as cli
from skattr.reports.document import Section

pytest.importorskip("matplotlib")


def _fake_module(calls, steps=2, name="fake"):
    def report(outdir, *, random_state, size, progress):
        from skattr import plotting

        calls.append({"size": size, "seed": random_state, "outdir": outdir})
        progress.step(name, "first step")
        progress.step(name, "second step")
        import os

        os.makedirs(outdir, exist_ok=True)
        plt = plotting._plt()
        fig, ax = plt.subplots(figsize=(2, 2))
        ax.plot([0, 1], [0, 1])
        path = os.path.join(outdir, "line.png")
        plotting.save(fig, path)
        sec = Section(name, f"The {name} section", "It measures nothing.")
        sec.networks = [("MLP 2-2", 0.5)]
        sec.summary.append("A sentence for the summary.")
        sec.table("numbers", ["a", "b"], [[1, 2], [3, 4]])
        sec.figure(path, "a line")
        sec.data = {"rows": [{"kernel": "trNTK", "tau": 0.5}], "x": np.float64(1.5)}
        return sec

    return types.SimpleNamespace(n_steps=lambda size: steps, report=report)


@pytest.fixture
def fake(monkeypatch):
    """Replace every section by the fake one; returns the list of its calls."""
    calls = []
    mods = {name: _fake_module(calls, name=name) for name in cli.SECTIONS}
    monkeypatch.setattr(cli, "_module", lambda name: mods[name])
    monkeypatch.setattr(cli, "REPORT_FUNCTION", {name: "report" for name in cli.SECTIONS})
    return calls


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--out", "--quick", "--full", "--sections", "--seed", "--threads", "--quiet"):
        assert opt in out
    assert "--size" not in out  # the test suite's size is not advertised


def test_unknown_section_is_an_error_naming_it(fake, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--sections", "ntk,nope", "--out", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown section 'nope'" in err and "representation" in err
    assert fake == []  # nothing ran


@pytest.mark.parametrize("argv", [["--quick", "--full"], ["--threads", "0"], ["--sections", ","]])
def test_bad_arguments_are_errors(argv, fake, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv + ["--out", str(tmp_path)])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip()
    assert fake == []


@pytest.mark.parametrize("flags, size", [([], "default"), (["--quick"], "quick"), (["--full"], "full")])
def test_size_flags_reach_the_sections(flags, size, fake, tmp_path, capsys):
    assert cli.main(flags + ["--sections", "trak,loss", "--seed", "3", "--out", str(tmp_path)]) == 0
    assert [c["size"] for c in fake] == [size, size]
    assert {c["seed"] for c in fake} == {3}
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(f"[skattr] {size} run") and cli.EXPECTED[size] in first


def test_full_announces_its_time_before_running(fake, tmp_path, capsys):
    cli.main(["--full", "--sections", "hydra", "--out", str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    assert "minutes" in lines[0] and "expected" in lines[0]
    assert re.search(r"step +1/2", lines[1])  # announced before the first step


def test_progress_counts_steps_over_the_whole_run(fake, tmp_path, capsys):
    cli.main(["--sections", "ntk,trak,hydra", "--out", str(tmp_path)])
    steps = re.findall(r"^\[skattr\] step +(\d+)/(\d+) +(\d+:\d\d) +(\w+): (.+)$",
                       capsys.readouterr().out, re.M)
    assert [int(s[0]) for s in steps] == list(range(1, 7))
    assert {s[1] for s in steps} == {"6"}
    assert [s[3] for s in steps] == ["ntk", "ntk", "trak", "trak", "hydra", "hydra"]


def test_quiet_prints_nothing(fake, tmp_path, capsys):
    cli.main(["-q", "--sections", "trak", "--out", str(tmp_path)])
    assert capsys.readouterr().out == ""


def test_report_files_are_written(fake, tmp_path):
    out = tmp_path / "rep"
    cli.main(["-q", "--sections", "ntk,hydra", "--out", str(out)])
    html = (out / "report.html").read_text()
    md = (out / "report.md").read_text()
    # one self-contained page: the figure is embedded, nothing is linked from disk
    srcs = re.findall(r'<img src="([^"]+)"', html)
    assert len(srcs) == 2
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    # every in-page link resolves
    for target in re.findall(r'href="#([^"]+)"', html):
        assert f'id="{target}"' in html
    # the markdown links the PNG files beside it
    for rel in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (out / rel).is_file(), rel
    assert "<th>a</th>" in html and "| 3 | 4 |" in md
    assert "A sentence for the summary." in html and "Glossary" in html
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["sections"]) == {"ntk", "hydra"}
    assert summary["sections"]["hydra"]["x"] == 1.5 and "rows" not in summary["sections"]["ntk"]
    with open(out / "results.csv") as f:
        assert list(csv.DictReader(f)) == [{"kernel": "trNTK", "tau": "0.5"}]


def test_missing_section_module_is_skipped_with_a_message(fake, monkeypatch, tmp_path, capsys):
    real = cli._module
    monkeypatch.setattr(cli, "_module", lambda name: None if name == "loss" else real(name))
    assert cli.main(["--sections", "loss,trak", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "section 'loss' is not available in this version; skipped." in out
    assert [c["outdir"].rsplit("/", 1)[-1] for c in fake] == ["trak"]


def test_every_section_declares_its_steps():
    import importlib

    for name, mod in cli.SECTIONS.items():
        m = importlib.import_module(mod)
        assert callable(getattr(m, cli.REPORT_FUNCTION[name])), name
        for size in ("tiny", "quick", "default", "full"):
            assert m.n_steps(size) >= 1, (name, size)
