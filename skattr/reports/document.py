"""What a main-job section hands to the report: words, tables, figures, in reading order.

A section function returns a :class:`Section`; :mod:`skattr.reports.html` renders the list of
them as ``report.md`` and a self-contained ``report.html``.
"""

from __future__ import annotations

import os

__all__ = ["Section"]


class Section:
    """One part of the report.

    Parameters
    ----------
    name : str
        Short id (the ``--sections`` name; also the HTML anchor).
    title : str
    what : str
        One sentence: what the method measures.

    Attributes
    ----------
    summary : list of str
        Sentences for the report's opening summary.
    networks : list of (str, float)
        The networks trained in this section and their test accuracy.
    blocks : list of tuple
        ``("text", str)``, ``("table", caption, header, rows)`` or ``("figure", path, caption)``.
    data : dict
        Key figures, machine-readable (written to ``summary.json``).
    seconds : float or None

    Examples
    --------
    >>> s = Section("ntk", "Kernels", "What a kernel measures.")
    >>> s.table("tau", ["kernel", "tau"], [["trNTK", "0.9"]])
    >>> s.blocks[0][0]
    'table'
    """

    def __init__(self, name, title, what):
        self.name = name
        self.title = title
        self.what = what
        self.summary = []
        self.networks = []
        self.blocks = []
        self.data = {}
        self.seconds = None

    def text(self, text):
        self.blocks.append(("text", text))

    def table(self, caption, header, rows):
        rows = [[str(c) for c in r] for r in rows]
        if any(len(r) != len(header) for r in rows):
            raise ValueError(f"table {caption!r}: every row needs {len(header)} cells.")
        self.blocks.append(("table", caption, list(header), rows))

    def figure(self, path, caption):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"figure {path!r} of section {self.name!r} was not written.")
        self.blocks.append(("figure", path, caption))

    def figures(self):
        return [b[1] for b in self.blocks if b[0] == "figure"]
