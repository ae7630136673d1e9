"""Main-job section: the loss kernel (SGLD around the trained weights).

Three small studies, all seeded and local (no download): a synthetic multitask problem (the
kernel should be block-diagonal by task: spectral clustering of ``|K|`` recovers the tasks),
digits (correlation heat map sorted by class, a KernelPCA embedding coloured by class, and the
class-level similarity against a visual grouping of the digits) and the chains' loss traces.
The helpers here are also used by ``benchmarks/loss_kernel_experiments.py``.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from ..parallel import torch_threads

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


#: multitask points, training epochs, SGLD chains and draws (multitask, digits), digits probed.
SIZES = {
    "tiny": dict(n_mt=160, mt_epochs=30, mt_chains=2, mt_draws=40, d_chains=2, d_draws=30, n_probe=120),
    "quick": dict(n_mt=400, mt_epochs=40, mt_chains=2, mt_draws=100, d_chains=2, d_draws=80, n_probe=300),
    "default": dict(n_mt=400, mt_epochs=40, mt_chains=2, mt_draws=100, d_chains=2, d_draws=80, n_probe=300),
    "full": dict(n_mt=600, mt_epochs=60, mt_chains=3, mt_draws=150, d_chains=3, d_draws=120, n_probe=500),
}


def n_steps(size):
    """Progress steps of this section at ``size``."""
    return 5


def loss_kernel_report(outdir, *, random_state=0, size="default", progress=None, verbose=0):
    """Run the loss-kernel section of the main job; write PNGs; return a
    :class:`~skattr.reports.document.Section`.

    Parameters
    ----------
    outdir : str
        Folder for the PNG files (created).
    random_state : int, default=0
    size : {"tiny", "quick", "default", "full"}, default="default"
        Problem sizes and SGLD draws (:data:`SIZES`).
    progress : Progress or None
    """
    from sklearn.decomposition import KernelPCA

    from .. import plotting
    from ..datasets import digit_groups_distance, load_digits_images, make_multitask
    from ..estimators.loss_kernel import LossKernel
    from .document import Section
    from .progress import ensure

    progress = ensure(progress)
    cfg = SIZES[size]
    plt = plotting._plt()
    os.makedirs(outdir, exist_ok=True)
    seed = int(random_state)
    with torch_threads(1):
        # ---- multitask: block-diagonal by task
        progress.step("loss", f"multitask set ({cfg['n_mt']} points, 4 tasks): train an MLP")
        X, y, task = make_multitask(cfg["n_mt"], n_tasks=4, n_bits=8, k=2, interleave=True,
                                    random_state=seed)
        model = train_mlp(X, y, 8, epochs=cfg["mt_epochs"], seed=seed)
        mt_acc = float((model.predict(X) == y).mean())
        progress.step("loss", f"multitask: SGLD, {cfg['mt_chains']} chains x {cfg['mt_draws']} draws")
        sg = dict(MULTITASK_SGLD, n_draws=cfg["mt_draws"], n_chains=cfg["mt_chains"])
        lk_mt = LossKernel(model, **sg, random_state=seed).fit(X, y)
        ari_abs, _ = cluster_ari(np.abs(lk_mt.kernel_), task, 4)
        ari_clip, _ = cluster_ari(np.clip(lk_mt.kernel_, 0, None), task, 4)

        # ---- digits: heat map, embedding, visual grouping
        progress.step("loss", "digits: train an MLP on all 1,797 digits")
        Xd, yd = load_digits_images(as_images=False)
        dmodel = train_mlp(Xd, yd, 10, epochs=10, lr=0.05, batch_size=64, seed=seed)
        d_acc = float(dmodel.score(Xd, yd))
        rng = np.random.RandomState(seed)
        n_probe = cfg["n_probe"]
        idx = np.sort(rng.choice(len(Xd), n_probe, replace=False))
        progress.step("loss", f"digits: SGLD, {cfg['d_chains']} chains x {cfg['d_draws']} draws, "
                      f"kernel on {n_probe} digits")
        lk_d = LossKernel(dmodel, n_chains=cfg["d_chains"], n_draws=cfg["d_draws"],
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
        ari_d, _ = cluster_ari(np.clip(Kd, 0, None), yd[idx], 10)

        # ---- figures
        progress.step("loss", "plots")
        sec = Section(
            "loss", "The loss kernel",
            "The loss kernel is the correlation of two inputs' losses as the weights are sampled "
            "near the trained ones (SGLD): inputs the network handles with the same weights move "
            "together.")
        sec.networks = [(f"MLP {X.shape[1]}-128-8 on the multitask set (training accuracy)", mt_acc),
                        ("MLP 64-128-10 on all digits (training accuracy; the kernel needs no test set)", d_acc)]
        sec.summary.append(
            f"On a set of 4 interleaved tasks, spectral clustering of |K| recovers the tasks with "
            f"ARI {ari_abs:.2f}; on digits the mean correlation is {Kd[same & off].mean():.2f} "
            f"within a class against {Kd[~same].mean():.2f} across classes (clustering max(K, 0) "
            f"into 10 groups: ARI {ari_d:.2f} against the classes).")
        sec.data.update({"multitask_ari_abs": ari_abs, "multitask_ari_clip": ari_clip,
                         "digits_ari_clip": ari_d,
                         "digits_same_class": float(Kd[same & off].mean()),
                         "digits_other_class": float(Kd[~same].mean()),
                         "digits_spearman_tree": rho_signed, "digits_spearman_tree_abs": rho_abs,
                         "diverged": [int(lk_mt.diverged_.sum()), int(lk_d.diverged_.sum())]})
        sec.table("What the loss kernel found", ["measure", "value"], [
            ["multitask: ARI of spectral clustering of |K| against the 4 tasks", f"{ari_abs:.3f}"],
            ["multitask: ARI of spectral clustering of max(K, 0)", f"{ari_clip:.3f}"],
            ["digits: mean correlation, same class / different class",
             f"{Kd[same & off].mean():.3f} / {Kd[~same].mean():.3f}"],
            ["digits: ARI of spectral clustering of max(K, 0) against the 10 classes", f"{ari_d:.3f}"],
            ["digits: Spearman, class-mean K vs distance in a visual grouping of the digits",
             f"{rho_signed:.3f}"],
            ["digits: loss at the trained weights -> mean over SGLD draws",
             f"{lk_d.init_loss_:.3g} -> {np.nanmean(lk_d.draw_losses_):.3g}"],
            ["chains that diverged (multitask, digits)",
             f"{int(lk_mt.diverged_.sum())}, {int(lk_d.diverged_.sum())}"],
            # fewer than ~100 effective draws leave noise of about 1/sqrt(ess) in each entry
            ["effective SGLD draws, summed over chains (multitask, digits)",
             f"{float(np.sum(lk_mt.ess_)):.0f}, {float(np.sum(lk_d.ess_)):.0f} (entries carry noise "
             f"of about {1 / np.sqrt(max(float(np.sum(lk_mt.ess_)), 1)):.2f}, "
             f"{1 / np.sqrt(max(float(np.sum(lk_d.ess_)), 1)):.2f})"],
        ])
        fig, axes = plt.subplots(1, 2, figsize=(10.5, 4.6))
        plotting.plot_kernel_heatmap(lk_mt.kernel_, task, ax=axes[0], cmap="RdBu_r", vmin=-1, vmax=1,
                                     title="multitask: sorted by task", cbar_label="loss correlation",
                                     axis_label="task")
        plotting.plot_kernel_heatmap(Kd, yd[idx], ax=axes[1], cmap="RdBu_r", vmin=-1, vmax=1,
                                     title="digits: sorted by class", cbar_label="loss correlation",
                                     axis_label="digit class")
        p = os.path.join(outdir, "loss_kernel_heatmaps.png")
        plotting.save(fig, p)
        sec.figure(p, "The loss kernel (correlation) sorted by task (left; the rows are shuffled in "
                      "the data) and by digit class (right). Red blocks on the diagonal: inputs of "
                      "a task or class move together under the weight posterior.")

        fig, ax = plt.subplots(figsize=(5.6, 4.6))
        sc = ax.scatter(Z[:, 0], Z[:, 1], c=yd[idx], cmap="tab10", s=8, vmin=-0.5, vmax=9.5)
        for c in range(10):
            m = yd[idx] == c
            ax.annotate(str(c), Z[m].mean(0), fontsize=11, weight="bold")
        ax.set_xlabel("kernel PCA component 1")
        ax.set_ylabel("kernel PCA component 2")
        ax.set_title("digits: KernelPCA of the loss kernel", fontsize=9)
        cb = fig.colorbar(sc, ax=ax, ticks=range(10))
        cb.set_label("digit class")
        p = os.path.join(outdir, "loss_kernel_embedding.png")
        plotting.save(fig, p)
        sec.figure(p, "Two-dimensional kernel PCA of the digits' loss kernel, coloured by class "
                      "(the bold digit marks each class's mean).")

        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for ax, lk, name in ((axes[0], lk_mt, "multitask"), (axes[1], lk_d, "digits")):
            for c, tr in enumerate(lk.loss_traces_):
                ax.plot(tr, lw=0.6, label=f"chain {c}")
            ax.axhline(lk.init_loss_, color="k", ls="--", lw=0.8, label="loss at the trained weights")
            ax.axvline(lk.burn_in, color="grey", ls=":", lw=0.8, label="end of burn-in")
            ax.set_yscale("log")
            ax.set_xlabel("SGLD step")
            ax.set_ylabel("mini-batch loss (log scale)")
            ax.set_title(f"{name}: mini-batch loss per chain", fontsize=9)
            ax.grid(alpha=0.3)
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, 0.1, 1, 1))
        p = os.path.join(outdir, "loss_kernel_traces.png")
        plotting.save(fig, p)
        sec.figure(p, "The SGLD chains' mini-batch loss: after burn-in it should hover a little "
                      "above the trained weights' loss, neither drifting away nor diverging.")
    return sec
