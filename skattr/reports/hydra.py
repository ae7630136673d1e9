"""Main-job section: HYDRA on noisy labels, next to TracIn, influence functions, TRAK, the loss
kernel and the loss.

A fraction of the digits training labels is flipped (to another class drawn uniformly); an MLP is
trained on the noisy set with a :class:`~skattr.TrajectoryRecorder`; each method ranks the
training examples by its self-influence (the loss kernel: the variance of the example's loss under
local SGLD; higher = more suspicious) and the section reports the
share of the flipped labels found among as many top-ranked suspects as labels were flipped, the
ROC AUC, the detection curve and the top suspects' images.  ``benchmarks/noisy_labels.py`` runs
the larger study (and retraining without the suspects).
"""

from __future__ import annotations

import os
import time
import warnings

import numpy as np
import torch
from torch import nn

from .. import plotting
from ..datasets import flip_labels
from ..estimators import HYDRA, TRAK, LossKernel, TracIn
from ..metrics import mislabel_detection_auc, mislabel_detection_curve
from ..model import TorchModel
from ..training import TrajectoryRecorder
from .document import Section
from .progress import ensure

__all__ = ["hydra_report", "SIZES", "n_steps"]

#: training / test points, label noise, MLP width, epochs, projection size.  The epochs are
#: enough for the network to fit its unflipped training labels: with fewer, every score but
#: TRAK-1's ranks the flips near chance (benchmarks/README.md, "Loss-kernel variance and the
#: network's fit").
SIZES = {
    "tiny": dict(n_train=150, n_test=100, noise=0.1, width=32, epochs=45, k=128),
    "quick": dict(n_train=400, n_test=200, noise=0.1, width=64, epochs=24, k=256),
    "default": dict(n_train=600, n_test=300, noise=0.1, width=128, epochs=10, k=512),
    "full": dict(n_train=1500, n_test=297, noise=0.1, width=256, epochs=10, k=1024),
}


def n_steps(size):
    """Progress steps of this section at ``size``."""
    return 8


#: Loss-kernel chains and draws per chain for the variance (the sampler's other settings are
#: LossKernel's defaults, step size calibrated).
_LK = dict(n_chains=2, n_draws=100)


def _recipe(width, epochs, seed, **kw):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                        nn.Linear(width, 10))
    return TorchModel(net, epochs=epochs, batch_size=64, lr=0.05, momentum=0.9, weight_decay=5e-4,
                      lr_schedule="cosine", device="cpu", random_state=seed, **kw)


def hydra_report(outdir, *, random_state=0, size="default", progress=None, verbose=0):
    """Noisy-label detection by self-influence; returns a :class:`Section`."""
    from ..datasets import load_digits_images

    progress = ensure(progress)
    cfg = SIZES[size]
    os.makedirs(outdir, exist_ok=True)
    seed = int(random_state)
    X, y = load_digits_images(as_images=False)
    rng = np.random.RandomState(seed)
    perm = rng.permutation(len(X))
    tr, te = perm[: cfg["n_train"]], perm[cfg["n_train"]: cfg["n_train"] + cfg["n_test"]]
    Xtr, ytrue, Xte, yte = X[tr], y[tr], X[te], y[te]
    ytr, flipped = flip_labels(ytrue, cfg["noise"], random_state=seed)
    n_flip = int(flipped.sum())
    name = f"MLP 64-{cfg['width']}-{cfg['width']}-10"
    progress.step("hydra", f"train {name} on {len(Xtr)} digits, {n_flip} labels flipped, "
                  "recording the trajectory")
    model = _recipe(cfg["width"], cfg["epochs"], seed, callbacks=[TrajectoryRecorder()]).fit(Xtr, ytr)
    rec = model.callbacks_[0]
    acc = float(model.score(Xte, yte))
    fit_clean = float(model.score(Xtr[~flipped], ytr[~flipped]))
    fit_flip = float(model.score(Xtr[flipped], ytr[flipped]))
    k = cfg["k"]

    def loss():
        with torch.no_grad():
            z = model.logits(Xtr)
            return model.loss_fn(z, model.encode_y(ytr, len(ytr))).cpu().numpy()

    def hydra():
        return HYDRA(_recipe(cfg["width"], cfg["epochs"], seed), projection_dim=k,
                     trajectory=rec).fit(Xtr, ytr).self_influence()

    def tracin():
        return TracIn(model, checkpoints=rec, projection_dim=k, output="loss").fit(Xtr, ytr).self_influence()

    def influence():
        from ..estimators import InfluenceFunction

        return InfluenceFunction(model, solver="ekfac", damping=0.1).fit(Xtr, ytr).self_influence()

    def trak():
        trak_ = TRAK(model, models=[model], projection_dim=k, output="loss")
        return trak_.fit(Xtr, ytr).self_influence()

    def loss_kernel():
        lk = LossKernel(model, kind="covariance", keep=None, random_state=seed, **_LK).fit(Xtr, ytr)
        return lk.variance_

    methods = [(f"HYDRA (k={k})", hydra), (f"TracIn (k={k}, epoch checkpoints)", tracin),
               ("IF (EK-FAC, damping 0.1)", influence), (f"TRAK-1 (k={k}, loss output)", trak),
               (f"loss-kernel variance ({_LK['n_chains']} chains x {_LK['n_draws']} draws, "
                "auto step)", loss_kernel),
               ("loss at the trained network", loss)]
    scores, rows, secs, warned = {}, [], {}, []
    for label, fn in methods:
        progress.step("hydra", f"self-influence: {label}")
        t = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:  # the active filters still apply
            s = np.asarray(fn(), dtype=np.float64)
        secs[label] = time.perf_counter() - t
        for w in caught:  # shown as usual; the method's own warnings are named in the section
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning)):
                warned.append(f"{label}: {w.category.__name__}: {str(w.message).split('. ')[0]}.")
        if not np.all(np.isfinite(s)):
            raise FloatingPointError(f"{label}: self-influence has non-finite entries.")
        scores[label] = s
        top = np.argsort(-s, kind="stable")[:n_flip]
        found = float(flipped[top].mean())
        rows.append([label, f"{found:.2f}", f"{mislabel_detection_auc(s, flipped):.3f}",
                     f"{secs[label]:.1f}"])
    sec = Section(
        "hydra", "HYDRA: noisy labels",
        "HYDRA follows the SGD run and carries, for every training example, the derivative of the "
        "trained weights with respect to that example's loss weight; an example's self-influence "
        "(how much it lowered its own loss) is large for labels the network could only memorise.")
    sec.networks = [(f"{name} trained on {cfg['noise']:.0%} flipped labels", acc)]
    found = {r[0]: float(r[1]) for r in rows}
    aucs = {r[0]: float(r[2]) for r in rows}
    hk, tk, ik, rk, lkk, lok = (m[0] for m in methods)
    sec.summary.append(
        f"Of the {n_flip} flipped labels among {len(Xtr)} training digits, HYDRA's top {n_flip} "
        f"suspects hold {found[hk]:.0%}; TracIn's {found[tk]:.0%}, influence functions' "
        f"{found[ik]:.0%}, TRAK-1's {found[rk]:.0%}, the loss kernel's variance's "
        f"{found[lkk]:.0%}, the plain loss's {found[lok]:.0%} (chance {cfg['noise']:.0%}; ROC AUC "
        f"{min(aucs.values()):.3f}-{max(aucs.values()):.3f}).")
    sec.data.update({"n_flipped": n_flip, "found_in_top": found, "auc": aucs,
                     "train_accuracy_clean": fit_clean})
    sec.text(f"{len(Xtr)} training digits, {n_flip} of them ({cfg['noise']:.0%}) relabelled to a "
             f"random other class; {name} trained {cfg['epochs']} epochs (SGD, momentum 0.9, "
             "weight decay 5e-4, cosine learning rate, batch 64); it predicts the given label of "
             f"{fit_clean:.0%} of the unflipped and {fit_flip:.0%} of the flipped training "
             "digits. Each method ranks the training examples by self-influence (the loss kernel "
             "by the variance of the example's loss under local SGLD around the trained weights); "
             "a person would inspect the top of the list.")
    sec.table(f"Share of the flipped labels among each method's top {n_flip} suspects", [
        "method", f"flipped among top {n_flip}", "ROC AUC", "seconds"], rows)
    if warned:
        sec.text("Warnings raised while scoring: " + " ".join(dict.fromkeys(warned)))
    progress.step("hydra", "plots")
    plt = plotting._plt()
    fig, ax = plt.subplots(figsize=(6.2, 4))
    for label, s in scores.items():
        q, rec_, _ = mislabel_detection_curve(s, flipped)
        ax.plot(q, rec_, label=label)
    ax.plot([0, 1], [0, 1], color="grey", ls=":", label="random order")
    ax.axvline(cfg["noise"], color="k", lw=0.6, ls="--")
    ax.set_xlabel("fraction of the training set inspected (most suspicious first)")
    ax.set_ylabel("fraction of the flipped labels found")
    ax.set_xlim(0, 0.5)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)  # outside the lines
    path = os.path.join(outdir, "detection_curve.png")
    plotting.save(fig, path)
    sec.figure(path, "Flipped labels found against the share of the training set inspected, "
                     f"per method (dashed line: {cfg['noise']:.0%}, the share flipped).")
    top = np.argsort(-scores[hk], kind="stable")[:12]
    titles = [f"given {ytr[i]}, true {ytrue[i]}" + ("\nFLIPPED" if flipped[i] else "\nclean")
              for i in top]
    fig = plotting.plot_image_grid(Xtr[top], titles, ncols=6, image_shape=(8, 8))
    path = os.path.join(outdir, "top_suspects.png")
    plotting.save(fig, path)
    sec.figure(path, "HYDRA's 12 most suspicious training digits: the label given in training, "
                     "the true label, and whether it was flipped.")
    return sec
