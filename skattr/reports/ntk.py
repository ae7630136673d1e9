"""Main-job section: approximate eNTK kernels and kernel-machine surrogates on digits.

Trains an MLP and a small CNN on sklearn's digits (8x8 images, shipped with scikit-learn: no
download), for the 0-vs-1 task and the 10-class task; computes every kernel exact and projected;
fits kGLM, SVC and kernel-ridge surrogates; reports Kendall-tau fidelity to the network and the
test-accuracy differential, with plots.
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

__all__ = ["ntk_report", "make_mlp", "make_cnn", "digits_task"]

PAPER_MNIST2_MLP = {"kglm": 0.708, "svc": 0.732}


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


def _kernels(model, n_classes, dims, cache, quick):
    exact = [
        ("trNTK", TraceNTK(model)),
        ("pNTK", PseudoNTK(model)),
        ("embedding", EmbeddingKernel(model)),
        ("Grad-Cos", GradCosKernel(model)),
    ]
    if n_classes == 2 or not quick:
        exact.append(("eNTK (full)", EmpiricalNTK(model)))
    proj = []
    for k in dims:
        proj.append(("proj-trNTK", TraceNTK(model, projection_dim=k, memory=cache)))
        proj.append(("proj-pNTK", PseudoNTK(model, projection_dim=k, memory=cache)))
    return exact, proj


def ntk_report(outdir, *, random_state=0, quick=False, verbose=1):
    """Run the eNTK surrogate study; write plots and return the rows of the results table."""
    os.makedirs(outdir, exist_ok=True)
    dims = [64, 256] if quick else [64, 256, 1024, 4096]
    archs = [("MLP", make_mlp, False), ("CNN", make_cnn, True)]
    tasks = [2, 10]
    jobs = []
    for arch, make, images in archs:
        for C in tasks:
            jobs.append((arch, make, images, C))
    rows, heat = [], {}
    bar = None
    if verbose:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc="eNTK surrogates")
    for arch, make, images, C in jobs:
        Xtr, Xte, ytr, yte = digits_task(C, images=images, random_state=random_state)
        if quick:
            Xtr, ytr, Xte, yte = Xtr[:300], ytr[:300], Xte[:200], yte[:200]
        torch.manual_seed(random_state)
        t0 = time.perf_counter()
        model = TorchModel(
            make(C), epochs=30, lr=0.01, momentum=0.9, batch_size=32, random_state=random_state
        ).fit(Xtr, ytr)
        train_s = time.perf_counter() - t0
        net_acc = model.score(Xte, yte)
        y_net = model.predict(Xte)
        cache = FeatureCache()
        exact, proj = _kernels(model, C, dims, cache, quick)
        for name, kern in exact + proj:
            for est in ("kglm", "klr", "svc", "krr"):
                if isinstance(kern, EmpiricalNTK) and est != "krr":
                    continue
                t = time.perf_counter()
                sur = KernelSurrogate(kern, est, random_state=random_state).fit(Xtr)
                tau = sur.score(Xte, yte)
                acc_diff = accuracy_differential(yte, sur.predict(Xte), y_net)
                secs = time.perf_counter() - t
                rows.append({
                    "model": arch, "task": "0-vs-1" if C == 2 else "10-class", "kernel": name,
                    "projection_dim": kern.get_params().get("projection_dim"),
                    "estimator": est, "tau": tau, "acc_diff": acc_diff, "seconds": secs,
                    "net_acc": net_acc, "train_seconds": train_s,
                })
        if C == 10:
            heat[arch] = (TraceNTK(model).fit(Xte).transform(Xte), yte)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    figs = _plots(rows, heat, outdir)
    return {"rows": rows, "figures": figs}


def _plots(rows, heat, outdir):
    plt = plotting._plt()
    figs = []
    combos = sorted({(r["model"], r["task"]) for r in rows})
    fig, axes = plt.subplots(1, len(combos), figsize=(4.6 * len(combos), 4), squeeze=False)
    for ax, (arch, task) in zip(axes[0], combos):
        sel = [r for r in rows if r["model"] == arch and r["task"] == task]
        pr = [
            {"series": f"{r['kernel']} {r['estimator']}", "projection_dim": r["projection_dim"], "tau": r["tau"]}
            for r in sel if r["projection_dim"] is not None and r["estimator"] != "krr"
        ]
        exact = {
            f"proj-{r['kernel']} {r['estimator']}": r["tau"]
            for r in sel if r["projection_dim"] is None and r["kernel"] in ("trNTK", "pNTK")
        }
        plotting.plot_fidelity_vs_projection(pr, ax=ax, exact=exact, title=f"{arch}, {task} (dashed: exact)")
    figs.append(plotting.save(fig, os.path.join(outdir, "fidelity_vs_projection.png")))
    if heat:
        fig, axes = plt.subplots(1, len(heat), figsize=(5 * len(heat), 4.5), squeeze=False)
        for ax, (arch, (K, y)) in zip(axes[0], sorted(heat.items())):
            plotting.plot_kernel_heatmap(K, y, ax=ax, title=f"exact trNTK, {arch}, digits test set by class")
        figs.append(plotting.save(fig, os.path.join(outdir, "trntk_heatmap.png")))
    return figs


def format_table(rows):
    """Markdown table of the surrogate rows."""
    head = "| model | task | kernel | projection_dim | estimator | Kendall tau | acc. diff | seconds |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        k = "exact" if r["projection_dim"] is None else str(r["projection_dim"])
        lines.append(
            f"| {r['model']} | {r['task']} | {r['kernel']} | {k} | {r['estimator']} | "
            f"{r['tau']:.3f} | {r['acc_diff']:+.3f} | {r['seconds']:.2f} |"
        )
    return "\n".join(lines)
