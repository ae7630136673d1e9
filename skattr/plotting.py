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


def plot_kernel_heatmap(K, labels, *, ax=None, title=None, cmap="viridis", vmin=None, vmax=None,
                        cbar_label="kernel value", axis_label="class"):
    """Heat map of a square kernel with rows and columns sorted by ``labels``.

    Class boundaries are drawn as white lines; a kernel that knows the classes shows blocks.

    Parameters
    ----------
    K : array of shape (n, n)
    labels : array of shape (n,)
    ax : matplotlib Axes, default=None
    title : str, default=None
    cmap : str, default="viridis"
    vmin, vmax : float, default=None
        Colour range (``None``: the data's).
    cbar_label : str, default="kernel value"
        Label of the colour bar.
    axis_label : str, default="class"
        Label of both axes (the ticks name the classes).

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
    im = ax.imshow(K[np.ix_(order, order)], cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
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
    if axis_label:
        ax.set_xlabel(axis_label)
        ax.set_ylabel(axis_label)
    cb = ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if cbar_label:
        cb.set_label(cbar_label)
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
    if not fig.legends:  # a figure legend placed by the caller keeps the caller's layout
        fig.tight_layout()
    # "tight" keeps legends and labels placed outside the axes inside the image
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path


# ---------------------------------------------------------------- representation tracing (issue 12)
def _weighted_kde(values, weights, grid, bandwidth):
    w = np.asarray(weights, dtype=np.float64)
    if w.sum() <= 0:
        return np.zeros_like(grid)
    w = w / w.sum()
    d = (grid[:, None] - np.asarray(values, dtype=np.float64)[None, :]) / bandwidth
    return (np.exp(-0.5 * d**2) * w[None, :]).sum(1) / (bandwidth * np.sqrt(2 * np.pi))


def plot_class_ridge(stats, sample=0, *, predicted=None, bandwidth=0.05, ax=None, title=None):
    """Ridge plot of one layer's class statistics for one test sample (Pfahler and Morik).

    For each class, a Gaussian KDE (``bandwidth``) of the cosines ``cos(c_{t,i}(x), p(x))`` of
    its training examples' contributions, weighted by ``||c_{t,i}(x)||``; curves are scaled by
    the class's share of the total weight, so a class that built the representation shows as a
    tall curve on the right (cosine near 1).  The predicted class is drawn highlighted.

    Parameters
    ----------
    stats : dict
        One layer's entry of :meth:`RepresentationTracer.class_statistics` (keys ``cos``,
        ``weight``, ``label``, ``classes``).
    sample : int, default=0
        Row of the samples passed to ``class_statistics``.
    predicted : label or None, default=None
        The class to highlight (e.g. the model's prediction).

    Returns
    -------
    ax : matplotlib Axes

    Examples
    --------
    >>> import numpy as np
    >>> from skattr.plotting import plot_class_ridge
    >>> rng = np.random.default_rng(0)
    >>> stats = {"cos": rng.uniform(-1, 1, (1, 40)), "weight": rng.uniform(0, 1, (1, 40)),
    ...          "label": np.repeat([0, 1], 20), "classes": np.array([0, 1])}
    >>> ax = plot_class_ridge(stats, predicted=1)
    """
    plt = _plt()
    cos = np.asarray(stats["cos"])[sample]
    w = np.asarray(stats["weight"])[sample]
    label, classes = np.asarray(stats["label"]), np.asarray(stats["classes"])
    if cos.shape != w.shape or cos.shape != label.shape:
        raise ValueError(f"cos, weight and label must align; got {cos.shape}, {w.shape}, {label.shape}.")
    if ax is None:
        _, ax = plt.subplots(figsize=(4.5, 0.45 * len(classes) + 1.2))
    grid = np.linspace(-1, 1, 401)
    total = w.sum() if w.sum() > 0 else 1.0
    dens = [_weighted_kde(cos[label == c], w[label == c], grid, bandwidth) * w[label == c].sum() / total
            for c in classes]
    peak = max((d.max() for d in dens), default=1.0) or 1.0
    for j, (c, d) in enumerate(zip(classes, dens)):
        hi = predicted is not None and c == predicted
        y0 = j
        ax.fill_between(grid, y0, y0 + 0.9 * d / peak, color="C3" if hi else "C0", alpha=0.8 if hi else 0.45,
                        lw=0)
        ax.plot(grid, y0 + 0.9 * d / peak, color="k", lw=0.6)
    ax.set_yticks(np.arange(len(classes)))
    ax.set_yticklabels([str(c) for c in classes], fontsize=7)
    ax.set_xlim(-1, 1)
    ax.set_xlabel("cos(c, p), weighted by ||c||")
    ax.set_ylabel("class of the training examples")
    ax.axvline(0, color="grey", lw=0.5, ls="--")
    if title:
        ax.set_title(title, fontsize=9)
    return ax


def plot_influence_over_time(steps, influence, sample=0, *, cumulative=True, ax=None, title=None):
    """Per-layer influence of each training step on one test sample's representation.

    Parameters
    ----------
    steps : array of shape (n_steps,)
    influence : dict {layer: array of shape (n_samples, n_steps)}
        As returned by :meth:`RepresentationTracer.influence_over_time`.
    cumulative : bool, default=True
        Plot the running sum (which ends at ``||p(x)||`` per layer), else the per-step values.

    Returns
    -------
    ax : matplotlib Axes

    Examples
    --------
    >>> import numpy as np
    >>> from skattr.plotting import plot_influence_over_time
    >>> ax = plot_influence_over_time(np.arange(5), {"fc": np.ones((1, 5))})
    """
    plt = _plt()
    steps = np.asarray(steps)
    if ax is None:
        _, ax = plt.subplots(figsize=(5.5, 3.5))
    for name, vals in influence.items():
        v = np.asarray(vals)[sample]
        if v.shape != steps.shape:
            raise ValueError(f"influence[{name!r}] has {v.shape[0]} steps, steps has {steps.shape[0]}.")
        ax.plot(steps, np.cumsum(v) if cumulative else v, label=str(name) or "(network)")
    ax.set_xlabel("training step")
    ax.set_ylabel("cumulative influence (-> ||p(x)||)" if cumulative else "influence of the step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, title="layer", title_fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    return ax


def plot_top_k_images(X_test, X_train, proponents, *, image_shape=None, y_test=None, y_train=None,
                      scores=None, cmap="gray_r"):
    """A grid: each row a test image followed by its top-k training images.

    Parameters
    ----------
    X_test : array of shape (n_rows, ...)
    X_train : array of shape (n_train, ...)
    proponents : int array of shape (n_rows, k)
        Indices into ``X_train`` (``top_k(X_test).proponents``).
    image_shape : tuple, default=None
        Shape to reshape each sample to (e.g. ``(8, 8)``); ``None`` keeps it (channels first
        with 1 or 3 channels are shown as images).
    y_test, y_train : arrays of labels, optional (shown in the titles)
    scores : array of shape (n_rows, k), optional (shown in the titles)

    Returns
    -------
    fig : matplotlib Figure

    Examples
    --------
    >>> import numpy as np
    >>> from skattr.plotting import plot_top_k_images
    >>> fig = plot_top_k_images(np.zeros((2, 64)), np.ones((5, 64)), np.array([[0, 1], [2, 3]]),
    ...                         image_shape=(8, 8))
    """
    plt = _plt()
    X_test, X_train, P = np.asarray(X_test), np.asarray(X_train), np.asarray(proponents)
    if P.ndim != 2 or P.shape[0] != X_test.shape[0]:
        raise ValueError(f"proponents must be (n_rows, k) with one row per test image; got {P.shape}.")

    def img(x):
        x = x.reshape(image_shape) if image_shape is not None else x
        if x.ndim == 3 and x.shape[0] in (1, 3):
            x = x[0] if x.shape[0] == 1 else np.moveaxis(x, 0, -1)
        return x

    n, k = P.shape
    fig, axes = plt.subplots(n, k + 1, figsize=(1.35 * (k + 1), 1.6 * n), squeeze=False)
    for r in range(n):
        axes[r, 0].imshow(img(X_test[r]), cmap=cmap)
        axes[r, 0].set_title("test" + (f" y={y_test[r]}" if y_test is not None else ""), fontsize=7,
                             color="C3")
        for j in range(k):
            i = int(P[r, j])
            axes[r, j + 1].imshow(img(X_train[i]), cmap=cmap)
            parts = [f"#{i}"]
            if y_train is not None:
                parts.append(f"y={y_train[i]}")
            if scores is not None:
                parts.append(f"{scores[r, j]:.2g}")
            axes[r, j + 1].set_title(" ".join(parts), fontsize=6)
    for a in axes.ravel():
        a.set_xticks([])
        a.set_yticks([])
    return fig


def plot_image_grid(X, titles=None, *, ncols=6, image_shape=None, row_labels=None, cmap="gray_r"):
    """A grid of images, each with a title above it, rows optionally labelled.

    Parameters
    ----------
    X : array of shape (n, ...)
        Images, or flat vectors with ``image_shape``.
    titles : list of str, default=None
        One per image (may hold line breaks).
    ncols : int, default=6
    image_shape : tuple, default=None
        E.g. ``(8, 8)`` for flat digits.
    row_labels : list of str, default=None
        Written left of each row.

    Returns
    -------
    fig : matplotlib Figure

    Examples
    --------
    >>> import numpy as np
    >>> from skattr.plotting import plot_image_grid
    >>> fig = plot_image_grid(np.zeros((4, 64)), ["a", "b", "c", "d"], ncols=2, image_shape=(8, 8),
    ...                       row_labels=["first", "second"])
    """
    plt = _plt()
    X = np.asarray(X)
    n = X.shape[0]
    if titles is not None and len(titles) != n:
        raise ValueError(f"titles must have one entry per image: {len(titles)} titles, {n} images.")
    nrows = int(np.ceil(n / ncols))
    if row_labels is not None and len(row_labels) != nrows:
        raise ValueError(f"row_labels must have one entry per row: {len(row_labels)} for {nrows} rows.")
    lines = max((str(t).count("\n") + 1 for t in titles), default=0) if titles is not None else 0
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.35 * ncols + (1.2 if row_labels else 0),
                                                    (1.45 + 0.17 * lines) * nrows), squeeze=False)
    for i, a in enumerate(axes.ravel()):
        a.set_xticks([])
        a.set_yticks([])
        if i >= n:
            a.axis("off")
            continue
        x = X[i].reshape(image_shape) if image_shape is not None else X[i]
        if x.ndim == 3 and x.shape[0] in (1, 3):
            x = x[0] if x.shape[0] == 1 else np.moveaxis(x, 0, -1)
        a.imshow(x, cmap=cmap)
        if titles is not None:
            a.set_title(titles[i], fontsize=7)
    if row_labels is not None:
        for r, lab in enumerate(row_labels):
            axes[r, 0].set_ylabel(lab, fontsize=8)
    return fig


__all__ += ["plot_class_ridge", "plot_influence_over_time", "plot_top_k_images", "plot_image_grid"]
