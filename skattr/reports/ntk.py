"""Main-job section: approximate eNTK kernels and kernel-machine surrogates on digits.

Trains an MLP and a small CNN on sklearn's digits (8x8 images, shipped with scikit-learn: no
download); computes every kernel exact and projected; fits kGLM, KLR, SVC and kernel-ridge
surrogates to the network's own outputs; reports Kendall-tau fidelity to the network and the
test-accuracy differential, with plots and the test points the best surrogate follows most and
least closely.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from .. import plotting
from ..cache import FeatureCache
from ..estimators import EmbeddingKernel, EmpiricalNTK, GradCosKernel, PseudoNTK, TraceNTK
from ..model import TorchModel
from ..surrogates import KernelSurrogate, accuracy_differential
from .document import Section
from .progress import ensure

__all__ = ["ntk_report", "make_mlp", "make_cnn", "digits_task", "format_table", "SIZES", "n_steps"]

PAPER_MNIST2_MLP = {"kglm": 0.708, "svc": 0.732}

ESTIMATORS = ("kglm", "klr", "svc", "krr")
EST_NAMES = {"kglm": "kGLM", "klr": "KLR", "svc": "SVC", "krr": "KRR"}

#: Sizes per run size: training / test points (None: the whole 70/30 split), networks, tasks,
#: projection sizes, whether the full eNTK runs ("binary": only on 0-vs-1), MLP width, epochs,
#: and where KLR runs ("all", or "mlp-trntk": on 10 classes only on the MLP's exact trNTK -- its
#: L-BFGS solve costs about 20 s per 10-class kernel at 500 training points, as much as the rest
#: of a network's kernels and surrogates together).
SIZES = {
    "tiny": dict(n_train=150, n_test=80, archs=("MLP",), tasks=(10,), dims=(32, 128),
                 entk="none", width=32, epochs=40, klr="mlp-trntk"),
    "quick": dict(n_train=300, n_test=200, archs=("MLP", "CNN"), tasks=(2, 10), dims=(64, 256),
                  entk="binary", width=256, epochs=30, klr="mlp-trntk"),
    "default": dict(n_train=500, n_test=200, archs=("MLP", "CNN"), tasks=(2, 10),
                    dims=(64, 256, 1024), entk="binary", width=256, epochs=30, klr="mlp-trntk"),
    "full": dict(n_train=None, n_test=None, archs=("MLP", "CNN"), tasks=(2, 10),
                 dims=(64, 256, 1024, 4096), entk="all", width=256, epochs=30, klr="all"),
}


def n_steps(size):
    """Progress steps of this section at ``size``."""
    s = SIZES[size]
    return 3 * len(s["archs"]) * len(s["tasks"]) + 1


def make_mlp(n_classes, width=256):
    """MLP 64-width-width-C."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
        nn.Linear(width, n_classes),
    )


def make_cnn(n_classes):
    """A small CNN for 1x8x8 digits: two Conv2d layers (the second strided) and a Linear head."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.ReLU(), nn.Flatten(), nn.Linear(32 * 4 * 4, n_classes),
    )


def digits_task(n_classes, *, images, random_state=0, test_size=0.3):
    """Train/test split of digits (0-vs-1 for ``n_classes=2``), scaled to [0, 1], float32."""
    X, y = load_digits(n_class=n_classes, return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    if images:
        X = X.reshape(-1, 1, 8, 8)
    return train_test_split(X, y, test_size=test_size, random_state=random_state, stratify=y)


def _arch_name(arch, C, width):
    if arch == "MLP":
        return f"MLP 64-{width}-{width}-{C}"
    return f"CNN conv16-conv32-{C}"


def _task_name(C):
    return "0-vs-1" if C == 2 else "10-class"


def _exact_kernels(model, C, entk):
    exact = [("trNTK", TraceNTK(model)), ("pNTK", PseudoNTK(model)),
             ("embedding", EmbeddingKernel(model)), ("Grad-Cos", GradCosKernel(model))]
    if entk == "all" or (entk == "binary" and C == 2):
        exact.append(("eNTK (full)", EmpiricalNTK(model)))
    return exact


def _proj_kernels(model, dims, cache):
    proj = []
    for k in dims:
        proj.append(("proj-trNTK", TraceNTK(model, projection_dim=k, memory=cache)))
        proj.append(("proj-pNTK", PseudoNTK(model, projection_dim=k, memory=cache)))
    return proj


def _surrogates(kernels, arch, task, Xtr, Xte, yte, y_net, base, random_state, klr, keep=None):
    rows = []
    for name, kern in kernels:
        for est in ESTIMATORS:
            if isinstance(kern, EmpiricalNTK) and est != "krr":
                continue  # the (sample, class) kernel needs a regressor
            if est == "klr" and klr != "all" and task == "10-class" and (name, arch) != ("trNTK", "MLP"):
                continue  # stated in the table and the plot's caption
            t = time.perf_counter()
            sur = KernelSurrogate(kern, est, random_state=random_state).fit(Xtr)
            tau = sur.score(Xte, yte)
            acc_diff = accuracy_differential(yte, sur.predict(Xte), y_net)
            rows.append(dict(base, kernel=name, projection_dim=kern.get_params().get("projection_dim"),
                             estimator=est, tau=tau, acc_diff=acc_diff,
                             seconds=time.perf_counter() - t))
            if keep is not None:
                keep[(arch, task, name, est)] = sur
    return rows


def ntk_report(outdir, *, random_state=0, size="default", progress=None, verbose=0):
    """Run the eNTK surrogate study at ``size``; write plots; return a :class:`Section`.

    ``section.data["rows"]`` holds one row per (network, task, kernel, projection_dim,
    estimator), as written to ``results.csv``.
    """
    progress = ensure(progress)
    cfg = SIZES[size]
    os.makedirs(outdir, exist_ok=True)
    rows, heat, keep, nets, ex = [], {}, {}, [], {}
    for arch in cfg["archs"]:
        for C in cfg["tasks"]:
            images = arch == "CNN"
            task = _task_name(C)
            Xtr, Xte, ytr, yte = digits_task(C, images=images, random_state=random_state)
            if cfg["n_train"] is not None:
                Xtr, ytr = Xtr[: cfg["n_train"]], ytr[: cfg["n_train"]]
                Xte, yte = Xte[: cfg["n_test"]], yte[: cfg["n_test"]]
            name = _arch_name(arch, C, cfg["width"])
            progress.step("ntk", f"train {name} on digits {task} ({len(Xtr)} images)")
            torch.manual_seed(random_state)
            t0 = time.perf_counter()
            module = make_mlp(C, cfg["width"]) if arch == "MLP" else make_cnn(C)
            model = TorchModel(module, epochs=cfg["epochs"], lr=0.01, momentum=0.9, batch_size=32,
                               random_state=random_state).fit(Xtr, ytr)
            base = {"model": arch, "task": task, "net_acc": model.score(Xte, yte),
                    "train_seconds": time.perf_counter() - t0}
            nets.append((f"{name} (digits {task})", base["net_acc"]))
            y_net = model.predict(Xte)
            exact = _exact_kernels(model, C, cfg["entk"])
            progress.step("ntk", f"{name}, {task}: exact kernels "
                          f"({', '.join(n for n, _ in exact)}) x surrogates")
            rows += _surrogates(exact, arch, task, Xtr, Xte, yte, y_net, base, random_state,
                                cfg["klr"], keep if C == 10 else None)
            progress.step("ntk", f"{name}, {task}: projected trNTK, pNTK at k = "
                          f"{', '.join(map(str, cfg['dims']))} x surrogates")
            rows += _surrogates(_proj_kernels(model, cfg["dims"], FeatureCache()), arch, task, Xtr,
                                Xte, yte, y_net, base, random_state, cfg["klr"])
            if C == 10:
                heat[arch] = (TraceNTK(model).fit(Xte).transform(Xte), yte)
                ex[arch] = (model, Xte, yte)
    progress.step("ntk", "plots and examples")
    sec = Section(
        "ntk", "Kernels and surrogates",
        "A surrogate is a kernel machine fitted to the network's own predictions on a kernel "
        "derived from the network; its fidelity tau is the Kendall rank correlation, over test "
        "points, between the network's and the surrogate's probability of the true class.")
    sec.networks = nets
    sec.data["rows"] = rows
    _write(sec, rows, heat, keep, ex, outdir, cfg)
    return sec


def _best(rows, **where):
    sel = [r for r in rows if all(r[k] == v for k, v in where.items()) and np.isfinite(r["tau"])]
    return max(sel, key=lambda r: r["tau"]) if sel else None


def _write(sec, rows, heat, keep, ex, outdir, cfg):
    combos = list(dict.fromkeys((r["model"], r["task"]) for r in rows))
    best = _best(rows)
    if best is not None:
        k = "exact" if best["projection_dim"] is None else f"k={best['projection_dim']}"
        sec.summary.append(
            f"Most faithful surrogate: {EST_NAMES[best['estimator']]} on the {best['kernel']} "
            f"kernel ({k}) of the {best['model']}, digits {best['task']}: tau = {best['tau']:.3f}; "
            f"its test accuracy differs from the network's by {best['acc_diff']:+.3f}.")
    b10 = _best(rows, task="10-class", projection_dim=None)
    if b10 is not None and b10 is not best:
        sec.summary.append(
            f"On 10 classes the best is {EST_NAMES[b10['estimator']]} on {b10['kernel']} "
            f"({b10['model']}): tau = {b10['tau']:.3f}.")
    sec.data["best"] = None if best is None else {k: best[k] for k in ("model", "task", "kernel", "projection_dim", "estimator", "tau")}
    # the exact kernels: one row per (network, task, kernel), one column per surrogate
    header = ["network", "task", "kernel"] + [f"tau {EST_NAMES[e]}" for e in ESTIMATORS] + ["acc. diff (best)"]
    table = []
    for arch, task in combos:
        for kern in dict.fromkeys(r["kernel"] for r in rows if r["projection_dim"] is None):
            sel = {r["estimator"]: r for r in rows if (r["model"], r["task"], r["kernel"]) == (arch, task, kern)
                   and r["projection_dim"] is None}
            if not sel:
                continue
            b = max(sel.values(), key=lambda r: r["tau"])
            table.append([arch, task, kern] + [f"{sel[e]['tau']:.3f}" if e in sel else
                                               ("n/a" if kern == "eNTK (full)" else "not run")
                                               for e in ESTIMATORS]
                         + [f"{b['acc_diff']:+.3f} ({EST_NAMES[b['estimator']]})"])
    sec.text(f"Data: {cfg['n_train'] or 'all'} training and {cfg['n_test'] or 'all'} test digits per "
             "task (stratified 70/30 split). Surrogates are fitted to the network's predictions, "
             "not to the true labels. n/a: the full eNTK is a kernel on (sample, class) pairs and "
             "only kernel ridge regression uses it."
             + (" not run: on 10 classes KLR runs only on the MLP's exact trNTK at this size (its "
                "solve costs as much as all the other surrogates together; --full runs it everywhere)."
                if cfg["klr"] != "all" else "")
             + " For reference, the eNTK paper reports tau 0.708 "
             "(kGLM) and 0.732 (SVC) for an MLP on MNIST 0-vs-1 (10,000 training images).")
    sec.table("Fidelity tau of each surrogate on the exact kernels", header, table)
    path = os.path.join(outdir, "fidelity_vs_projection.png")
    _plot_fidelity(rows, combos, path)
    sec.figure(path, "Fidelity tau against the projection size k of the projected trNTK (solid) "
                     "and pNTK (dotted), one colour per surrogate; the points at 'exact' are the "
                     "unprojected kernels. Panels share the y-axis."
               + (" On 10 classes KLR ran only on the MLP's exact trNTK (a single point)." if cfg["klr"] != "all" else ""))
    if heat:
        plt = plotting._plt()
        fig, axes = plt.subplots(1, len(heat), figsize=(5.2 * len(heat), 4.6), squeeze=False)
        lo = min(float(np.min(K)) for K, _ in heat.values())  # one colour scale for the panels
        hi = max(float(np.max(K)) for K, _ in heat.values())
        for ax, (arch, (K, y)) in zip(axes[0], sorted(heat.items())):
            plotting.plot_kernel_heatmap(K, y, ax=ax, vmin=lo, vmax=hi,
                                         title=f"exact trNTK of the {arch}, test digits",
                                         cbar_label="trNTK (cosine-normalised)",
                                         axis_label="true class of the test digit")
        path = os.path.join(outdir, "trntk_heatmap.png")
        plotting.save(fig, path)
        sec.figure(path, "The exact trace NTK between test digits, sorted by true class (one colour "
                         "scale for both panels): bright diagonal blocks mean the network's "
                         "gradients group digits of a class.")
    _faithful_examples(sec, rows, keep, ex, outdir)


def _plot_fidelity(rows, combos, path):
    plt = plotting._plt()
    ncols = min(2, len(combos))
    nrows = -(-len(combos) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.0 * ncols, 3.9 * nrows), squeeze=False,
                             sharey=True)
    colors = {e: f"C{i}" for i, e in enumerate(ESTIMATORS)}
    for ax in axes.ravel()[len(combos):]:
        ax.axis("off")
    for ax, (arch, task) in zip(axes.ravel(), combos):
        sel = [r for r in rows if (r["model"], r["task"]) == (arch, task)]
        dims = sorted({r["projection_dim"] for r in sel if r["projection_dim"] is not None})
        xs = {d: i for i, d in enumerate(dims)}
        xs[None] = len(dims)
        for kern, ls in (("trNTK", "-"), ("pNTK", ":")):
            for est in ESTIMATORS:
                pts = sorted((xs[r["projection_dim"]], r["tau"]) for r in sel if r["estimator"] == est
                             and r["kernel"] in (kern, f"proj-{kern}"))
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], ls, marker="o", ms=4,
                            color=colors[est], label=f"{EST_NAMES[est]}, {kern}")
        ax.set_xticks(range(len(dims) + 1), [str(d) for d in dims] + ["exact"])
        ax.set_xlabel("projection size k")
        ax.set_ylabel("fidelity tau (Kendall)")
        ax.set_title(f"{arch}, digits {task}", fontsize=10)
        ax.grid(alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.tight_layout()
    # right of the panels: inside, the legend would cover lines
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8,
               frameon=False, title="surrogate, kernel", title_fontsize=8)
    return plotting.save(fig, path, dpi=110)


def _faithful_examples(sec, rows, keep, ex, outdir, n=6):
    """Test points where the best 10-class surrogate follows the network most and least closely."""
    cands = [r for r in rows if r["task"] == "10-class" and r["projection_dim"] is None
             and (r["model"], r["task"], r["kernel"], r["estimator"]) in keep]
    if not cands:
        return
    b = max(cands, key=lambda r: r["tau"])
    sur = keep[(b["model"], b["task"], b["kernel"], b["estimator"])]
    model, Xte, yte = ex[b["model"]]
    P = model.predict_proba(Xte)
    S = sur.predict_proba(Xte)
    labels = list(model.class_labels())
    cols = [labels.index(c) for c in yte]
    p = P[np.arange(len(yte)), cols]
    sc = list(sur.classes_)
    s = np.array([S[i, sc.index(c)] if c in sc else 0.0 for i, c in enumerate(yte)])
    # tau, point by point: the share of the other points that both order the same way (pairs
    # tied under the network do not count); as in tau, probabilities of exactly 0 or 1 are left out
    keep = np.flatnonzero((p > 0) & (p < 1) & np.isfinite(s))
    if len(keep) < 2 * n + 1:
        return
    dp = np.sign(p[keep][:, None] - p[keep][None, :])
    ds = np.sign(s[keep][:, None] - s[keep][None, :])
    agree = ((dp * ds) > 0).sum(1) / np.maximum((dp != 0).sum(1), 1)
    order = keep[np.argsort(-agree, kind="stable")]
    share = dict(zip(keep, agree))
    pick = np.r_[order[:n], order[::-1][:n]]
    titles = [f"y={yte[i]}  agree {share[i]:.0%}\nnet {p[i]:.4f}\nsur {s[i]:.4f}" for i in pick]
    plt = plotting._plt()
    fig = plotting.plot_image_grid(Xte[pick], titles, ncols=n, image_shape=(8, 8),
                                   row_labels=["most faithful", "least faithful"])
    path = os.path.join(outdir, "faithful_examples.png")
    plotting.save(fig, path)
    plt.close("all")
    sec.figure(path, f"Test digits the best 10-class surrogate ({EST_NAMES[b['estimator']]} on "
                     f"{b['kernel']}, {b['model']}) follows most closely (top row) and least closely "
                     "(bottom row). 'agree': the share of the other test digits that the network and "
                     "the surrogate order the same way by the probability of the true class y (tau "
                     "point by point); 'net', 'sur': that probability under each.")


def format_table(rows):
    """Markdown table of the surrogate rows (every row; ``results.csv`` holds the same)."""
    head = "| model | task | kernel | projection_dim | estimator | Kendall tau | acc. diff | seconds |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        k = "exact" if r["projection_dim"] is None else str(r["projection_dim"])
        lines.append(
            f"| {r['model']} | {r['task']} | {r['kernel']} | {k} | {r['estimator']} | "
            f"{r['tau']:.3f} | {r['acc_diff']:+.3f} | {r['seconds']:.2f} |"
        )
    return "\n".join(lines)
