"""Main-job section: the loss kernel (SGLD around the trained weights).

Three small studies, all seeded and local (no download): a synthetic multitask problem (the
kernel should be block-diagonal by task: spectral clustering of ``|K|`` recovers the tasks),
digits (correlation heat map sorted by class, a KernelPCA embedding coloured by class, and the
class-level similarity against a visual grouping of the digits) and the chains' loss traces.
The helpers here are also used by ``benchmarks/loss_kernel_experiments.py``.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch
from torch import nn

__all__ = [
    "loss_kernel_report",
    "mlp",
    "train_mlp",
    "class_similarity",
    "spearman_vs_tree",
    "cluster_ari",
    "mislabel_scores",
    "MULTITASK_SGLD",
]

#: SGLD settings used for the multitask study (and the report).
MULTITASK_SGLD = dict(n_chains=4, n_draws=200, burn_in=100, thin=5, step_size=1e-3,
                      localization=300.0)


def mlp(d_in, n_out, width=128, depth=1, seed=0):
    """A ReLU MLP ``d_in -> width (x depth) -> n_out``."""
    torch.manual_seed(seed)
    layers, d = [nn.Flatten()], d_in
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.ReLU()]
        d = width
    layers.append(nn.Linear(d, n_out))
    return nn.Sequential(*layers)


def train_mlp(X, y, n_out, *, epochs=60, width=128, depth=1, lr=0.05, batch_size=32, seed=0):
    """A seeded :class:`skattr.TorchModel` MLP trained on ``(X, y)``."""
    from ..model import TorchModel

    d_in = int(np.prod(X.shape[1:]))
    net = mlp(d_in, n_out, width=width, depth=depth, seed=seed)
    return TorchModel(net, epochs=epochs, lr=lr, batch_size=batch_size, random_state=seed,
                      device="cpu").fit(X, y)


def class_similarity(K, y, n_classes=None):
    """Class-mean kernel ``S[a, b] = mean_{i in a, j in b} K_ij`` (diagonal blocks include i=j)."""
    y = np.asarray(y)
    C = int(n_classes or y.max() + 1)
    onehot = np.eye(C)[y]
    counts = onehot.sum(0)
    return (onehot.T @ K @ onehot) / np.outer(counts, counts)


def spearman_vs_tree(S, D):
    """Spearman correlation between the off-diagonal entries of ``S`` and tree distances ``D``."""
    from scipy.stats import spearmanr

    iu = np.triu_indices(len(D), 1)
    return float(spearmanr(S[iu], D[iu]).statistic)


def cluster_ari(A, labels, n_clusters, random_state=0):
    """ARI of ``SpectralClustering(affinity="precomputed")`` on the affinity ``A``."""
    from sklearn.cluster import SpectralClustering
    from sklearn.metrics import adjusted_rand_score

    pred = SpectralClustering(n_clusters, affinity="precomputed",
                              random_state=random_state).fit_predict(A)
    return float(adjusted_rand_score(labels, pred)), pred


def mislabel_scores(lk, y_given, loss_at_w):
    """Suspicion scores of each fitted point (higher = more likely mislabelled).

    - ``loss``: per-example loss at the trained weights (the baseline);
    - ``variance``: the loss variance under the posterior (the kernel's self-covariance);
    - ``label-coherence``: minus the mean correlation with the other points that carry the same
      (given) label; a mislabelled point's loss does not move with its labelled class;
    - ``top-k self-correlation``: minus the mean of its 10 largest correlations among points of
      its given label (a softer, neighbourhood version of the previous one).
    """
    var = lk.variance_
    d = np.where(var > 0, 1 / np.sqrt(np.maximum(var, 1e-300)), 0.0)
    R = lk.kernel_ if lk.kind == "correlation" else lk.kernel_ * d[:, None] * d[None, :]
    y = np.asarray(y_given)
    n = len(y)
    coh = np.empty(n)
    topk = np.empty(n)
    for c in np.unique(y):
        m = np.flatnonzero(y == c)
        B = R[np.ix_(m, m)].copy()
        np.fill_diagonal(B, np.nan)
        coh[m] = np.nanmean(B, 1)
        np.fill_diagonal(B, -np.inf)
        k = min(10, len(m) - 1)
        topk[m] = np.sort(B, 1)[:, -k:].mean(1)
    return {
        "loss": np.asarray(loss_at_w, dtype=float),
        "variance": var,
        "label-coherence": -coh,
        "top-k self-correlation": -topk,
    }


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _heatmap(ax, K, labels, title):
    order = np.argsort(labels, kind="stable")
    im = ax.imshow(K[np.ix_(order, order)], cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
    bounds = np.flatnonzero(np.diff(np.asarray(labels)[order])) + 0.5
    for b in bounds:
        ax.axhline(b, color="k", lw=0.4)
        ax.axvline(b, color="k", lw=0.4)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    return im


def loss_kernel_report(outdir, random_state=0, quick=False):
    """Run the loss-kernel section of the main job; write PNGs; return the key figures.

    Parameters
    ----------
    outdir : str
        Folder for the PNG files (created).
    random_state : int, default=0
    quick : bool, default=False
        Smaller problems and fewer draws (a smoke run).

    Returns
    -------
    dict
        Scalars (ARI of the task clustering, Spearman correlations, timings) and ``figures``, the
        list of PNG paths.
    """
    from sklearn.decomposition import KernelPCA

    from ..datasets import digit_groups_distance, load_digits_images, make_multitask
    from ..estimators.loss_kernel import LossKernel

    plt = _plt()
    os.makedirs(outdir, exist_ok=True)
    seed = int(random_state)
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # ---- multitask: block-diagonal by task
        n_mt = 400 if quick else 600
        X, y, task = make_multitask(n_mt, n_tasks=4, n_bits=8, k=2, interleave=True,
                                    random_state=seed)
        model = train_mlp(X, y, 8, epochs=40 if quick else 60, seed=seed)
        sg = dict(MULTITASK_SGLD, n_draws=100 if quick else 150, n_chains=2 if quick else 3)
        lk_mt = LossKernel(model, **sg, random_state=seed).fit(X, y)
        ari_abs, _ = cluster_ari(np.abs(lk_mt.kernel_), task, 4)
        ari_clip, _ = cluster_ari(np.clip(lk_mt.kernel_, 0, None), task, 4)

        # ---- digits: heat map, embedding, visual grouping
        Xd, yd = load_digits_images(as_images=False)
        dmodel = train_mlp(Xd, yd, 10, epochs=10, lr=0.05, batch_size=64, seed=seed)
        rng = np.random.RandomState(seed)
        n_probe = 300 if quick else 500
        idx = np.sort(rng.choice(len(Xd), n_probe, replace=False))
        lk_d = LossKernel(dmodel, n_chains=2 if quick else 3, n_draws=80 if quick else 120,
                          burn_in=100, thin=4, step_size=1e-3, localization=100.0,
                          random_state=seed).fit(Xd[idx], yd[idx], X_sample=Xd, y_sample=yd)
        Kd = lk_d.kernel_
        S = class_similarity(Kd, yd[idx], 10)
        A = class_similarity(np.abs(Kd), yd[idx], 10)
        D = digit_groups_distance()
        rho_signed = spearman_vs_tree(S, D)
        rho_abs = spearman_vs_tree(A, D)
        Z = KernelPCA(2, kernel="precomputed").fit_transform(Kd)
        same = yd[idx][:, None] == yd[idx][None, :]
        off = ~np.eye(n_probe, dtype=bool)

        # ---- figures
        figs = []
        fig, axes = plt.subplots(1, 2, figsize=(9, 4.3))
        _heatmap(axes[0], lk_mt.kernel_, task, f"multitask: correlation sorted by task\n"
                 f"(rows shuffled in the data; ARI |K| = {ari_abs:.2f})")
        im = _heatmap(axes[1], Kd, yd[idx], "digits: correlation sorted by class")
        fig.colorbar(im, ax=axes, shrink=0.8)
        p = os.path.join(outdir, "loss_kernel_heatmaps.png")
        fig.savefig(p, dpi=110)
        plt.close(fig)
        figs.append(p)

        fig, ax = plt.subplots(figsize=(5, 4.5))
        sc = ax.scatter(Z[:, 0], Z[:, 1], c=yd[idx], cmap="tab10", s=8)
        for c in range(10):
            m = yd[idx] == c
            ax.annotate(str(c), Z[m].mean(0), fontsize=11, weight="bold")
        ax.set_title("digits: KernelPCA of the loss kernel", fontsize=9)
        fig.colorbar(sc, ax=ax, ticks=range(10))
        p = os.path.join(outdir, "loss_kernel_embedding.png")
        fig.savefig(p, dpi=110)
        plt.close(fig)
        figs.append(p)

        fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
        for ax, lk, name in ((axes[0], lk_mt, "multitask"), (axes[1], lk_d, "digits")):
            for c, tr in enumerate(lk.loss_traces_):
                ax.plot(tr, lw=0.6, label=f"chain {c}")
            ax.axhline(lk.init_loss_, color="k", ls="--", lw=0.8, label="loss at w*")
            ax.axvline(lk.burn_in, color="grey", ls=":", lw=0.8)
            ax.set_yscale("log")
            ax.set_xlabel("SGLD step")
            ax.set_title(f"{name}: mini-batch loss per chain", fontsize=9)
        axes[0].legend(fontsize=7)
        p = os.path.join(outdir, "loss_kernel_traces.png")
        fig.tight_layout()
        fig.savefig(p, dpi=110)
        plt.close(fig)
        figs.append(p)
    finally:
        torch.set_num_threads(threads)
    return {
        "multitask ARI (spectral clustering of |K|, 4 tasks, shuffled rows)": round(ari_abs, 3),
        "multitask ARI (spectral clustering of max(K, 0))": round(ari_clip, 3),
        "digits mean correlation same class / different class": (
            f"{Kd[same & off].mean():.3f} / {Kd[~same].mean():.3f}"
        ),
        "digits Spearman(class-mean K, group tree distance)": round(rho_signed, 3),
        "digits Spearman(class-mean |K|, group tree distance)": round(rho_abs, 3),
        "SGLD loss at w* -> mean over draws (digits)": (
            f"{lk_d.init_loss_:.3g} -> {np.nanmean(lk_d.draw_losses_):.3g}"
        ),
        "chains diverged (multitask, digits)": (
            f"{int(lk_mt.diverged_.sum())}, {int(lk_d.diverged_.sum())}"
        ),
        "seconds": round(time.perf_counter() - t0, 1),
        "figures": figs,
    }
