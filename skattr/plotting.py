"""Plots people would rather see than read: kernel heat maps, fidelity curves.

Needs matplotlib (``pip install skattr[plots]``).  Every function takes an optional ``ax`` and
returns the axes, so plots compose into figures.
"""

from __future__ import annotations

import numpy as np

__all__ = ["plot_kernel_heatmap", "plot_fidelity_vs_projection", "save"]


def _plt():
    try:
        import matplotlib

        if matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline"):
            try:
                matplotlib.use("Agg", force=False)
            except Exception:  # pragma: no cover - backend already chosen by the user
                pass
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover
        raise ImportError("Plotting needs matplotlib: pip install 'skattr[plots]'.") from exc
    return plt


def plot_kernel_heatmap(K, labels, *, ax=None, title=None, cmap="viridis"):
    """Heat map of a square kernel with rows and columns sorted by ``labels``.

    Class boundaries are drawn as white lines; a kernel that knows the classes shows blocks.

    Parameters
    ----------
    K : array of shape (n, n)
    labels : array of shape (n,)
    ax : matplotlib Axes, default=None
    title : str, default=None

    Returns
    -------
    ax : matplotlib Axes

    Examples
    --------
    >>> import numpy as np
    >>> from skattr.plotting import plot_kernel_heatmap
    >>> ax = plot_kernel_heatmap(np.eye(4), [1, 0, 1, 0])
    """
    plt = _plt()
    K = np.asarray(K)
    labels = np.asarray(labels)
    if K.ndim != 2 or K.shape[0] != K.shape[1] or K.shape[0] != labels.shape[0]:
        raise ValueError(f"K must be square with one label per row; got {K.shape} and {labels.shape}.")
    order = np.argsort(labels, kind="stable")
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 4.5))
    im = ax.imshow(K[np.ix_(order, order)], cmap=cmap, interpolation="nearest")
    ls = labels[order]
    edges = np.flatnonzero(ls[1:] != ls[:-1]) + 0.5
    for e in edges:
        ax.axhline(e, color="white", lw=0.5)
        ax.axvline(e, color="white", lw=0.5)
    mids = [np.mean(np.flatnonzero(ls == c)) for c in np.unique(ls)]
    ax.set_xticks(mids)
    ax.set_xticklabels([str(c) for c in np.unique(ls)], fontsize=7)
    ax.set_yticks(mids)
    ax.set_yticklabels([str(c) for c in np.unique(ls)], fontsize=7)
    ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if title:
        ax.set_title(title, fontsize=9)
    return ax


def plot_fidelity_vs_projection(rows, *, ax=None, exact=None, title=None, metric="tau"):
    """Fidelity (Kendall tau) against projection_dim, one line per series.

    Parameters
    ----------
    rows : iterable of dict with keys ``series``, ``projection_dim`` and ``metric``.
    exact : dict {series: value}, default=None
        Horizontal reference lines (the exact kernel's fidelity).

    Returns
    -------
    ax : matplotlib Axes

    Examples
    --------
    >>> from skattr.plotting import plot_fidelity_vs_projection
    >>> ax = plot_fidelity_vs_projection([{"series": "trNTK", "projection_dim": 64, "tau": 0.6},
    ...                                   {"series": "trNTK", "projection_dim": 256, "tau": 0.7}])
    """
    plt = _plt()
    if ax is None:
        _, ax = plt.subplots(figsize=(5.5, 4))
    series = {}
    for r in rows:
        series.setdefault(r["series"], []).append((r["projection_dim"], r[metric]))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, pts) in enumerate(sorted(series.items())):
        pts = sorted(pts)
        c = colors[i % len(colors)]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=c, label=name)
        if exact and name in exact:
            ax.axhline(exact[name], color=c, ls="--", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("projection_dim")
    ax.set_ylabel("Kendall tau fidelity" if metric == "tau" else metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    return ax


def save(ax_or_fig, path, dpi=120):
    """Save the figure of ``ax_or_fig`` to ``path`` and close it."""
    plt = _plt()
    fig = getattr(ax_or_fig, "figure", ax_or_fig)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
