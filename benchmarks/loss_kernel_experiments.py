"""Loss-kernel experiments (issue 5): the tables of benchmarks/README_loss_kernel.md.

Sections (``--sections``, default all):

- ``closed``: linear regression with a Gaussian local posterior: relative error of the streamed
  loss covariance against the closed form as draws grow, and of the sampler's parameter
  covariance against the exact stationary law of the discretised chain.
- ``multitask``: spectral clustering of the kernel recovers the tasks (ARI), 5 seeds, rows in
  task order and interleaved.
- ``hierarchy``: Spearman correlation between class-mean kernel similarity and tree distance, on
  the synthetic hierarchy and on digits (visual grouping ``skattr.datasets.DIGIT_GROUPS``), with
  seeds; sensitivity to the localisation γ and the inverse temperature nβ.
- ``mislabel``: digits with 10% flipped labels: detection AUC of kernel-based scores next to the
  per-example-loss baseline.
- ``defaults`` (issue 10): ARI at the *default* settings (``step_size="auto"``,
  ``thin="auto"``) on ``make_multitask`` and on ``make_multitask_subspaces``, 5 seeds each, with
  the self-checks (ESS, R-hat, split-half reliability); then a healthy and a broken run.
- ``fit`` (issue 11): the variance of each example's loss (``kind="covariance"``,
  ``variance_``) as a flipped-label score against how well the network fits its training
  labels: the main job's noisy-label digits MLP (``skattr.reports.hydra``, quick size) trained
  8 and 24 epochs, and ``make_hierarchy`` trained 1 to 40 epochs, next to the loss, the
  posterior mean loss, ``|grad l_i|^2`` and TRAK-1; then sampler variants on the under-trained
  digits network.

Run::

    python benchmarks/loss_kernel_experiments.py            # everything (about 15 min, 1 thread)
    python benchmarks/loss_kernel_experiments.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import print_table  # noqa: E402

from skattr import TorchModel  # noqa: E402
from skattr.datasets import (  # noqa: E402
    digit_groups_distance,
    flip_labels,
    load_digits_images,
    make_hierarchy,
    make_multitask,
    make_multitask_subspaces,
)
from skattr.estimators.loss_kernel import LossKernel  # noqa: E402
from skattr.reports.loss_kernel import (  # noqa: E402
    MULTITASK_SGLD,
    class_similarity,
    cluster_ari,
    mislabel_scores,
    spearman_vs_tree,
    train_mlp,
)


def _mean_sd(v):
    v = np.asarray(v, dtype=float)
    return f"{v.mean():.3f} ± {v.std():.3f}"


# ------------------------------------------------------------------------------ (1)
def closed_form(args):
    from torch import nn

    from skattr.sampling import LocalPosterior, SGLDSettings, chain_seeds, run_chain

    rows, prow = [], []
    nbeta, gamma, eps = 20.0, 5.0, 0.05
    draws_list = [50, 200, 1000] if args.quick else [50, 200, 1000, 4000]
    for seed in args.seeds[:3]:
        rng = np.random.default_rng(seed)
        n, d = 10, 3
        X = rng.normal(size=(n, d))
        y = X @ rng.normal(size=d) + 0.5 * rng.normal(size=n)
        w = np.linalg.lstsq(X, y, rcond=None)[0]
        net = nn.Linear(d, 1, bias=False).double()
        with torch.no_grad():
            net.weight.copy_(torch.as_tensor(w)[None])
        model = TorchModel(net, task="regression", dtype="float64", device="cpu")
        A = nbeta * X.T @ X / n + gamma * np.eye(d)
        Sig = np.linalg.inv(A - eps * A @ A / 4)  # exact law of the discretised chain
        Sig0 = np.linalg.inv(A)  # continuous-time target
        C = X @ Sig @ X.T
        m = X @ w - y
        K_true = 0.5 * C**2 + np.outer(m, m) * C
        errs = []
        for nd in draws_list:
            lk = LossKernel(model, kind="covariance", n_chains=2, n_draws=nd, burn_in=50, thin=1,
                            step_size=eps, localization=gamma, nbeta=nbeta, batch_size=n,
                            keep=None, random_state=seed).fit(X, y)
            errs.append(np.linalg.norm(lk.kernel_ - K_true) / np.linalg.norm(K_true))
        rows.append([seed] + errs)
        post = LocalPosterior(model, torch.as_tensor(X), model.encode_y(y, n))
        s = SGLDSettings(step_size=eps, localization=gamma, nbeta=nbeta, n_draws=draws_list[-1],
                         burn_in=50, thin=1, batch_size=n)
        W = np.vstack([run_chain(post, s, c, keep_draws=True).draws
                       for c in chain_seeds(seed, 2)]).astype(float)
        prow.append([seed, np.linalg.norm(W.mean(0) - w) / np.linalg.norm(np.sqrt(np.diag(Sig))),
                     np.linalg.norm(np.cov(W.T) - Sig) / np.linalg.norm(Sig),
                     np.linalg.norm(Sig - Sig0) / np.linalg.norm(Sig0)])
    print_table(rows, ["seed"] + [f"{2 * nd} draws" for nd in draws_list],
                title="(1a) Linear regression, Gaussian local posterior: |K_hat - K| / |K| of the "
                      "streamed loss covariance (2 chains, eps=0.05, gamma=5, nbeta=20)")
    print_table(prow, ["seed", "rel. error of the mean (in sd)", "rel. Frobenius error of Cov vs Sigma_eps",
                       "Sigma_eps vs A^-1 (discretisation bias)"],
                title=f"(1b) Sampler stationary law on the quadratic loss ({2 * draws_list[-1]} "
                      "draws): parameter mean and covariance vs the exact law of the chain")


# ------------------------------------------------------------------------------ (2)
def multitask(args):
    rows = []
    sg = dict(MULTITASK_SGLD)
    n = 400 if args.quick else 800
    if args.quick:
        sg.update(n_chains=2, n_draws=100)
    for seed in args.seeds:
        for inter in (False, True):
            X, y, task = make_multitask(n, n_tasks=4, n_bits=8, k=2, interleave=inter,
                                        random_state=seed)
            model = train_mlp(X, y, 8, epochs=60, seed=seed)
            t = time.perf_counter()
            lk = LossKernel(model, **sg, random_state=seed).fit(X, y)
            secs = time.perf_counter() - t
            K = lk.kernel_
            a_abs, _ = cluster_ari(np.abs(K), task, 4)
            a_clip, _ = cluster_ari(np.clip(K, 0, None), task, 4)
            T = task[:, None] == task[None, :]
            rows.append([seed, "interleaved" if inter else "by task", model.score(X, y),
                         np.abs(K[T & ~np.eye(n, dtype=bool)]).mean(), np.abs(K[~T]).mean(),
                         a_abs, a_clip, secs])
            print(f"  multitask seed {seed} {'interleaved' if inter else 'ordered'}: "
                  f"ARI |K| {a_abs:.3f}", flush=True)
    print_table(rows, ["seed", "row order", "train acc", "mean abs(K) same task",
                       "mean abs(K) across tasks", "ARI (abs K)", "ARI (max(K,0))", "LossKernel s"],
                title=f"(2) Multitask sparse parity (4 tasks x 8 bits, k=2, {n} points, MLP "
                      f"{'-'.join(['36', '128', '8'])}); SGLD {sg}")
    for order in ("by task", "interleaved"):
        v = [r[5] for r in rows if r[1] == order]
        print(f"ARI (abs K) {order}: {_mean_sd(v)}, min {min(v):.3f} over seeds {args.seeds}")


# ------------------------------------------------------------------------------ (3)
def hierarchy(args):
    rows = []
    n = 450
    sg = dict(n_chains=4, n_draws=100 if args.quick else 200, burn_in=100, thin=5,
              step_size=1e-3, localization=100.0)
    for seed in args.seeds:
        X, y, D = make_hierarchy(n, (3, 3), 20, scales=(2.0, 0.7), noise=1.0, random_state=seed)
        model = train_mlp(X, y, 9, epochs=30, seed=seed)
        lk = LossKernel(model, **sg, random_state=seed).fit(X, y)
        S = class_similarity(lk.kernel_, y, 9)
        Sa = class_similarity(np.abs(lk.kernel_), y, 9)
        rows.append(["synthetic 3x3", seed, model.score(X, y), spearman_vs_tree(S, D),
                     spearman_vs_tree(Sa, D), S[D == 2].mean(), S[D == 4].mean()])
        print(f"  hierarchy seed {seed} done", flush=True)
    Xd, yd = load_digits_images(as_images=False)
    Dd = digit_groups_distance()
    for seed in args.seeds:
        model = train_mlp(Xd, yd, 10, epochs=10, batch_size=64, seed=seed)
        idx = np.sort(np.random.RandomState(seed).choice(len(Xd), 600, replace=False))
        lk = LossKernel(model, **{**sg, "n_chains": 2 if args.quick else 4}, random_state=seed)
        lk.fit(Xd[idx], yd[idx], X_sample=Xd, y_sample=yd)
        S = class_similarity(lk.kernel_, yd[idx], 10)
        Sa = class_similarity(np.abs(lk.kernel_), yd[idx], 10)
        rows.append(["digits (visual groups)", seed, model.score(Xd, yd), spearman_vs_tree(S, Dd),
                     spearman_vs_tree(Sa, Dd), S[Dd == 2].mean(), S[Dd == 4].mean()])
        print(f"  digits seed {seed} done", flush=True)
    print_table(rows, ["data", "seed", "train acc", "Spearman(mean K, dist)",
                       "Spearman(mean abs K, dist)", "mean K siblings", "mean K cousins"],
                title=f"(3a) Class-mean kernel similarity vs tree distance; SGLD {sg}")
    for data in ("synthetic 3x3", "digits (visual groups)"):
        a = [r[3] for r in rows if r[0] == data]
        b = [r[4] for r in rows if r[0] == data]
        print(f"{data}: Spearman signed {_mean_sd(a)}, |K| {_mean_sd(b)}")

    # sensitivity to gamma and nbeta (synthetic hierarchy, seed 0)
    X, y, D = make_hierarchy(n, (3, 3), 20, scales=(2.0, 0.7), noise=1.0, random_state=0)
    model = train_mlp(X, y, 9, epochs=30, seed=0)
    srows = []
    for gamma in (10.0, 100.0, 1000.0):
        for nbeta in (10.0, None, 300.0):
            lk = LossKernel(model, **{**sg, "n_chains": 2, "n_draws": 100, "localization": gamma,
                                      "nbeta": nbeta}, random_state=0).fit(X, y)
            S = class_similarity(lk.kernel_, y, 9)
            Sa = class_similarity(np.abs(lk.kernel_), y, 9)
            same = y[:, None] == y[None, :]
            off = ~np.eye(n, dtype=bool)
            srows.append([gamma, f"{lk.nbeta_:.1f}" + (" (m/ln m)" if nbeta is None else ""),
                          f"{lk.init_loss_:.3g} -> {np.nanmean(lk.draw_losses_):.3g}",
                          lk.kernel_[same & off].mean(), lk.kernel_[~same].mean(),
                          spearman_vs_tree(S, D), spearman_vs_tree(Sa, D)])
    print_table(srows, ["gamma", "nbeta", "loss w* -> draws", "mean K same class",
                        "mean K other class", "Spearman(K)", "Spearman(abs K)"],
                title="(3b) Sensitivity to localisation gamma and inverse temperature nbeta "
                      "(synthetic hierarchy, seed 0, 2 chains x 100 draws)")


# ------------------------------------------------------------------------------ (4)
def mislabel(args):
    from sklearn.metrics import roc_auc_score

    X, y = load_digits_images(as_images=False)
    rows = []
    sg = dict(n_chains=2 if args.quick else 4, n_draws=100 if args.quick else 150, burn_in=100,
              thin=5, step_size=1e-3, localization=100.0)
    names = None
    for epochs in args.mislabel_epochs:
        for seed in args.seeds:
            yn, flipped = flip_labels(y, 0.1, random_state=seed)
            model = train_mlp(X, yn, 10, epochs=epochs, batch_size=64, seed=seed)
            lk = LossKernel(model, kind="correlation", **sg, random_state=seed).fit(X, yn)
            loss = model.per_example_loss(X, yn)
            sc = mislabel_scores(lk, yn, loss)
            names = list(sc)
            rows.append([epochs, seed, model.score(X, yn), model.score(X, y)]
                        + [roc_auc_score(flipped, sc[k]) for k in names])
            print(f"  mislabel epochs {epochs} seed {seed} done", flush=True)
    print_table(rows, ["epochs", "seed", "acc (noisy labels)", "acc (true labels)"]
                + [f"AUC {k}" for k in names],
                title=f"(4) Digits, 10% labels flipped ({len(X)} points, MLP 64-128-10): "
                      f"mislabel detection AUC; SGLD {sg}")
    for epochs in args.mislabel_epochs:
        sub = [r for r in rows if r[0] == epochs]
        print(f"{epochs} epochs: " + "; ".join(
            f"AUC {k} {_mean_sd([r[4 + j] for r in sub])}" for j, k in enumerate(names)))


# ------------------------------------------------------------------------------ (5)
def defaults(args):
    from skattr.sampling import SamplerDiagnosticWarning

    rows = []
    for name in ("make_multitask", "make_multitask_subspaces"):
        for seed in args.seeds:
            if name == "make_multitask":
                X, y, task = make_multitask(800, n_tasks=4, n_bits=8, k=2, interleave=True,
                                            random_state=seed)
                model, T = train_mlp(X, y, 8, epochs=60, seed=seed), 4
            else:
                X, y, task = make_multitask_subspaces(600, random_state=seed)
                model, T = train_mlp(X, y, 6, epochs=60, seed=seed), 3
            t = time.perf_counter()
            lk = LossKernel(model, random_state=seed).fit(X, y)  # every setting at its default
            secs = time.perf_counter() - t
            a_abs, _ = cluster_ari(np.abs(lk.kernel_), task, T)
            a_clip, _ = cluster_ari(np.clip(lk.kernel_, 0, None), task, T)
            rows.append([name, seed, model.score(X, y), f"{lk.step_size_:.3g}", lk.thin_,
                         f"{np.nanmin(lk.ess_):.0f}-{np.nanmax(lk.ess_):.0f}",
                         f"{np.nanmax(lk.rhat_):.3f}", lk.split_half_reliability_, a_abs,
                         a_clip, secs])
            print(f"  {name} seed {seed}: ARI |K| {a_abs:.3f}", flush=True)
    print_table(rows, ["data", "seed", "train acc", "step_size_", "thin_", "ess_ per chain",
                       "max rhat_", "split-half r", "ARI (abs K)", "ARI (max(K,0))", "fit s"],
                title="(5a) LossKernel at its defaults (4 chains x 200 draws, gamma=100, "
                      "step_size='auto', thin='auto'); MLP one hidden layer of 128; "
                      "make_multitask 800 pts, 4 tasks, interleaved; "
                      "make_multitask_subspaces 600 pts, 3 tasks")
    for name in ("make_multitask", "make_multitask_subspaces"):
        v = [r[8] for r in rows if r[0] == name]
        print(f"ARI (abs K) {name}: {_mean_sd(v)}, min {min(v):.3f} over seeds {args.seeds}")

    # healthy vs broken runs (seed 0 of the second set)
    X, y, task = make_multitask_subspaces(600, random_state=0)
    model = train_mlp(X, y, 6, epochs=60, seed=0)
    healthy = LossKernel(model, random_state=0).fit(X, y)
    eps = healthy.step_size_
    drows = []
    for label, kw in (("healthy (defaults)", {}),
                      ("broken: step x 1/100, thin 1", dict(step_size=eps / 100, thin=1)),
                      ("broken: step x 10", dict(step_size=eps * 10)),
                      ("broken: step x 100", dict(step_size=eps * 100))):
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            try:
                lk = healthy if not kw else LossKernel(model, random_state=0, **kw).fit(X, y)
            except (ValueError, FloatingPointError) as e:
                print(f"{label}: {type(e).__name__}: {e}")
                continue
        msgs = [str(w.message) for w in rec if issubclass(w.category, (SamplerDiagnosticWarning,
                                                                         UserWarning))]
        a_abs, _ = cluster_ari(np.abs(lk.kernel_), task, 3)
        drows.append([label, f"{lk.step_size_:.3g}", lk.thin_,
                      " ".join(f"{e:.0f}" for e in lk.ess_),
                      " ".join(f"{r:.3f}" for r in lk.rhat_), f"{lk.rhat_pooled_:.3f}",
                      lk.split_half_reliability_, a_abs, len(msgs)])
        for m in msgs:
            print(f"{label} warning: {m}")
    print_table(drows, ["run", "step_size_", "thin_", "ess_", "rhat_", "rhat_pooled_",
                        "split-half r", "ARI (abs K)", "warnings"],
                title="(5b) Self-checks on a healthy and on broken runs "
                      "(make_multitask_subspaces, seed 0)")


# ------------------------------------------------------------------------------ (6)
def fit(args):
    from scipy.stats import spearmanr
    from torch import nn

    from skattr.estimators import TRAK
    from skattr.metrics import mislabel_detection_auc as auc
    from skattr.reports import hydra as H

    def found(s, flipped):
        return float(flipped[np.argsort(-s, kind="stable")[: int(flipped.sum())]].mean())

    def data(name, seed):
        if name == "digits":
            cfg = H.SIZES["quick"]
            X, y = load_digits_images(as_images=False)
            tr = np.random.RandomState(seed).permutation(len(X))[: cfg["n_train"]]
            X, y = X[tr], y[tr]
        else:
            X, y, _ = make_hierarchy(600, branching=(3, 3), n_features=20, noise=1.5,
                                     random_state=seed)
            perm = np.random.RandomState(seed).permutation(len(X))[:400]
            X, y = X[perm], y[perm]
        yn, flipped = flip_labels(y, 0.1, random_state=seed)
        return X, yn, flipped

    def train(name, epochs, seed, X, yn):
        if name == "digits":
            return H._recipe(H.SIZES["quick"]["width"], epochs, seed).fit(X, yn)
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                            nn.Linear(64, 9))
        return TorchModel(net, epochs=epochs, batch_size=64, lr=0.01, momentum=0.9,
                          weight_decay=5e-4, lr_schedule="cosine", device="cpu",
                          random_state=seed).fit(X, yn)

    def scores(model, X, yn, **kw):
        t = time.perf_counter()
        lk = LossKernel(model, kind="covariance", keep=None, **kw).fit(X, yn)
        return lk, time.perf_counter() - t

    runs = [("digits", 8), ("digits", 24), ("hierarchy", 1), ("hierarchy", 2),
            ("hierarchy", 40)]
    if args.quick:
        runs = [("digits", 8), ("digits", 24)]
    rows = []
    for seed in args.seeds:
        for name, epochs in runs:
            X, yn, flipped = data(name, seed)
            model = train(name, epochs, seed, X, yn)
            loss = model.per_example_loss(X, yn)
            G = np.asarray(model.per_example_gradients(X, yn), dtype=np.float64)
            g2 = (G**2).sum(1)
            with torch.no_grad():
                p = torch.softmax(model.logits(X).double(), 1).numpy()
            p_true = p[np.arange(len(yn)), model.encode_y(yn, len(yn)).cpu().numpy()]
            trak = TRAK(model, models=[model], projection_dim=256, output="loss").fit(
                X, yn).self_influence()
            lk, secs = scores(model, X, yn, random_state=seed)
            v = lk.variance_
            rows.append([name, epochs, seed, model.score(X[~flipped], yn[~flipped]),
                         float(np.median(p_true)), lk.init_loss_,
                         float(np.nanmean(lk.draw_losses_)),
                         f"{auc(v, flipped):.3f} ({found(v, flipped):.2f})",
                         f"{auc(lk.mean_loss_, flipped):.3f}",
                         f"{auc(loss, flipped):.3f} ({found(loss, flipped):.2f})",
                         f"{auc(g2, flipped):.3f}",
                         f"{auc(trak, flipped):.3f} ({found(trak, flipped):.2f})",
                         f"{spearmanr(v, g2)[0]:.2f}", f"{spearmanr(v, loss)[0]:.2f}", secs])
            print(f"  fit {name} {epochs} epochs seed {seed} done", flush=True)
    print_table(rows, ["data", "epochs", "seed", "acc (unflipped)", "median p(label)",
                       "init_loss_", "mean draw loss", "AUC variance (top-q share)",
                       "AUC mean_loss_", "AUC loss (top-q)", "AUC |grad|^2", "AUC TRAK-1 (top-q)",
                       "spearman(var, |grad|^2)", "spearman(var, loss)", "LK fit s"],
                title="(6a) Flipped-label detection by the loss-kernel variance (LossKernel "
                      "defaults, kind='covariance') against the network's fit; 400 training "
                      "points, 10% flipped; top-q = share of the flips among as many top "
                      "suspects as flips")

    # sampler settings on the under-trained digits network (seed: the first)
    seed = args.seeds[0]
    X, yn, flipped = data("digits", seed)
    model = train("digits", 8, seed, X, yn)
    variants = [("defaults", {}), ("step_size 6.25e-4", dict(step_size=6.25e-4)),
                ("step_size 1e-4", dict(step_size=1e-4)),
                ("localization 1000", dict(localization=1000.0)),
                ("burn_in 1000", dict(burn_in=1000)), ("n_draws 400", dict(n_draws=400)),
                ("nbeta 400", dict(nbeta=400.0))]
    if args.quick:
        variants = variants[:2]
    vrows = []
    for label, kw in variants:
        lk, secs = scores(model, X, yn, random_state=seed, **kw)
        v = lk.variance_
        vrows.append([label, f"{lk.step_size_:.3g}", lk.thin_, f"{lk.nbeta_:.1f}",
                      lk.init_loss_, float(np.nanmean(lk.draw_losses_)),
                      f"{np.nansum(lk.ess_):.0f}", f"{lk.rhat_pooled_:.3f}",
                      lk.split_half_reliability_, f"{auc(v, flipped):.3f}",
                      f"{found(v, flipped):.2f}", f"{auc(lk.mean_loss_, flipped):.3f}", secs])
        print(f"  variant {label} done", flush=True)
    print_table(vrows, ["LossKernel", "step_size_", "thin_", "nbeta_", "init_loss_",
                        "mean draw loss", "sum ess_", "rhat_pooled_", "split-half r",
                        "AUC variance", "top-q share", "AUC mean_loss_", "fit s"],
                title=f"(6b) Sampler settings on the digits MLP trained 8 epochs (seed {seed})")


SECTIONS = {"closed": closed_form, "multitask": multitask, "hierarchy": hierarchy,
            "mislabel": mislabel, "defaults": defaults, "fit": fit}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sections", default=",".join(SECTIONS))
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--mislabel-epochs", default="30,200",
                   help="training epochs on the noisy labels (comma-separated regimes)")
    args = p.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.mislabel_epochs = [int(e) for e in str(args.mislabel_epochs).split(",")]
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", UserWarning)
    print(f"== loss-kernel experiments == torch {torch.__version__}, threads "
          f"{torch.get_num_threads()}, seeds {args.seeds}{', quick' if args.quick else ''}")
    for name in args.sections.split(","):
        t = time.perf_counter()
        SECTIONS[name.strip()](args)
        print(f"[{name}: {time.perf_counter() - t:.0f} s]\n", flush=True)


if __name__ == "__main__":
    main()
